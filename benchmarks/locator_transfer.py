"""Do locators that read the image find the points of spines they never trained on?

Locators are trained on the straight twin of a curved dataset (the same studies, seed and grades,
``spinegrade synth --straight``), then each study is located out of fold on the curved studies and on
the straight ones, and graded by the same grading models (a run's ``trained_models``, trained on the
curved studies' labelled points). Printed, and written as JSON: per group, the locator's out-of-fold
report on each set (slice within one, point error) and the end-to-end competition term on each set,
with their ratio (curved over straight: above 1.15 means the locators do not carry over to curved
spines). Defaults point at ``make demo``'s data, folds and outputs; the locators get the demo's settings.

    python benchmarks/locator_transfer.py [--data-dir D] [--folds F] [--output-dir OUT] [--scratch runs/transfer]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import DEMO_DATA, DEMO_FOLDS, DEMO_OUTPUT, TERMS, report
from spinegrade.config import LocatorConfig
from spinegrade.constants import GROUPS
from spinegrade.data.synthetic import SynthSettings, write_dataset
from spinegrade.layout import RunLayout
from spinegrade.locators import report_locator, train_locator
from spinegrade.metrics import competition_score
from spinegrade.oof import parsed
from spinegrade.evaluate import located_oof


def end_to_end(run: Path, data: Path, folds: Path, group: str) -> dict[str, float]:
    """The group's competition terms, end to end out of fold, with every backbone of ``run`` averaged."""
    names = [n for n in RunLayout(run).backbones() if RunLayout(run).finished_fold_dirs(n, group)]
    frames = located_oof(run, data, folds, names, group, device="cpu")
    probs = sum(frames[n].set_index("row_id")[["normal_mild", "moderate", "severe"]] for n in names) / len(names)
    merged = probs.join(frames[names[0]].set_index("row_id")[["label", "fold"]]).reset_index()
    scores = competition_score(parsed(merged))
    return {t: float(scores[t]) for t in TERMS[group] if t in scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEMO_DATA)
    parser.add_argument("--folds", type=Path, default=DEMO_FOLDS)
    parser.add_argument("--output-dir", type=Path, default=DEMO_OUTPUT, help="the run whose grading models grade")
    parser.add_argument("--scratch", type=Path, default=Path("runs/transfer"))
    parser.add_argument("--studies", type=int, default=60, help="the curved set's synth settings (make demo's)")
    parser.add_argument("--test-studies", type=int, default=8)
    parser.add_argument("--image-size", type=int, nargs=2, default=(192, 288))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--locator-image-size", type=int, default=64)
    parser.add_argument("--locator-epochs", type=int, default=12)
    args = parser.parse_args()
    straight = args.scratch / "straight" / args.data_dir.name
    if not (straight / "train.csv").is_file():
        write_dataset(straight, SynthSettings(studies=args.studies, test_studies=args.test_studies, seed=args.seed,
                                              image_size=tuple(args.image_size), straight=True))
    run = args.scratch / "run"
    models = RunLayout(run).trained_models
    models.mkdir(parents=True, exist_ok=True)
    for backbone in RunLayout(args.output_dir).backbones():  # the same grading models
        target = models / backbone
        if not target.exists():
            target.symlink_to((RunLayout(args.output_dir).trained_models / backbone).resolve(), target_is_directory=True)
    config = LocatorConfig(image_size=args.locator_image_size, num_epochs=args.locator_epochs, batch_size=4)
    result = {"benchmark": "locator_transfer", "trained_on": "straight spines", "groups": {}}
    for group in GROUPS:
        train_locator(group, config, straight, args.folds, run, device="cpu", resume=True)
    for group in GROUPS:
        row = {}
        for name, data in (("straight", straight), ("curved", args.data_dir)):
            located = report_locator(run, data, group, args.folds, device="cpu")
            row[f"locator_{name}"] = {k: located[k] for k in ("slice_within_one", "slice_exact", "median_mm", "p90_mm",
                                                              "image_decided") if k in located}
            row[f"end_to_end_{name}"] = end_to_end(run, data, args.folds, group)
        row["curved_over_straight"] = {t: row["end_to_end_curved"][t] / row["end_to_end_straight"][t]
                                       for t in row["end_to_end_curved"]}
        result["groups"][group] = row
        print(f"{group}: end to end straight {row['end_to_end_straight']}, curved {row['end_to_end_curved']}, "
              f"ratio {json.dumps({k: round(v, 3) for k, v in row['curved_over_straight'].items()})}; slice within one "
              f"straight {row['locator_straight']['slice_within_one']:.1%}, curved {row['locator_curved']['slice_within_one']:.1%}")
    report(result)


if __name__ == "__main__":
    main()
