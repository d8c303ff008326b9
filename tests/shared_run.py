"""The suite's shared trained run, built once per test session (``conftest.trained_run``).

Its parts train in two processes at once: the canal's locator, which the foramina's and the recesses'
locators start from, beside the grading models (which need no locator), then those two locators side
by side. Spawned, not forked: the parent may already hold torch's thread pool.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# the groups with more labelled slices (two sides; an axial slice per level and side) get fewer epochs
# (the fewest that keep each locator's out-of-fold figures clear of the tests' bounds: 16 foraminal epochs
# put 96 % of the foramina within a slice, 12 only 91 %; 25 spinal epochs leave the canal 6.6 mm off, and
# 40, trained channels-last in one thread, left a curved spine's L1/L2 three slices off)
LOCATOR_EPOCHS = {"spinal": 50, "foraminal": 16, "subarticular": 5}
SMALL = {"image_size": 64, "batch_size": 16, "num_workers": 0, "num_epochs": 5}


def _threads() -> None:
    """One thread in each of the two processes, on any machine: the run's numbers (and the bounds the tests
    hold its models to) do not then depend on how many cores the machine has."""
    import torch

    torch.set_num_threads(1)


def _locator(group: str, data: Path, folds: Path, out: Path) -> dict:
    from spinegrade.config import LocatorConfig
    from spinegrade.locators import train_locator

    _threads()
    return train_locator(group, LocatorConfig(image_size=64, num_epochs=LOCATOR_EPOCHS[group], batch_size=8), data,
                         folds, out, device="cpu")


def _graders(data: Path, folds: Path, out: Path) -> None:
    """Two EfficientNet-Lite0 configs (48 and 72 mm crops) on the spinal group, one on each of the others."""
    from spinegrade.config import load_config
    from spinegrade.train import train_fold

    _threads()
    for name in ("efficientnet_lite0", "efficientnet_lite0_wide"):
        config = load_config(name, SMALL)
        for fold in range(3):
            train_fold(config, data, folds, out, fold)
    # the subarticular narrowing is the subtlest: it gets two more epochs
    # the foraminal model reads three slices as channels and the subarticular model five (each group's only
    # backbone, so every later stage, the blend and the kernel included, runs them)
    # the foraminal model also grades with the mirror (test_time_flip)
    for group, epochs, slices in (("foraminal", 3, 3), ("subarticular", 5, 5)):
        config = load_config("efficientnet_lite0", {**SMALL, "num_epochs": epochs, "slices": slices,
                                                    "test_time_flip": group == "foraminal"}, group=group)
        for fold in range(3):
            train_fold(config, data, folds, out, fold)


def build_shared_run(root: Path) -> dict:
    """30+5 synthetic studies, 3 folds, every group's locator and grading models, under ``root``."""
    from spinegrade.data.folds import make_folds, write_csv_atomic
    from spinegrade.data.index import build_index
    from spinegrade.data.synthetic import SynthSettings, write_dataset

    data = root / "data"
    write_dataset(data, SynthSettings(studies=30, test_studies=5, seed=21, image_size=(96, 128)))
    folds = root / "folds.csv"
    write_csv_atomic(make_folds(build_index(data, check_images=False).labels_wide(), n_folds=3, seed=0), folds)
    out = root / "out"
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        graders = pool.submit(_graders, data, folds, out)
        spinal = pool.submit(_locator, "spinal", data, folds, out).result()
        others = {g: pool.submit(_locator, g, data, folds, out) for g in ("foraminal", "subarticular")}
        graders.result()
        reports = {"spinal": spinal, **{g: f.result() for g, f in others.items()}}
    return {"data": data, "folds": folds, "out": out, "answers": root / "data-answers",
            "locator_report": reports["spinal"], "foramen_report": reports["foraminal"],
            "subarticular_report": reports["subarticular"]}
