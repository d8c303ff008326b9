"""Nothing lost to a crash: a training process killed with SIGKILL part-way, resumed with --resume,
ends where an uninterrupted run ends; a finished fold is never trained again. (The killed grading
model reads five neighbouring slices as channels, so that path is resumed too.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from curves import scalars
from spinegrade.data.folds import make_folds, write_csv_atomic
from spinegrade.data.index import build_index
from spinegrade.layout import RunLayout


def fold_dir(out, name, fold):
    return RunLayout(out).fold_dir(name, "spinal", fold)

CONFIG = """name: killable
backbone: resnet18
pretrained: false
input: crop
image_size: 64
batch_size: 16
num_epochs: 3
learning_rate: 0.001
num_workers: 0
slices: 5
"""


def _command(data, folds, out, config, *extra):
    return [sys.executable, "-m", "spinegrade.cli", "train", "--models", str(config), "--fold", "0", "--data-dir",
            str(data), "--folds", str(folds), "--output-dir", str(out), "--device", "cpu", *extra]


@pytest.fixture
def small_run(synth_dataset, tmp_path) -> tuple:
    """The suite's 16-study dataset in two folds: enough for a kill to land mid-training, and half the
    shared run's training time."""
    folds = tmp_path / "two-folds.csv"
    write_csv_atomic(make_folds(build_index(synth_dataset, check_images=False).labels_wide(), n_folds=2, seed=0), folds)
    return synth_dataset, folds


def test_sigkill_mid_training_then_resume_reaches_the_uninterrupted_result(small_run, tmp_path):
    data, folds = small_run
    config = tmp_path / "killable.yaml"
    config.write_text(CONFIG)
    straight = subprocess.run(_command(data, folds, tmp_path / "straight", config), capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]

    out = tmp_path / "killed"
    metrics = fold_dir(out, "killable", 0) / "metrics.csv"
    process = subprocess.Popen(_command(data, folds, out, config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (metrics.parent / "last.pt").is_file():  # the first epoch is saved: the kill lands in the second
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # mid-epoch 2, or mid-write: whatever instant it is
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (fold_dir(out, "killable", 0) / "done.json").exists()

    resumed = subprocess.run(_command(data, folds, out, config, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed after epoch" in resumed.stderr  # the command logs on stderr
    a = pd.read_csv(fold_dir(tmp_path / "straight", "killable", 0) / "metrics.csv")
    b = pd.read_csv(metrics)
    assert list(b["epoch"]) == [0, 1, 2]
    cols = ["train_loss", "val_loss", "val_accuracy", "val_competition"]
    pd.testing.assert_frame_equal(a[cols], b[cols], atol=1e-4, rtol=1e-4)
    curve = scalars(metrics.parent)["val/competition"]  # each epoch once, as metrics.csv has it
    assert [s for s, _ in curve] == [0, 1, 2] and np.allclose([v for _, v in curve], b["val_competition"], rtol=1e-6)
    oof_a = pd.read_csv(tmp_path / "straight" / "oof" / "killable" / "spinal" / "fold0.csv")
    oof_b = pd.read_csv(out / "oof" / "killable" / "spinal" / "fold0.csv")
    pd.testing.assert_frame_equal(oof_a, oof_b, atol=1e-4, rtol=1e-4)
    assert not [p for p in Path(out).rglob(".*") if p.is_file()]  # no temporary file left behind

    again = subprocess.run(_command(data, folds, out, config, "--resume"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "killable spinal fold 0: already trained" in again.stderr  # not retrained


def _locator_command(data, folds, out, *extra):
    return [sys.executable, "-m", "spinegrade.cli", "train-localizer", "--conditions", "spinal", "--data-dir", str(data),
            "--folds", str(folds), "--output-dir", str(out), "--device", "cpu", "--backbone", "resnet18", "--pretrained", "false",
            "--image_size", "64", "--batch_size", "4", "--num_epochs", "2", *extra]


def test_slice_locator_killed_mid_training_resumes_to_the_uninterrupted_result(small_run, tmp_path):
    """The locator trains through the same fold loop as the grading models: the same resume. Two
    folds of two epochs: the kill lands after fold 0's first epoch, the resume runs the rest."""
    data, folds = small_run
    straight = subprocess.run(_locator_command(data, folds, tmp_path / "straight"), capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]

    out = tmp_path / "killed"
    fold0 = RunLayout(out).locator_dir("spinal", existing=False) / "fold0"
    process = subprocess.Popen(_locator_command(data, folds, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (fold0 / "last.pt").is_file():  # fold 0's first epoch is saved: the kill lands after it
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (fold0 / "done.json").exists()
    assert not (fold0.parent / "slice_choice.json").exists()  # the locator as a whole is unfinished

    resumed = subprocess.run(_locator_command(data, folds, out, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed after epoch" in resumed.stderr
    for fold in range(2):
        a = pd.read_csv(tmp_path / "straight" / "trained_models" / "localizer" / "spinal" / f"fold{fold}" / "metrics.csv")
        b = pd.read_csv(fold0.parent / f"fold{fold}" / "metrics.csv")
        assert list(b["epoch"]) == [0, 1]
        cols = ["train_l1_pixels", "val_median_mm", "val_p90_mm"]
        pd.testing.assert_frame_equal(a[cols], b[cols], atol=1e-4, rtol=1e-4)
    oof_a = pd.read_csv(RunLayout(tmp_path / "straight").locator_oof("spinal"))
    oof_b = pd.read_csv(RunLayout(out).locator_oof("spinal"))
    pd.testing.assert_frame_equal(oof_a, oof_b, atol=1e-3, rtol=1e-4)
    assert not [p for p in Path(out).rglob(".*") if p.is_file()]

    again = subprocess.run(_locator_command(data, folds, out, "--resume"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "spinal: locator already trained" in again.stderr  # kept whole with --resume
    without_resume = subprocess.run(_locator_command(data, folds, out), capture_output=True, text=True, timeout=600)
    assert without_resume.returncode == 0 and "spinal locator fold 1: already trained" in without_resume.stderr
    assert "epoch 1/2" not in without_resume.stderr  # without --resume, finished folds are read back, not retrained
