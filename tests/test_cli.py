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


def test_published_entry_point_takes_the_same_flags(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "train_models.py"), "--models", "no_such_backbone",
                             "--batch_size", "8", "--freeze_backbone", "False"], capture_output=True, text=True,
                            cwd=tmp_path)  # the default --output-dir, where the command's log file goes
    assert result.returncode == 2 and "no config 'no_such_backbone'" in result.stderr
    assert "Traceback" not in result.stderr
