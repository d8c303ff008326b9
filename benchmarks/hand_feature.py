"""A ruler's floor: how well one hand-made image feature per group grades, scored like the models.

At the labelled points of the demo's data, each sample's image is the crop the group's demo model
trains on (the same cache, ``preprocess.build_cache``, the centre slice without jitter). The feature is
the share of the crop's central disc (a quarter of the crop's width across, about 10 mm on a 40 mm
crop) that is bright: above the midpoint of the crop's 5th and 95th intensity percentiles. On T2 the
canal and the recess are bright with fluid; on T1 the foramen is bright with fat; narrowing leaves less
of it at the point. A logistic regression on that share and the level (one-hot) is fitted fold by fold
on the other folds, weighted by the metric's 1/2/4, and its held-out probabilities are scored with the
competition metric, beside the training prior's on the same rows. A grader that does not beat this
learns less than a ruler would.

    python benchmarks/hand_feature.py [--groups spinal foraminal subarticular] [--data-dir D] [--folds F]
        [--cache runs/hand_feature]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from common import DEMO_DATA, DEMO_FOLDS, DEMO_GRADING, TERMS, report
from spinegrade.config import load_config
from spinegrade.constants import GROUPS, LEVELS, PROBABILITY_COLUMNS, SEVERITY_WEIGHTS
from spinegrade.data.preprocess import PreprocessSettings, build_cache, centre_view
from spinegrade.metrics import class_prior, competition_score
from spinegrade.train import load_samples

DISC = 0.25  # the central disc's diameter, as a share of the crop's width


def bright_share(image: np.ndarray) -> float:
    """Share of the central disc brighter than the midpoint of the crop's 5th and 95th percentiles."""
    low, high = np.percentile(image, [5, 95])
    size = image.shape[0]
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = np.hypot(yy, xx) <= DISC * size / 2
    return float((image[disc] > (low + high) / 2).mean())


def features(group: str, data: Path, folds: Path, cache: Path) -> pd.DataFrame:
    """Every usable labelled sample of the group with its fold, grade, level and bright share."""
    config = load_config("efficientnet_lite0", DEMO_GRADING[group], group=group)
    samples, _ = load_samples(config, data, folds, say=lambda _: None)
    built = build_cache(samples, PreprocessSettings.from_config(config), cache)
    table = built.samples.copy()
    table["share"] = [bright_share(centre_view(built.images[i], config.image_size)[0]) for i in range(len(table))]
    return table


def held_out(table: pd.DataFrame) -> pd.DataFrame:
    """Each fold's rows with the probabilities of a logistic regression fitted on the other folds."""
    design = np.column_stack([table["share"].to_numpy(), np.eye(len(LEVELS))[table["level_index"].to_numpy()]])
    grade = table["severity"].to_numpy()
    out = table.copy()
    for fold in sorted(table["fold"].unique()):
        train, test = table["fold"].to_numpy() != fold, table["fold"].to_numpy() == fold
        fit = LogisticRegression(max_iter=2000).fit(design[train], grade[train],
                                                    sample_weight=np.asarray(SEVERITY_WEIGHTS)[grade[train]])
        probs = np.zeros((int(test.sum()), 3))
        probs[:, fit.classes_] = fit.predict_proba(design[test])
        out.loc[test, list(PROBABILITY_COLUMNS)] = probs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--data-dir", type=Path, default=DEMO_DATA)
    parser.add_argument("--folds", type=Path, default=DEMO_FOLDS)
    parser.add_argument("--cache", type=Path, default=Path("runs/hand_feature"))
    args = parser.parse_args()
    result = {"benchmark": "hand_feature", "feature": "bright share of the crop's central disc", "groups": {}}
    for group in args.groups:
        table = features(group, args.data_dir, args.folds, args.cache)
        scored = held_out(table)
        prior = scored.copy()
        for fold in sorted(table["fold"].unique()):
            rows = prior["fold"] == fold
            prior.loc[rows, list(PROBABILITY_COLUMNS)] = class_prior(table[~rows], prior[rows])
        feature, baseline = competition_score(scored), competition_score(prior)
        mean_share = table.groupby("severity")["share"].mean()
        result["groups"][group] = {
            "samples": len(table), "feature": {t: float(feature[t]) for t in TERMS[group] if t in feature},
            "prior": {t: float(baseline[t]) for t in TERMS[group] if t in baseline},
            "mean_share_by_grade": {int(k): float(v) for k, v in mean_share.items()}}
        print(f"{group}: feature {result['groups'][group]['feature']}, prior {result['groups'][group]['prior']}, "
              f"mean share by grade {result['groups'][group]['mean_share_by_grade']}")
    report(result)


if __name__ == "__main__":
    main()
