"""Training time of the three locators against the grading models, on the same real-size studies.

Trains each group's slice locator and each group's grading model (the `efficientnet_lite0` config) on
every fold of a small real-size set for `--epochs` epochs each, with the default settings otherwise
(the locator at 256 pixels, all its layers; the grader at 128 pixels, the backbone's last 32 tensors),
and projects each to a whole run on `--project` studies with its default epochs and 5 folds:
preparation (decoding and rendering the locator's slices, the grader's crop cache) per study, plus
each epoch's seconds per training study, times the studies a fold trains on, its epochs and the folds.
Each epoch's seconds include its held-out evaluation, so the set is measured with as many folds as
the projected run (default 5: the same share held out); what is not an epoch (decoding, rendering,
building and loading each fold's model) counts as preparation, per study. The ratio to quote is the
locators' projected total over the grading models'. With `--profile`, one
group's locator training runs under cProfile and its top lines are printed. The last line is JSON.

    python benchmarks/training_time.py [--data-dir D] [--studies 16] [--image-size 384 512] [--epochs 1]
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import pstats
import tempfile
import time
from pathlib import Path

from common import add_data_arguments, benchmark_data, logged_lines, report

from spinegrade.config import LocatorConfig, load_config
from spinegrade.constants import GROUPS
from spinegrade.data.folds import make_folds, read_folds, write_csv_atomic
from spinegrade.data.index import build_index
from spinegrade.layout import RunLayout
from spinegrade.slice_locator_training import train_slice_locator
from spinegrade.train import train_fold

RUN_FOLDS = 5  # the projection's folds, as a real run's


def _epoch_seconds(folder: Path) -> list[tuple[int, float]]:
    """(fold, seconds of its epochs) for every fold folder under ``folder``."""
    out = []
    for metrics in sorted(folder.glob("fold*/metrics.csv")):
        with open(metrics) as f:
            out.append((int(metrics.parent.name[4:]), sum(float(r["seconds"]) for r in csv.DictReader(f))))
    return out


def _projection(total: float, per_fold: list[tuple[int, float]], train_studies: dict[int, int], studies: int,
                epochs: int, default_epochs: int, project: int) -> dict:
    """Preparation per study and an epoch's seconds per training study, measured; a run on ``project``
    studies with ``default_epochs`` and RUN_FOLDS folds, projected."""
    epoch_total = sum(s for _, s in per_fold)
    per_study_epoch = sum(s / epochs / train_studies[k] for k, s in per_fold) / len(per_fold)
    prepare_per_study = max(total - epoch_total, 0.0) / studies
    projected = (prepare_per_study * project
                 + per_study_epoch * project * (RUN_FOLDS - 1) / RUN_FOLDS * default_epochs * RUN_FOLDS)
    return {"seconds": round(total, 2), "epoch_seconds": round(epoch_total, 2),
            "prepare_seconds_per_study": round(prepare_per_study, 3),
            "epoch_seconds_per_training_study": round(per_study_epoch, 4), "default_epochs": default_epochs,
            "projected_minutes": round(projected / 60, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, studies=16, sizes=(384, 512))
    parser.add_argument("--folds", type=int, default=RUN_FOLDS,
                        help="folds of the measured set (as many as the projected run: the same share held out)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs measured per fold")
    parser.add_argument("--locator-size", type=int, default=LocatorConfig().image_size)
    parser.add_argument("--grader-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--project", type=int, default=160, help="studies of the projected run")
    parser.add_argument("--profile", choices=sorted(GROUPS), default=None,
                        help="this group's locator training under cProfile")
    parser.add_argument("--scratch", type=Path, default=None, help="where the set and the run go (default: a temporary folder)")
    args = parser.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="training-time-"))
    data = benchmark_data(args, scratch)
    folds_path, out = scratch / "folds.csv", scratch / "run"
    write_csv_atomic(make_folds(build_index(data, check_images=False).labels_wide(), n_folds=args.folds, seed=0),
                     folds_path)
    folds = read_folds(folds_path)
    studies = len(folds)
    train_studies = {k: int((folds["fold"] != k).sum()) for k in range(args.folds)}
    layout = RunLayout(out)
    locators, graders, profile = {}, {}, ""
    for group in GROUPS:
        config = LocatorConfig(image_size=args.locator_size, num_epochs=args.epochs)
        profiler = cProfile.Profile() if args.profile == group else None
        started = time.perf_counter()
        with logged_lines():
            if profiler:
                profiler.enable()
            train_slice_locator(config, data, folds_path, out, device="cpu", group=group)
            if profiler:
                profiler.disable()
        total = time.perf_counter() - started
        locators[group] = _projection(total, _epoch_seconds(layout.locator_dir(group, existing=False)), train_studies,
                                      studies, args.epochs, LocatorConfig().num_epochs, args.project)
        if profiler:
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
            profile = text.getvalue()
        print(f"{group} locator: {locators[group]}", flush=True)
    for group in GROUPS:
        overrides = {"num_epochs": args.epochs, **({"image_size": args.grader_size} if args.grader_size else {})}
        config = load_config("efficientnet_lite0", overrides, group=group)
        default_epochs = load_config("efficientnet_lite0", group=group).num_epochs
        started = time.perf_counter()
        with logged_lines():
            for fold in range(args.folds):
                train_fold(config, data, folds_path, out, fold, device="cpu")
        total = time.perf_counter() - started
        graders[group] = _projection(total, _epoch_seconds(layout.fold_dir(config.name, group, 0, existing=False).parent),
                                     train_studies, studies, args.epochs, default_epochs, args.project)
        print(f"{group} grader: {graders[group]}", flush=True)
    if profile:
        print(profile)
    locator_total = sum(r["projected_minutes"] for r in locators.values())
    grader_total = sum(r["projected_minutes"] for r in graders.values())
    report({"benchmark": "training_time", "studies": studies, "folds": args.folds, "epochs": args.epochs,
            "image_size": list(args.synth_size) if args.data_dir is None else None,
            "locator_size": args.locator_size, "project_studies": args.project, "locators": locators,
            "graders": graders, "locators_projected_minutes": round(locator_total, 1),
            "graders_projected_minutes": round(grader_total, 1),
            "locators_over_graders_ratio": round(locator_total / max(grader_total, 1e-9), 2)})


if __name__ == "__main__":
    main()
