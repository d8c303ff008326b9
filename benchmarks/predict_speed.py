"""Prediction speed: seconds per study from DICOM files to graded levels, on this machine.

Runs `predict_split` on a split several times and prints the median seconds per study (reading +
locating, grading, writing), the one-off cost of loading the fold models and locators, and the projection to a
hidden test set of several hundred studies. It grades as `make submission` does: with the run's blend
(a backbone of weight 0 is not run) when there is one; ``--all-backbones``: every trained backbone. The last line is JSON. Defaults point at `make demo`'s
outputs.

    python benchmarks/predict_speed.py [--data-dir D] [--output-dir OUT] [--repeats 3] [--split test] [--profile 25]

``--profile N`` runs the split once more under cProfile and prints its N costliest functions by their
own time (the machine's load average and torch's thread count are recorded either way).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import add_run_arguments, logged_lines, report
from spinegrade.blend import load_blends
from spinegrade.layout import RunLayout
from spinegrade.submit import predict_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, split=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--projected-studies", type=int, default=500)
    parser.add_argument("--profile", type=int, default=0, help="also profile one run: its N costliest functions")
    parser.add_argument("--all-backbones", action="store_true", help="every trained backbone, not the blend")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    layout = RunLayout(args.output_dir)
    blends = load_blends(args.output_dir) if layout.blend_json.is_file() and not args.all_backbones else None
    backbones = None if blends else layout.backbones()
    used = (sorted({n for b in blends.values() for n, w in zip(b.backbones, b.weights) if w > 0}) if blends
            else backbones)
    totals, locate, grade, fixed = [], [], [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        with logged_lines() as lines, tempfile.TemporaryDirectory() as scratch:  # the run is only read
            _, submission = predict_split(args.data_dir, args.split, args.output_dir, backbones, blends=blends,
                                          out=Path(scratch) / "benchmark.csv", predictions_dir=scratch)
        elapsed = time.perf_counter() - started
        studies = submission["row_id"].str.split("_").str[0].nunique()
        model_lines = [l for l in lines if " fold models loaded in " in l]
        # One line per located group ("spinal: located 5 of 5 studies (0.12 s per study: reading and
        # locating; its models loaded in 0.40 s)"): the locators' loading is paid once too.
        summaries = [l for l in lines if ": located " in l and " s per study" in l]
        assert summaries, "predict_split logged no locating summary"
        # (a version before the locators' loading was logged apart has no " loaded in " on its summaries:
        # its loading stays in its per-study figure, as it reported it)
        load = sum(float(l.split(" loaded in ")[1].split(" s")[0]) for l in model_lines + summaries if " loaded in " in l)
        fixed.append(load)
        totals.append((elapsed - load) / studies)
        locate.append(sum(float(l.split("(")[1].split(" s per")[0]) for l in summaries))
        grade.append(sum(float(l.split(" studies in ")[1].split(" s")[0]) for l in model_lines) / studies)
    result = {
        "benchmark": "predict_speed", "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only'}",
        "backbones": used, "blend": blends is not None, "studies": studies, "repeats": args.repeats,
        "seconds_per_study_median": statistics.median(totals),
        "model_loading_seconds_once_median": statistics.median(fixed),
        "read_and_locate_seconds_per_study_median": statistics.median(locate),
        "grade_seconds_per_study_median": statistics.median(grade),
        "projected_minutes_for_studies": {str(args.projected_studies): (statistics.median(fixed) + statistics.median(totals)
                                                                         * args.projected_studies) / 60},
        "load_average_before": load_before, "torch_threads": torch.get_num_threads(),
    }
    if args.profile:
        result["profile_top"] = _profile(args, backbones, blends, args.profile)
    print(f"{result['seconds_per_study_median']:.3f} s per study (median of {args.repeats}; read+locate "
          f"{result['read_and_locate_seconds_per_study_median']:.3f}, grade {result['grade_seconds_per_study_median']:.3f}), "
          f"plus {result['model_loading_seconds_once_median']:.1f} s once to load the models, "
          f"with {', '.join(used)}{' (the blend)' if blends else ''}; {args.projected_studies} studies: "
          f"{result['projected_minutes_for_studies'][str(args.projected_studies)]:.1f} min")
    report(result)


def _profile(args, backbones: list[str] | None, blends, top: int) -> list[str]:
    """One more run of the split under cProfile: its ``top`` functions by own time, as printed lines."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    with logged_lines(), tempfile.TemporaryDirectory() as scratch:
        profiler.enable()
        predict_split(args.data_dir, args.split, args.output_dir, backbones, blends=blends, out=Path(scratch) / "profile.csv",
                      predictions_dir=scratch)
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    print("\n".join(lines))
    return lines[-top - 1:]


if __name__ == "__main__":
    main()
