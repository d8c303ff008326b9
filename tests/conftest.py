"""Shared fixtures: one small synthetic dataset per test session, real DICOM files throughout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from spinegrade.data.synthetic import SynthSettings, write_dataset

SHARED_METADATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna-2024-metadata"


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """16 training and 3 test studies, images 128 to 176 pixels; shared read-only by the tests."""
    root = tmp_path_factory.mktemp("synth")
    data_dir = root / "data"
    write_dataset(data_dir, SynthSettings(studies=16, test_studies=3, seed=7, image_size=(128, 176)))
    return data_dir


@pytest.fixture
def dataset_copy(synth_dataset, tmp_path) -> Path:
    """A private copy of the synthetic dataset that a test may damage."""
    target = tmp_path / "data"
    shutil.copytree(synth_dataset, target)
    return target


@pytest.fixture
def real_metadata() -> Path:
    if not (SHARED_METADATA / "train.csv").is_file():
        pytest.skip(f"real RSNA metadata not available at {SHARED_METADATA}")
    return SHARED_METADATA


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A whole small run: 30+5 synthetic studies, 3 folds, every group's locator (the canal, the foramina
    and the lateral recesses, each with its slice locator), two EfficientNet-Lite0 configs (48 and 72 mm crops)
    on the spinal group and one on each of the foraminal and subarticular groups (reading three and five
    neighbouring slices as channels), every fold.

    Settings are tiny (CPU, seconds per fold) but every stage is the real one.
    """
    from spinegrade.config import LocatorConfig, load_config
    from spinegrade.data.folds import make_folds, write_csv_atomic
    from spinegrade.data.index import build_index
    from spinegrade.locators import train_locator
    from spinegrade.train import train_fold

    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    write_dataset(data, SynthSettings(studies=30, test_studies=5, seed=21, image_size=(96, 128)))
    folds = root / "folds.csv"
    write_csv_atomic(make_folds(build_index(data, check_images=False).labels_wide(), n_folds=3, seed=0), folds)
    out = root / "out"
    # the groups with more labelled slices (two sides; an axial slice per level and side) get fewer epochs
    # (the fewest that keep each locator's out-of-fold figures clear of the tests' bounds: 16 foraminal epochs
    # put 96 % of the foramina within a slice, 12 only 91 %; 25 spinal epochs leave the canal 6.6 mm off)
    epochs = {"spinal": 40, "foraminal": 16, "subarticular": 5}
    reports = {group: train_locator(group, LocatorConfig(image_size=64, num_epochs=n, batch_size=8), data, folds, out,
                                    device="cpu")
               for group, n in epochs.items()}
    small = {"image_size": 64, "batch_size": 16, "num_workers": 0, "num_epochs": 5}
    for name in ("efficientnet_lite0", "efficientnet_lite0_wide"):
        config = load_config(name, small)
        for fold in range(3):
            train_fold(config, data, folds, out, fold)
    # the subarticular narrowing is the subtlest: it gets two more epochs
    # the foraminal model reads three slices as channels and the subarticular model five (each group's only
    # backbone, so every later stage, the blend and the kernel included, runs them)
    # the foraminal model also grades with the mirror (test_time_flip)
    for group, epochs, slices in (("foraminal", 3, 3), ("subarticular", 5, 5)):
        config = load_config("efficientnet_lite0", {**small, "num_epochs": epochs, "slices": slices,
                                                    "test_time_flip": group == "foraminal"}, group=group)
        for fold in range(3):
            train_fold(config, data, folds, out, fold)
    return {"data": data, "folds": folds, "out": out, "answers": root / "data-answers", "locator_report": reports["spinal"],
            "foramen_report": reports["foraminal"], "subarticular_report": reports["subarticular"]}


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def shared_run_untouched(request):
    """A test reads the shared trained run and never writes into it (a test that writes works on its own
    copy), so no result depends on which test ran first."""
    if "trained_run" not in request.fixturenames:
        yield
        return
    run = request.getfixturevalue("trained_run")["out"]
    before = _listing(run)
    yield
    after = _listing(run)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the test wrote into the shared trained run: {', '.join(changed[:5])}"


@pytest.fixture
def own_run(trained_run, tmp_path) -> Path:
    """A copy of the shared trained run, for a test that writes into it (resumable state and cache left out)."""
    target = tmp_path / "own-run"
    shutil.copytree(trained_run["out"], target, ignore=shutil.ignore_patterns("last.pt", "cache"))
    return target


@pytest.fixture
def logged(caplog):
    """``logged()``: the messages the ``spinegrade`` logger emitted so far in this test (INFO and up)."""
    import logging

    caplog.set_level(logging.INFO, logger="spinegrade")
    return lambda: [r.getMessage() for r in caplog.records if r.name.startswith("spinegrade")]
