"""Command-line behaviour a user meets first: one-line errors, no tracebacks, downloads that explain themselves."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "spinegrade.cli", *args], capture_output=True, text=True, env=env)


def test_download_without_credentials_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env["HOME"] = str(tmp_path)
    result = _run("download", "--dest", str(tmp_path / "input"), env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no Kaggle credentials" in result.stderr
    assert not (tmp_path / "input").exists()


def test_synth_index_folds_end_to_end(tmp_path):
    data = tmp_path / "data"
    assert _run("synth", str(data), "--studies", "5", "--test-studies", "1", "--image-size", "64", "80").returncode == 0
    report = _run("index", "--data-dir", str(data))
    assert report.returncode == 0 and "studies: 5" in report.stdout and "problems: none" in report.stdout
    folds = _run("folds", "--data-dir", str(data), "--n-folds", "2", "--out", str(tmp_path / "folds.csv"))
    assert folds.returncode == 0 and (tmp_path / "folds.csv").is_file()


def test_published_entry_point_takes_the_same_flags(synth_dataset, tmp_path):
    """``python train_models.py`` with the published flags trains, and the flags reach the fold's settings."""
    import yaml

    from spinegrade.data.folds import make_folds, write_csv_atomic
    from spinegrade.data.index import build_index

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    folds = tmp_path / "folds.csv"
    write_csv_atomic(make_folds(build_index(synth_dataset, check_images=False).labels_wide(), n_folds=2, seed=0), folds)
    result = subprocess.run([sys.executable, str(root / "train_models.py"), "--models", "resnet18",
                             "--batch_size", "8", "--num_epochs", "1", "--freeze_backbone", "False", "--fold", "0",
                             "--pretrained", "false", "--image_size", "64", "--data-dir", str(synth_dataset),
                             "--folds", str(folds), "--device", "cpu"], capture_output=True, text=True,
                            cwd=tmp_path)  # the default --output-dir
    assert result.returncode == 0, result.stderr[-2000:]
    saved = yaml.safe_load((tmp_path / "trained_models" / "resnet18" / "spinal" / "fold0" / "config.yaml").read_text())
    assert (saved["batch_size"], saved["num_epochs"], saved["freeze_backbone"]) == (8, 1, False)
    missing = subprocess.run([sys.executable, str(root / "train_models.py"), "--models", "no_such_backbone"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2 and "no config 'no_such_backbone'" in missing.stderr
    assert "Traceback" not in missing.stderr
