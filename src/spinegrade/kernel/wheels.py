"""Wheels for a machine with no package index: the project's own and the bundled dependencies.

Three sources, tried in order for each dependency:

1. a wheelhouse folder of wheels already at hand (``--wheelhouse``; the build reuses its own);
2. ``pip download`` of binary wheels for every Kaggle Python version (skipped with ``--offline``);
3. the copy installed here, packed back into a wheel. Its tag is this interpreter's, so a
   compiled package then installs on Kaggle only if the image runs the same Python; the build
   says so.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata as metadata
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from spinegrade.errors import SpinegradeError
from spinegrade.logs import get_logger

log = get_logger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[3]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheels_for(folder: Path, name: str, version: str) -> list[Path]:
    """Wheels of ``name`` at ``version`` in ``folder``."""
    prefix = f"{normalise(name)}-{version}-"
    return sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix.lower()))


def build_project_wheel(dest: Path) -> Path:
    """The spinegrade wheel, built by pip from pyproject.toml (source checkout), or packed from the
    installed copy when there is no source tree (spinegrade itself installed from a wheel).

    Built from a fresh copy of the sources: setuptools reuses the checkout's ``build/`` folder and
    never deletes from it, so a module removed from ``src/`` would otherwise still ship."""
    dest.mkdir(parents=True, exist_ok=True)
    version = metadata.version("spinegrade")
    if (PROJECT_ROOT / "pyproject.toml").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "source"
            shutil.copytree(PROJECT_ROOT / "src", source / "src", symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            shutil.copytree(PROJECT_ROOT / "configs", source / "configs")  # src/spinegrade/configs links here
            for name in ("pyproject.toml", "README.md"):
                shutil.copy(PROJECT_ROOT / name, source / name)
            result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
                                     "--no-build-isolation", "--wheel-dir", tmp, str(source)],
                                    capture_output=True, text=True)
            built = list(Path(tmp).glob("spinegrade-*.whl"))
            if result.returncode != 0 or not built:
                tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise SpinegradeError(f"cannot build the spinegrade wheel from {PROJECT_ROOT} ({tail}); "
                                      "`pip install setuptools` into this environment and retry")
            target = dest / built[0].name
            shutil.move(str(built[0]), target)
            return target
    return repack_installed("spinegrade", dest, expected_version=version)


def repack_installed(name: str, dest: Path, expected_version: str | None = None) -> Path:
    """Pack an installed distribution back into a wheel: its files as listed in RECORD (compiled
    caches and console scripts left out), its metadata, a fresh RECORD, and its original tag."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise SpinegradeError(f"{name} is not installed here, so it cannot be bundled; `pip install {name}`") from None
    version = dist.version
    if expected_version and version != expected_version:
        raise SpinegradeError(f"{name} {version} is installed, {expected_version} was expected")
    wheel_info = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel_info.splitlines() if line.startswith("Tag:")]
    if not tags:
        raise SpinegradeError(f"{name}: the installed copy has no wheel tag (an editable or egg install); "
                              "bundle it from a wheelhouse instead (--wheelhouse)")
    if json.loads(dist.read_text("direct_url.json") or "{}").get("dir_info", {}).get("editable"):
        raise SpinegradeError(f"{name}: installed in editable mode; it cannot be packed from the installed files")
    files = [f for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in f.parts]
    info_dir = next((f.parts[0] for f in files if f.parts[0].endswith(".dist-info")), None)
    if info_dir is None:
        raise SpinegradeError(f"{name}: the installed copy lists no .dist-info folder; bundle it from a wheelhouse")
    skip = {f"{info_dir}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{normalise(name)}-{version}-{tags[0]}.whl"
    records = []
    tmp = target.with_name(f".{target.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            arcname = "/".join(f.parts)
            if arcname in skip:
                continue
            data = Path(f.locate()).read_bytes()
            zf.writestr(arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append((arcname, f"sha256={digest}", str(len(data))))
        records.append((f"{info_dir}/RECORD", "", ""))
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(records)
        zf.writestr(f"{info_dir}/RECORD", buffer.getvalue())
    tmp.replace(target)
    return target


def download_wheels(name: str, version: str, dest: Path, python_versions: tuple[str, ...]) -> list[Path]:
    """Binary (or pure) wheels of ``name==version`` for each Kaggle Python, from the package index."""
    found: list[Path] = []
    for python in python_versions:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--timeout", "15", "--retries", "1", "--python-version", python, "--implementation", "cp",
                   "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
                   "--platform", "manylinux_2_34_x86_64", "--dest", str(dest), f"{name}=={version}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            log.info(f"  {name} {version}: no wheel for Python {python} from the index ({tail})")
        found = wheels_for(dest, name, version)
        if found and all(w.name.endswith("-none-any.whl") for w in found):
            break  # one pure-Python wheel serves every version
    return found


def collect_wheels(dest: Path, wheelhouse: Path, offline: bool, python_versions: tuple[str, ...]) -> list[str]:
    """Fill ``dest`` with wheels of every bundled package; returns pinned requirements (``name==version``:
    a bare name would let pip keep an older copy already on the Kaggle image).

    Downloaded wheels are kept in ``wheelhouse``, so the next build needs no network."""
    from spinegrade.kernel import BUNDLED_PACKAGES

    dest.mkdir(parents=True, exist_ok=True)
    wheelhouse.mkdir(parents=True, exist_ok=True)
    for name in BUNDLED_PACKAGES:
        if name == "spinegrade":
            log.info(f"  {build_project_wheel(dest).name} (built from this checkout)")
            continue
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SpinegradeError(f"{name} is not installed here; `pip install {name}` first (the kernel bundles it)") from None
        found = wheels_for(wheelhouse, name, version)
        source = f"from {wheelhouse}"
        if not found and not offline:
            found, source = download_wheels(name, version, wheelhouse, python_versions), "downloaded"
        if found:
            for w in found:
                shutil.copy2(w, dest / w.name)
            log.info(f"  {name} {version}: {', '.join(w.name for w in found)} ({source})")
            continue
        packed = repack_installed(name, dest)
        pure = packed.name.endswith("-none-any.whl")
        log.info(f"  {name} {version}: {packed.name} (packed from the installed copy"
                 + (")" if pure else f"; installs only on Python {sys.version_info.major}.{sys.version_info.minor})"))
    return [f"{name}=={metadata.version(name)}" for name in BUNDLED_PACKAGES]
