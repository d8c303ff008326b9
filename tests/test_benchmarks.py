"""Benchmarks are scripts, not timed tests: this only checks that they run and print their JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_predict_speed_benchmark_runs(trained_run):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "predict_speed.py"), "--data-dir",
                             str(trained_run["data"]), "--output-dir", str(trained_run["out"]), "--repeats", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "predict_speed" and figures["studies"] == 5
    assert figures["seconds_per_study_median"] > 0


def test_kernel_speed_benchmark_runs(trained_run, tmp_path):
    from spinegrade.blend import run_blend

    if not (trained_run["out"] / "oof" / "blend.json").is_file():
        run_blend(trained_run["out"], trained_run["folds"], log=lambda *_: None)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_speed.py"), "--data-dir",
                             str(trained_run["data"]), "--output-dir", str(trained_run["out"]), "--repeats", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "kernel_speed" and figures["studies"] == 5
    assert figures["kernel_seconds_median"] > figures["half_seconds_median"] > 0
