"""The Kaggle kernel: built from a real trained run, run offline in a Kaggle-like environment, uploaded
(dry run) with the kaggle command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinegrade.blend import load_blends, run_blend
from spinegrade.constants import COMPETITION, PROBABILITY_COLUMNS
from spinegrade.errors import SpinegradeError
from spinegrade.kernel import BUNDLED_PACKAGES, MODELS_MARKER, STATUS_FILE
from spinegrade.kernel.build import build_kernel
from spinegrade.kernel.local import check_kernel_status, run_kernel_locally
from spinegrade.kernel.runtime import run_kernel
from spinegrade.submit import predict_split

ROOT = Path(__file__).resolve().parents[1]


def _blend_output(trained_run, root: Path, weights: list[float] | None = None) -> Path:
    """An output folder sharing the trained models, with its own blend (fitted, or with given weights)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "trained_models").symlink_to(trained_run["out"] / "trained_models")
    (root / "oof").mkdir()
    for name in ("efficientnet_lite0", "efficientnet_lite0_wide"):
        (root / "oof" / name).symlink_to(trained_run["out"] / "oof" / name)
    run_blend(root, trained_run["folds"])
    if weights is not None:
        info = json.loads((root / "oof" / "blend.json").read_text())
        info["groups"]["spinal"].update(backbones=["efficientnet_lite0", "efficientnet_lite0_wide"], weights=weights)
        (root / "oof" / "blend.json").write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def built(trained_run, tmp_path_factory):
    out = _blend_output(trained_run, tmp_path_factory.mktemp("kernel") / "out")
    build = build_kernel(out, username="tester", offline=True)
    return {"out": out, "build": build}


def test_kernel_metadata_is_complete_offline_and_names_the_folders_built(built):
    build = built["build"]
    meta = json.loads((build.kernel_dir / "kernel-metadata.json").read_text())
    for field in ("id", "title", "code_file", "language", "kernel_type", "dataset_sources", "competition_sources"):
        assert meta[field], field
    assert meta["enable_internet"] is False and meta["enable_gpu"] is True and meta["is_private"] is True
    assert (meta["language"], meta["kernel_type"]) == ("python", "script")
    assert meta["id"] == f"tester/{build.kernel_dir.name}" and (build.kernel_dir / meta["code_file"]).is_file()
    assert meta["competition_sources"] == [COMPETITION]
    datasets = {json.loads((d / "dataset-metadata.json").read_text())["id"] for d in (build.code_dir, build.models_dir)}
    assert set(meta["dataset_sources"]) == datasets == {f"tester/{build.code_dir.name}", f"tester/{build.models_dir.name}"}
    wheels = {p.name.split("-")[0].replace("_", "-") for p in (build.code_dir / "wheels").glob("*.whl")}
    assert wheels == set(BUNDLED_PACKAGES)
    assert set(build.sizes) == {build.kernel_dir.name, build.code_dir.name, build.models_dir.name}


def _weights_in(models_dir: Path) -> set[str]:
    return {str(p.relative_to(models_dir)) for p in models_dir.rglob("*.safetensors")}


def test_models_dataset_holds_exactly_the_blends_weights(built, trained_run, tmp_path):
    models = built["build"].models_dir
    trained = trained_run["out"] / "trained_models"
    expected = {str(p.relative_to(trained.parent)) for p in trained.glob("*/*/fold*/best.safetensors")}
    # spinal: both backbones (3 folds each); foraminal, subarticular: lite0 (3 folds); the three slice
    # locators' (the levels', the foramina's, the recesses') 3 folds each
    assert len(expected) == 7 * 3
    assert _weights_in(models) == expected
    for group in ("foraminal", "subarticular"):  # the offsets locators
        assert (models / "trained_models" / "localizer" / group / "offsets.json").is_file()
    assert (models / "oof" / "blend.json").is_file() and (models / MODELS_MARKER).is_file()
    marker = json.loads((models / MODELS_MARKER).read_text())
    assert list(marker["groups"]) == ["spinal", "foraminal", "subarticular"]
    assert set(marker["groups"]["spinal"]["backbones"]) == {"efficientnet_lite0", "efficientnet_lite0_wide"}
    assert marker["groups"]["foraminal"]["backbones"] == ["efficientnet_lite0"]
    assert {p.name for p in (models / "configs").iterdir()} == {
        "efficientnet_lite0-spinal.yaml", "efficientnet_lite0_wide-spinal.yaml", "efficientnet_lite0-foraminal.yaml",
        "efficientnet_lite0-subarticular.yaml"}
    assert not list(models.rglob("last.pt"))  # resumable training state stays home

    # A blend that gives one backbone no spinal weight: that backbone's spinal weights stay out.
    out = _blend_output(trained_run, tmp_path / "out", weights=[0.0, 1.0])
    only_wide = build_kernel(out, username="tester", offline=True).models_dir
    assert {tuple(p.split("/")[1:3]) for p in _weights_in(only_wide)} == {
        ("efficientnet_lite0_wide", "spinal"), ("efficientnet_lite0", "foraminal"), ("efficientnet_lite0", "subarticular"),
        ("localizer", "spinal"), ("localizer", "foraminal"), ("localizer", "subarticular")}

    # The cut for the time limit: one fold per (backbone, group), the locators whole.
    one_fold = build_kernel(out, kernels_dir=tmp_path / "one-fold", username="tester", offline=True,
                            folds_per_model=1).models_dir
    weights = _weights_in(one_fold)
    graders = [w for w in weights if "/localizer/" not in w]
    assert len(graders) == 3 and all("/fold0/" in w for w in graders)
    assert len(weights) - len(graders) == 9  # the three slice locators keep their three folds each


def test_kernel_runs_offline_in_a_kaggle_like_environment_and_matches_the_local_submission(built, trained_run, tmp_path):
    submission, _ = run_kernel_locally(built["build"].kernel_dir, trained_run["data"], tmp_path / "kaggle")
    log = (tmp_path / "kaggle" / "kernel.log").read_text()
    assert "s per study" in log and "network unreachable" not in log
    env_python = tmp_path / "kaggle" / "env" / "bin" / "python"
    probe = subprocess.run([str(env_python), "-c", "import importlib.util as u; print(u.find_spec('iterstrat'), "
                            "u.find_spec('spinegrade').origin)"], capture_output=True, text=True, check=True).stdout
    assert probe.startswith("None") and str(tmp_path) in probe  # only the image's packages and the kernel's wheels

    predict_split(trained_run["data"], "test", built["out"], blends=load_blends(built["out"]),
                  out=tmp_path / "local.csv")  # what `make submission` writes for these models
    kernel, local = pd.read_csv(submission), pd.read_csv(tmp_path / "local.csv")
    assert list(kernel["row_id"]) == list(local["row_id"])
    np.testing.assert_allclose(kernel[list(PROBABILITY_COLUMNS)].to_numpy(),
                               local[list(PROBABILITY_COLUMNS)].to_numpy(), atol=1e-6)


def test_kernel_writes_a_complete_prior_submission_when_the_models_are_missing(trained_run, tmp_path, logged):
    inputs = tmp_path / "input"
    inputs.mkdir()
    (inputs / COMPETITION).symlink_to(trained_run["data"])
    out = run_kernel("absent-models", input_root=inputs, working=tmp_path / "working")
    frame = pd.read_csv(out)
    assert len(frame) == 5 * 25 and np.allclose(frame[list(PROBABILITY_COLUMNS)].sum(axis=1), 1)
    assert any("prediction failed" in line for line in logged())
    status = json.loads((tmp_path / "working" / STATUS_FILE).read_text())
    assert "FileNotFoundError" in status["fallback"] and MODELS_MARKER in status["fallback"]


def test_the_rehearsal_fails_out_loud_when_a_group_got_no_model_row(built, trained_run, tmp_path):
    """The Kaggle script exits 0 whatever happens (a kernel that crashes scores nothing); `kernel-run`
    reads what it says of its run and fails, naming why, when a blended group graded no study at all:
    here every test study's Axial T2 series is listed under another description."""
    data = tmp_path / "data"
    data.mkdir()
    for entry in trained_run["data"].iterdir():
        if entry.name != "test_series_descriptions.csv":
            (data / entry.name).symlink_to(entry)
    listed = pd.read_csv(trained_run["data"] / "test_series_descriptions.csv")
    listed["series_description"] = listed["series_description"].replace({"Axial T2": "Axial T1"})
    listed.to_csv(data / "test_series_descriptions.csv", index=False)
    inputs = tmp_path / "input"
    inputs.mkdir()
    (inputs / COMPETITION).symlink_to(data)
    (inputs / "models").symlink_to(built["build"].models_dir)
    run_kernel("models", input_root=inputs, working=tmp_path / "working")  # what the Kaggle script calls
    with pytest.raises(SpinegradeError, match="exited 0 and wrote .*submission.csv, but no model row at all for the "
                                              "subarticular group"):
        check_kernel_status(tmp_path / "working", tmp_path / "kernel.log")  # what `kernel-run` reads after it
    frame = pd.read_csv(tmp_path / "working" / "submission.csv")
    assert len(frame) == 5 * 25  # the submission is there all the same
    assert json.loads((tmp_path / "working" / STATUS_FILE).read_text())["fallback"] is None


def _make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    venv = Path(sys.prefix)
    return subprocess.run(["make", "-s", "-C", str(ROOT), "-o", str(venv / ".installed"), f"VENV={venv}", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_make_upload_dry_run_prints_the_kaggle_commands(built):
    result = _make("upload", "DRY_RUN=1", f"KERNELS_DIR={built['build'].kernel_dir.parent}")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()  # the command logs its results on stderr
    assert any(line.startswith("kaggle kernels push -p ") for line in lines)
    for dataset in (built["build"].code_dir, built["build"].models_dir):
        assert any(f"kaggle datasets create -p {dataset}" in line for line in lines)
        assert any(f"kaggle datasets version -p {dataset}" in line for line in lines)


def test_upload_without_credentials_stops_with_one_line(built, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(HOME=str(tmp_path), KAGGLE_CONFIG_DIR=str(tmp_path / "no-kaggle"))
    result = _make("upload", f"KERNELS_DIR={built['build'].kernel_dir.parent}", env=env)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("spinegrade")]
    assert len(errors) == 1 and "no Kaggle credentials" in errors[0] and "Traceback" not in result.stderr


def test_kernel_without_its_code_dataset_still_writes_a_valid_submission(built, trained_run, tmp_path):
    inputs = tmp_path / "input"
    inputs.mkdir()
    (inputs / COMPETITION).symlink_to(trained_run["data"])  # the models and code datasets not attached
    script = next(built["build"].kernel_dir.glob("*.py"))
    env = {**os.environ, "KAGGLE_INPUT": str(inputs), "KAGGLE_WORKING": str(tmp_path / "working")}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "is not attached" in result.stdout
    frame = pd.read_csv(tmp_path / "working" / "submission.csv")
    assert len(frame) == 5 * 25 and np.allclose(frame[list(PROBABILITY_COLUMNS)].to_numpy(), 1 / 3)
    with pytest.raises(SpinegradeError, match="fell back on the training prior .*dataset is not attached"):
        check_kernel_status(tmp_path / "working", tmp_path / "kernel.log")


def test_the_project_wheel_holds_exactly_the_package_s_modules(tmp_path):
    """A module left in the checkout's build/ folder by an older version (setuptools never deletes
    from it) must not ship in the kernel's wheel."""
    import zipfile

    from spinegrade.kernel.wheels import PROJECT_ROOT, build_project_wheel

    stale = PROJECT_ROOT / "build" / "lib" / "spinegrade" / "removed_long_ago.py"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("raise ImportError('an old module')\n")
    try:
        wheel = build_project_wheel(tmp_path)
    finally:
        stale.unlink()
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    package = PROJECT_ROOT / "src"
    expected = {str(p.relative_to(package)) for p in (package / "spinegrade").rglob("*.py")}
    assert shipped == expected
