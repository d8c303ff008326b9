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
