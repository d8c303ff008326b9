"""Build the Kaggle kernel of a trained blend: the notebook script and the two datasets it mounts.

    kernels/<name>/            kernel-metadata.json and <name>.py (a short script calling the package)
    kernels/<name>-code/       wheels/ (spinegrade and the bundled dependencies) and dataset-metadata.json
    kernels/<name>-models/     trained_models/ (only the blend's backbones, finished folds, best weights),
                               oof/blend.json, configs/, spinegrade-models.json, dataset-metadata.json

Each folder is built beside its final place and renamed over it, so an interrupted build never
leaves a half-filled dataset that an upload would send.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from spinegrade.blend import load_blends
from spinegrade.constants import COMPETITION, CONDITIONS, GROUPS, LEVELS
from spinegrade.data.preprocess import LOCATOR_INPUT_VERSION, PREPROCESS_VERSION, refuse_other_inputs
from spinegrade.download import kaggle_config_dirs
from spinegrade.errors import SpinegradeError
from spinegrade.files import write_text_atomic
from spinegrade.kernel import (
    BUNDLED_PACKAGES,
    DEFAULT_NAME,
    KAGGLE_IMAGE_PACKAGES,
    KAGGLE_PYTHON_VERSIONS,
    MODELS_MARKER,
    STATUS_FILE,
)
from spinegrade.kernel.wheels import collect_wheels
from spinegrade.layout import RunLayout
from spinegrade.locators import locator_files, locator_trained, needed_locators
from spinegrade.logs import get_logger

log = get_logger(__name__)

PLACEHOLDER_USER = "your-kaggle-username"

KERNEL_SCRIPT = '''"""{name}: spinegrade offline inference for {competition}.

Built by `spinegrade kernel` on {built}. Installs spinegrade and the packages it brings (pinned
versions, replacing the image's own) from the {code} dataset with no index and no network, then
locates and grades every test study with the blend in the {models} dataset and writes
/kaggle/working/submission.csv. KAGGLE_INPUT and KAGGLE_WORKING point it at other folders for a local run.
If the code cannot even be installed, it still writes a valid submission (1/3 everywhere) and says why,
in the log and in {status} (which `spinegrade kernel-run` reads); it exits 0 whatever happened.
"""
import csv
import glob
import importlib
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
INPUT = os.environ.get("KAGGLE_INPUT", "/kaggle/input")
WORKING = os.environ.get("KAGGLE_WORKING", "/kaggle/working")
TARGETS = {targets!r}  # condition_level, as in the submission's row ids


def uniform_submission(reason):
    """The last resort: every listed test study, 1/3 for each grade."""
    print(f"error: {{reason}}; writing 1/3 everywhere so that a submission exists", flush=True)
    series = glob.glob(os.path.join(INPUT, "*", "test_series_descriptions.csv"))
    studies = sorted({{int(r["study_id"]) for r in csv.DictReader(open(series[0]))}}) if series else []
    os.makedirs(WORKING, exist_ok=True)
    with open(os.path.join(WORKING, "submission.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["row_id", "normal_mild", "moderate", "severe"])
        out.writerows([f"{{s}}_{{t}}", 1 / 3, 1 / 3, 1 / 3] for s in studies for t in TARGETS)
    with open(os.path.join(WORKING, "{status}"), "w") as f:
        json.dump({{"fallback": reason, "groups_without_model_rows": []}}, f)


# where Kaggle mounts the code dataset; else wherever a mount put it (one or two folders deep)
candidates = [os.path.join(INPUT, "{code}", "wheels")] + sorted(glob.glob(os.path.join(INPUT, "*", "wheels"))) \\
    + sorted(glob.glob(os.path.join(INPUT, "*", "*", "wheels")))
wheels = next((w for w in candidates if os.path.isfile(os.path.join(w, "requirements.txt"))), None)
installed = wheels is not None and subprocess.run(
    [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--force-reinstall",
     "--find-links", wheels, "-r", os.path.join(wheels, "requirements.txt")]).returncode == 0
if not installed:
    uniform_submission("the {code} dataset is not attached" if wheels is None else "pip could not install its wheels")
else:
    importlib.invalidate_caches()
    from spinegrade.kernel.runtime import run_kernel

    run_kernel(models_dataset="{models}")
'''


@dataclass
class KernelBuild:
    kernel_dir: Path
    code_dir: Path
    models_dir: Path
    sizes: dict[str, int]  # bytes per folder name
    username: str


def kaggle_username(explicit: str | None = None) -> str | None:
    """The Kaggle user owning the kernel: given, else KAGGLE_USERNAME, else the kaggle.json in use."""
    if explicit:
        return explicit
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    for folder in kaggle_config_dirs():
        path = folder / "kaggle.json"
        if path.is_file():
            try:
                return json.loads(path.read_text()).get("username")
            except (OSError, ValueError):
                return None
    return None


def check_slug(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{4,48}[a-z0-9]", name):
        raise SpinegradeError(f"kernel name {name!r}: use 6 to 50 lowercase letters, digits and dashes "
                              "(Kaggle derives the kernel's address from it)")
    return name


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fresh(final: Path) -> Path:
    staging = final.with_name(f".{final.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _dataset_metadata(folder: Path, user: str, slug: str, title: str) -> None:
    write_text_atomic(folder / "dataset-metadata.json", json.dumps(
        {"title": title, "id": f"{user}/{slug}", "licenses": [{"name": "CC0-1.0"}]}, indent=1))


def copy_models(output_dir: Path, target: Path, folds_per_model: int | None = None) -> dict:
    """Each group's blended backbones (finished folds: settings and best weights), the locators of
    those groups, the priors and the blend itself; nothing the blend does not use. The dataset is
    written in today's layout whatever layout the run has (a run from before condition groups too).
    ``folds_per_model``: keep the first K finished folds of each (backbone, group), the cut that
    brings a large ensemble within the competition's time limit (``benchmarks/kernel_budget.py``)."""
    source, dest = RunLayout(output_dir), RunLayout(target)
    blends = load_blends(output_dir)
    info: dict[str, dict] = {}
    for group, blend in blends.items():
        used = [n for n, w in zip(blend.backbones, blend.weights) if w > 0]
        folds: dict[str, list[str]] = {}
        for name in used:
            finished = source.finished_fold_dirs(name, group)
            if not finished:
                raise SpinegradeError(f"{source.model_dir(name, group)}: the {group} blend uses {name} but it has no finished fold")
            finished = finished[:folds_per_model] if folds_per_model else finished
            folds[name] = [f.name for f in finished]
            for fold in finished:  # a model the kernel's code would feed other inputs is refused here, not on Kaggle
                refuse_other_inputs(json.loads((fold / "model.json").read_text()), "preprocess_version",
                                    PREPROCESS_VERSION, fold)
                into = dest.model_dir(name, group, existing=False) / fold.name
                into.mkdir(parents=True, exist_ok=True)
                for file in ("model.json", "best.safetensors", "done.json", "config.yaml"):
                    if (fold / file).is_file():
                        shutil.copy2(fold / file, into / file)
            if (finished[0] / "config.yaml").is_file():
                (target / "configs").mkdir(exist_ok=True)
                shutil.copy2(finished[0] / "config.yaml", target / "configs" / f"{name}-{group}.yaml")
        info[group] = {"backbones": used, "weights": dict(zip(blend.backbones, map(float, blend.weights))),
                       "mode": blend.mode, "folds": folds}
    for group in needed_locators([g for g in blends if GROUPS[g].locator is not None]):
        root = source.locator_dir(group)
        if not locator_trained(output_dir, group):
            raise SpinegradeError(f"{root}: no finished {group} locator to bundle (run `make train-localizer`)")
        into = dest.locator_dir(group, existing=False)
        for spec in sorted(root.glob("fold*/localizer.json")):
            refuse_other_inputs(json.loads(spec.read_text()), "locator_input_version", LOCATOR_INPUT_VERSION, spec.parent)
        for file in locator_files(root, group):
            (into / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / file, into / file)
    if source.priors.is_file():
        shutil.copy2(source.priors, dest.priors)
    dest.oof.mkdir()
    shutil.copy2(source.blend_json, dest.blend_json)
    return {"groups": info}


def build_kernel(output_dir: str | Path, kernels_dir: str | Path | None = None, name: str = DEFAULT_NAME,
                 username: str | None = None, wheelhouse: str | Path | None = None, offline: bool = False,
                 python_versions: tuple[str, ...] = KAGGLE_PYTHON_VERSIONS,
                 folds_per_model: int | None = None) -> KernelBuild:
    """Everything the kernel needs, under ``kernels_dir`` (default ``OUTPUT/kernels``)."""
    output_dir = Path(output_dir)
    kernels_dir = Path(kernels_dir) if kernels_dir else RunLayout(output_dir).kernels
    name = check_slug(name)
    if folds_per_model is not None and folds_per_model < 1:
        raise SpinegradeError(f"--folds-per-model {folds_per_model}: keep at least one fold per model")
    user = kaggle_username(username)
    if not user:
        user = PLACEHOLDER_USER
        log.warning(f"no KAGGLE_USERNAME (nor kaggle.json); the ids say {PLACEHOLDER_USER!r}: "
                    "rebuild with KAGGLE_USERNAME=you before `make upload`")
    code_slug, models_slug = f"{name}-code", f"{name}-models"
    built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    models_final = kernels_dir / models_slug
    staging = _fresh(models_final)
    info = copy_models(output_dir, staging, folds_per_model)
    write_text_atomic(staging / MODELS_MARKER, json.dumps(
        {**info, "spinegrade": metadata.version("spinegrade"), "built": built, "output_dir": str(output_dir)}, indent=1))
    _dataset_metadata(staging, user, models_slug, f"{name} models")
    _publish(staging, models_final)

    code_final = kernels_dir / code_slug
    staging = _fresh(code_final)
    log.info(f"wheels for {code_slug}:")
    names = collect_wheels(staging / "wheels", Path(wheelhouse) if wheelhouse else kernels_dir / "wheelhouse",
                           offline, python_versions)
    write_text_atomic(staging / "wheels" / "requirements.txt", "\n".join(names) + "\n")
    write_text_atomic(staging / "README.md", f"# {code_slug}\n\nWheels installed by the {name} kernel with "
                      "`pip install --no-index --no-deps`: " + ", ".join(BUNDLED_PACKAGES) + ".\nThe kernel assumes "
                      "the Kaggle image provides: " + ", ".join(KAGGLE_IMAGE_PACKAGES) + ".\n")
    _dataset_metadata(staging, user, code_slug, f"{name} code")
    _publish(staging, code_final)

    kernel_final = kernels_dir / name
    staging = _fresh(kernel_final)
    targets = [f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS]
    write_text_atomic(staging / f"{name}.py", KERNEL_SCRIPT.format(name=name, competition=COMPETITION, built=built,
                                                                   code=code_slug, models=models_slug, targets=targets,
                                                                   status=STATUS_FILE))
    write_text_atomic(staging / "kernel-metadata.json", json.dumps({
        "id": f"{user}/{name}", "title": name, "code_file": f"{name}.py", "language": "python",
        "kernel_type": "script", "is_private": True, "enable_gpu": True, "enable_tpu": False,
        "enable_internet": False, "dataset_sources": [f"{user}/{code_slug}", f"{user}/{models_slug}"],
        "competition_sources": [COMPETITION], "kernel_sources": [], "model_sources": []}, indent=1))
    _publish(staging, kernel_final)

    sizes = {p.name: folder_size(p) for p in (kernel_final, code_final, models_final)}
    for folder, size in sizes.items():
        log.info(f"{kernels_dir / folder}: {size / 1e6:.1f} MB")
    members = [f"{g}: {b} (weight {i['weights'][b]:.2f}, {len(i['folds'][b])} folds)"
               for g, i in info["groups"].items() for b in i["backbones"]]
    log.info(f"blend: {', '.join(members)}")
    return KernelBuild(kernel_final, code_final, models_final, sizes, user)
