"""The oracle: what a perfect reader of the image's narrowing scores, the floor for every figure.

Two uses:

- ``--data-dir DIR --folds FILE`` (a synthetic set with its answers folder): the oracle out of fold on
  the training split with the run's own folds, and fitted on every training study for the test split,
  each term beside the class prior fitted the same way. A model's figures are read against these.
- ``--label-only N`` (the default, N = 4000): how hard the generator's grading task is, from the grades
  alone (``synthetic.grade_records``, the very draws ``synth`` makes, no images), with 5 study folds:
  each term's oracle-to-prior ratio beside the best published real model's (spinal 0.26 / 0.71, foraminal
  0.48 / 0.80, subarticular 0.54 / 0.95, any_severe 0.26 / 0.71), which the rater's spreads
  (``grade_model.RATER_SPREAD``) were chosen to reach about 0.85 times of. ``--clean-grades``: the same
  studies without rater noise or wrong labels.

    python benchmarks/oracle.py [--label-only 4000] [--seed 11] [--clean-grades]
    python benchmarks/oracle.py --data-dir DIR --folds FOLDS [--answers-dir DIR-answers]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from common import RESULTS, report
from spinegrade import oracle
from spinegrade.constants import LEVELS, SEVERITIES
from spinegrade.data.folds import read_folds
from spinegrade.data.grade_model import TARGETS
from spinegrade.data.synthetic import SynthSettings, grade_records

# The best published real model's loss over the class prior's, per term (docs/data.md).
REAL_RATIO = {"spinal": 0.26 / 0.71, "foraminal": 0.48 / 0.80, "subarticular": 0.54 / 0.95,
              "any_severe_spinal": 0.26 / 0.71}


def label_only_rows(studies: int, seed: int, clean: bool) -> pd.DataFrame:
    rows = []
    for study_id, grades in grade_records(SynthSettings(studies=studies, test_studies=0, seed=seed,
                                                        clean_grades=clean)):
        for t, target in enumerate(TARGETS):
            rows.append((study_id, target[: -len(LEVELS[0]) - 1], target[-len(LEVELS[0]):],
                         float(grades.image_narrowing[t]), int(grades.labels[t]), grades.wrong[t]))
    return pd.DataFrame(rows, columns=["study_id", "condition", "level", "image_narrowing", "severity", "wrong_label"])


def show(title: str, figures: dict) -> None:
    print(title)
    for term in figures["oracle"]:
        line = f"  {term:18s} oracle {figures['oracle'][term]:.3f}  prior {figures['prior'][term]:.3f}  " \
               f"ratio {figures['ratio'][term]:.3f}"
        if term in REAL_RATIO:
            line += f"  ({figures['ratio'][term] / REAL_RATIO[term]:.2f} x the best real model's {REAL_RATIO[term]:.3f})"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--folds", type=Path, default=None)
    parser.add_argument("--answers-dir", type=Path, default=None, help="default: <data-dir>-answers")
    parser.add_argument("--label-only", type=int, default=4000, metavar="STUDIES")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--clean-grades", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/oracle.json, "
                        "oracle_label_only.json for --label-only)")
    args = parser.parse_args()
    if args.data_dir is None:
        rows = label_only_rows(args.label_only, args.seed, args.clean_grades)
        studies = rows["study_id"].unique()
        folds = pd.DataFrame({"study_id": studies, "fold": np.random.default_rng(0).permutation(len(studies)) % 5})
        figures = oracle.scores(oracle.oracle_oof(rows, folds))
        show(f"{len(studies)} studies, label only, 5 folds", figures)
        report({"benchmark": "oracle", "mode": "label_only", "studies": len(studies), "seed": args.seed,
                "clean_grades": args.clean_grades, **figures,
                "wrong_label_share": float((rows["wrong_label"] != "").mean()),
                "times_real_ratio": {k: figures["ratio"][k] / v for k, v in REAL_RATIO.items()}},
               args.out or RESULTS / "oracle_label_only.json")
        return
    answers = args.answers_dir or args.data_dir.parent / f"{args.data_dir.name}-answers"
    train, test = oracle.read_narrowing(answers, "train"), oracle.read_narrowing(answers, "test")
    oof = oracle.scores(oracle.oracle_oof(train, read_folds(args.folds)))
    on_test = oracle.scores(oracle.fitted_on(train, test))
    show(f"out of fold ({train['study_id'].nunique()} training studies)", oof)
    show(f"test split ({test['study_id'].nunique()} studies)", on_test)
    report({"benchmark": "oracle", "mode": "dataset", "data_dir": str(args.data_dir), "oof": oof, "test": on_test,
            "grades": list(SEVERITIES)}, args.out)


if __name__ == "__main__":
    main()
