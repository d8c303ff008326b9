"""Rehearse a built kernel here, the way Kaggle will run it.

* The environment: a fresh virtual environment that sees only the packages assumed on the Kaggle
  image (:data:`KAGGLE_IMAGE_PACKAGES` and their dependencies, linked from this environment) and
  whatever the kernel installs from its own wheels. Its network is cut at the socket: any attempt
  to connect raises.
* The inputs: ``ROOT/input/<competition>`` (the data folder, test images included) and
  ``ROOT/input/<dataset>`` for each dataset the kernel metadata names; output in ``ROOT/working``.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from spinegrade.constants import COMPETITION
from spinegrade.errors import SpinegradeError
from spinegrade.kernel import KAGGLE_IMAGE_PACKAGES, STATUS_FILE
from spinegrade.logs import get_logger

log = get_logger(__name__)

NO_NETWORK = '''"""Cut the network for this interpreter: the kernel must never need it."""
import socket

def _refuse(self, address, *args, **kwargs):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise OSError(f"network unreachable (offline kernel rehearsal): connect to {address!r}")
    return _connect(self, address, *args, **kwargs)

_connect = socket.socket.connect
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
'''


def dependency_closure(names: tuple[str, ...]) -> set[str]:
    """Installed distributions needed by ``names``, following their (non-extra) requirements."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional platform package absent here
        seen.add(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def kaggle_like_environment(path: Path) -> Path:
    """A virtual environment holding only the Kaggle image's packages; returns its python."""
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    image = path / "kaggle-image"
    image.mkdir(exist_ok=True)
    here = Path(sysconfig.get_paths()["purelib"])
    distributions = sorted(dependency_closure(KAGGLE_IMAGE_PACKAGES))
    for name in distributions:
        for f in metadata.distribution(name).files or []:
            top = f.parts[0]
            if top == ".." or (image / top).is_symlink() or not (here / top).exists():
                continue
            (image / top).symlink_to(here / top)
    (site / "kaggle_image.pth").write_text(str(image) + "\n")
    (site / "offline_guard.py").write_text(NO_NETWORK)
    (site / "offline_guard.pth").write_text("import offline_guard\n")
    log.info(f"Kaggle-like environment {path}: {len(distributions)} distributions of the Kaggle image "
             f"({', '.join(KAGGLE_IMAGE_PACKAGES)} and their dependencies), network cut")
    return python


def kaggle_tree(data_dir: Path, kernel_dir: Path, root: Path) -> tuple[Path, Path]:
    """``root/input`` and ``root/working`` as Kaggle mounts them (links, nothing copied)."""
    meta = json.loads((kernel_dir / "kernel-metadata.json").read_text())
    inputs, working = root / "input", root / "working"
    inputs.mkdir(parents=True, exist_ok=True)
    working.mkdir(parents=True, exist_ok=True)
    links = {COMPETITION: Path(data_dir)}
    for source in meta["dataset_sources"]:
        slug = source.split("/", 1)[1]
        links[slug] = kernel_dir.parent / slug
    for slug, target in links.items():
        if not target.is_dir():
            raise SpinegradeError(f"{target}: not found (the kernel mounts {slug})")
        link = inputs / slug
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve())
    return inputs, working


def run_kernel_locally(kernel_dir: str | Path, data_dir: str | Path, root: str | Path,
                       python: str | Path | None = None) -> tuple[Path, float]:
    """Run the kernel script against ``data_dir``'s test split; returns (submission, seconds).

    ``python`` defaults to a Kaggle-like environment under ``root/env``."""
    kernel_dir, root = Path(kernel_dir).resolve(), Path(root).resolve()
    meta = json.loads((kernel_dir / "kernel-metadata.json").read_text())
    inputs, working = kaggle_tree(Path(data_dir), kernel_dir, root)
    python = Path(python).absolute() if python else kaggle_like_environment(root / "env")
    # Nothing of this machine's Python or pip set-up (an extra find-links folder, say) may reach the kernel.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env.update(KAGGLE_INPUT=str(inputs), KAGGLE_WORKING=str(working), PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_CONFIG_FILE=os.devnull)
    started = time.perf_counter()
    result = subprocess.run([str(python), str(kernel_dir / meta["code_file"])], env=env, cwd=working,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (root / "kernel.log").write_text(result.stdout + result.stderr)
    for line in result.stdout.splitlines():
        log.info(f"  | {line}")
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise SpinegradeError(f"the kernel failed (exit {result.returncode}); full log in {root / 'kernel.log'}:\n{tail}")
    submission = working / "submission.csv"
    if not submission.is_file():
        raise SpinegradeError(f"the kernel wrote no {submission}; log in {root / 'kernel.log'}")
    check_kernel_status(working, root / "kernel.log")
    return submission, seconds


def check_kernel_status(working: Path, log_file: Path) -> None:
    """Fail, saying why, where the kernel's ``STATUS_FILE`` says the whole prediction fell back on the
    prior or a blended group got no model row: the Kaggle script exits 0 all the same (Kaggle scores what
    it wrote), so a rehearsal that only read the exit status would pass a kernel that grades nothing."""
    status = working / STATUS_FILE
    if not status.is_file():
        raise SpinegradeError(f"the kernel wrote no {status}: is it built by this version? (`make kernel`)")
    said = json.loads(status.read_text())
    fallback = str(said.get("fallback") or "").strip().splitlines()
    why = [f"the whole prediction fell back on the training prior ({fallback[0]})"] if fallback else []
    why += [f"no model row at all for the {g} group" for g in said.get("groups_without_model_rows", [])]
    if why:
        raise SpinegradeError(f"the kernel exited 0 and wrote {working / 'submission.csv'}, but {'; '.join(why)}; "
                              f"log in {log_file}")
