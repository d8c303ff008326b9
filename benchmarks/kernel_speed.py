"""Kaggle kernel run time, rehearsed here: the built kernel run end to end in a Kaggle-like environment.

Builds the kernel of OUTPUT's blend (offline), runs it --repeats times against DATA's test split and
splits each run into the fixed cost (starting Python, installing the bundled wheels, imports, loading the
models) and the cost per study, from two run sizes: all test studies, and the first half of them. Prints the
medians and the projection to a hidden test set of --projected-studies; the last line is JSON. Defaults point
at `make demo`'s outputs.

    python benchmarks/kernel_speed.py [--data-dir D] [--output-dir OUT] [--repeats 3] [--projected-studies 500]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import pandas as pd

from common import add_run_arguments, report
from spinegrade.kernel.build import build_kernel
from spinegrade.kernel.local import kaggle_like_environment, run_kernel_locally


def half_split(data_dir: Path, target: Path) -> Path:
    """A view of ``data_dir`` whose test split lists only its first half of studies (files linked)."""
    target.mkdir(parents=True)
    for entry in data_dir.iterdir():
        if entry.name not in ("test_series_descriptions.csv", "sample_submission.csv"):
            (target / entry.name).symlink_to(entry.resolve())
    series = pd.read_csv(data_dir / "test_series_descriptions.csv")
    keep = sorted(series["study_id"].unique())[: max(1, series["study_id"].nunique() // 2)]
    series[series["study_id"].isin(keep)].to_csv(target / "test_series_descriptions.csv", index=False)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--projected-studies", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build = build_kernel(args.output_dir, tmp / "kernels", username="benchmark", offline=True)
        python = kaggle_like_environment(tmp / "env")
        runs = {"all": args.data_dir, "half": half_split(args.data_dir, tmp / "half")}
        seconds: dict[str, list[float]] = {k: [] for k in runs}
        studies: dict[str, int] = {}
        for _ in range(args.repeats):
            for key, data in runs.items():
                root = tmp / f"run-{key}"
                shutil.rmtree(root / "working", ignore_errors=True)
                _, wall = run_kernel_locally(build.kernel_dir, data, root, python=python)
                studies[key] = json.loads((root / "working" / "kernel_timing.json").read_text())["studies"]
                seconds[key].append(wall)
    whole, half = statistics.median(seconds["all"]), statistics.median(seconds["half"])
    per_study = (whole - half) / max(studies["all"] - studies["half"], 1)
    fixed = whole - per_study * studies["all"]
    projected = fixed + per_study * args.projected_studies
    print(f"kernel, {studies['all']} studies: median {whole:.1f} s; {studies['half']} studies: {half:.1f} s")
    print(f"per study {per_study:.2f} s; fixed cost (Python, pip install of the bundled wheels, imports, models) {fixed:.1f} s")
    print(f"projected for {args.projected_studies} studies: {projected / 60:.1f} min on this machine")
    report({"benchmark": "kernel_speed", "studies": studies["all"], "repeats": args.repeats,
            "kernel_seconds_median": whole, "half_seconds_median": half, "seconds_per_study": per_study,
            "fixed_seconds": fixed, "projected_studies": args.projected_studies,
            "projected_minutes": projected / 60, "sizes_mb": {k: v / 1e6 for k, v in build.sizes.items()}})


if __name__ == "__main__":
    main()
