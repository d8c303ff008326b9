"""A group's recipe, one factor at a time: the same grading model trained once per value of one setting.

For each group and each value of ``--factor`` (any training setting: ``slices``, ``crop_mm``,
``image_size``, ``test_time_flip``, ``num_epochs``...), the demo's grading model of that group
(EfficientNet-Lite0, the Makefile's demo settings for the group, everything else equal) is trained
on every fold of the demo's data, then scored out of fold at the labelled points and end to end
(each held-out study located by the demo run's locators and graded by the fold's model). Printed,
and written as JSON (``recipe_<factor>.json``): per group and value, the group's competition terms
both ways, the training seconds (the folds' epochs summed) and each value's terms over the first
value's. ``--set`` holds other settings for every value (a recipe chosen so far: the combination
of the winners is measured, not assumed). The models land under ``--scratch``; a value already trained there is read back.

    python benchmarks/recipe.py --factor slices --values 1 3 5 [--groups subarticular foraminal spinal]
        [--set crop_mm=24 ...: settings held for every value, a recipe chosen so far]
        [--data-dir D] [--folds F] [--output-dir runs/demo] [--scratch runs/recipe] [--num-epochs N --image-size S]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from common import DEMO_DATA, DEMO_FOLDS, DEMO_GRADING, DEMO_OUTPUT, RESULTS, TERMS, report
from spinegrade.config import load_config
from spinegrade.constants import GROUPS
from spinegrade.data.folds import read_folds
from spinegrade.layout import RunLayout
from spinegrade.metrics import competition_score
from spinegrade.oof import parsed, read_oof
from spinegrade.evaluate import located_oof
from spinegrade.train import train_fold


def terms(frame: pd.DataFrame, group: str) -> dict[str, float]:
    scores = competition_score(frame)
    return {t: float(scores[t]) for t in TERMS[group] if t in scores}


def measure(group: str, setting: dict, name: str, data: Path, folds: Path, demo: Path, scratch: Path) -> dict:
    """Train (or read back) the group's demo model with ``setting`` changed; its terms both ways."""
    run = scratch / group
    localizer = RunLayout(run).trained_models / "localizer"
    if not localizer.exists():  # the demo's locators place the points end to end
        localizer.parent.mkdir(parents=True, exist_ok=True)
        localizer.symlink_to((RunLayout(demo).trained_models / "localizer").resolve(), target_is_directory=True)
    config = load_config("efficientnet_lite0", {**DEMO_GRADING[group], **setting, "name": name}, group=group)
    for fold in sorted(read_folds(folds)["fold"].unique()):
        train_fold(config, data, folds, run, int(fold), resume=True)
    layout = RunLayout(run)
    seconds = sum(pd.read_csv(d / "metrics.csv")["seconds"].sum() for d in layout.finished_fold_dirs(name, group))
    located = parsed(located_oof(run, data, folds, [name], group, device="cpu")[name])
    return {"labelled": terms(read_oof(layout, name, group), group), "end_to_end": terms(located, group),
            "training_seconds": float(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", required=True, help="the training setting compared (a TrainConfig field)")
    parser.add_argument("--values", nargs="+", required=True, help="its values; the first is the reference")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--data-dir", type=Path, default=DEMO_DATA)
    parser.add_argument("--folds", type=Path, default=DEMO_FOLDS)
    parser.add_argument("--output-dir", type=Path, default=DEMO_OUTPUT, help="the run whose locators place the points")
    parser.add_argument("--scratch", type=Path, default=Path("runs/recipe"))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings held for every value (a recipe chosen so far), named in the models and the file")
    parser.add_argument("--num-epochs", type=int, help="in place of the demo's (a quick check)")
    parser.add_argument("--image-size", type=int, help="in place of the demo's (a quick check)")
    args = parser.parse_args()
    held = dict(item.split("=", 1) for item in args.set)
    quick = {k: v for k, v in (("num_epochs", args.num_epochs), ("image_size", args.image_size)) if v is not None}
    suffix = "".join(f"_{k}{v}" for k, v in held.items())
    result = {"benchmark": "recipe", "factor": args.factor, "held": held, "settings": DEMO_GRADING, "overrides": quick,
              "groups": {}}
    for group in args.groups:
        rows = {v: measure(group, {**quick, **held, args.factor: v}, f"lite0_{args.factor}{v}{suffix}", args.data_dir,
                           args.folds, args.output_dir, args.scratch)
                for v in args.values}
        reference = rows[args.values[0]]
        for v, row in rows.items():
            row["over_reference"] = {way: {t: row[way][t] / reference[way][t] for t in row[way]}
                                     for way in ("labelled", "end_to_end")}
            print(f"{group}, {args.factor} {v}: labelled {row['labelled']}, end to end {row['end_to_end']}, "
                  f"{row['training_seconds']:.0f} s training")
        result["groups"][group] = rows
    report(result, RESULTS / f"recipe_{args.factor}{suffix}.json")


if __name__ == "__main__":
    main()
