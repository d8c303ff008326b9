"""The oracle: the best a model could do on a synthetic set, the floor every figure is compared with.

A synthetic set's answers folder keeps, for every label, the narrowing its image really shows
(``<split>_grades.csv``, written by the generator). A reader who measured that narrowing exactly at the
true point would still miss some grades, because the label came from a reader who strayed from the image
(``grade_model.RATER_SPREAD``) and because some labels are wrong. The oracle is that reader: per metric
group, a multinomial logistic model of the label on the image's narrowing (and its square) with the
level as a feature, fitted with the metric's 1:2:4 weights, out of fold on the run's own folds. What a
model scores above the oracle is what it loses in finding the point and reading the image; what the
oracle scores above zero is the labels' own noise, which no model can remove.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.constants import CONDITION_GROUP, GROUPS, LEVELS, PROBABILITY_COLUMNS, SEVERITIES, SEVERITY_WEIGHTS
from spinegrade.errors import SpinegradeError
from spinegrade.metrics import class_prior, competition_score


def read_narrowing(answers_dir: str | Path, split: str) -> pd.DataFrame:
    """The answers folder's ``<split>_grades.csv`` as rows: study_id, condition, level, image_narrowing,
    severity (the label, 0/1/2), drawn (the reader's grade before any wrong label), wrong_label."""
    path = Path(answers_dir) / f"{split}_grades.csv"
    if not path.is_file():
        raise SpinegradeError(f"{path}: no such file (the oracle needs a synthetic set's answers folder, "
                              "written by spinegrade synth)")
    frame = pd.read_csv(path, keep_default_na=False)
    codes = {s: i for i, s in enumerate(SEVERITIES)}
    return frame.assign(severity=frame["label"].map(codes).astype(int),
                        drawn=frame["drawn_grade"].map(codes).astype(int))


def _features(rows: pd.DataFrame) -> np.ndarray:
    s = rows["image_narrowing"].to_numpy(dtype=float)
    levels = np.stack([(rows["level"] == lv).to_numpy(dtype=float) for lv in LEVELS[1:]], axis=1)
    return np.column_stack([s, s ** 2, levels])


def fit_predict(train: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """(len(rows), 3): the oracle fitted on ``train`` (one group's rows), predicting ``rows``."""
    from sklearn.linear_model import LogisticRegression

    y = train["severity"].to_numpy()
    model = LogisticRegression(C=10.0, max_iter=2000)
    model.fit(_features(train), y, sample_weight=np.asarray(SEVERITY_WEIGHTS)[y])
    out = np.zeros((len(rows), 3))
    out[:, model.classes_] = model.predict_proba(_features(rows))
    return out


def oracle_oof(rows: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """Every row predicted by the oracle fitted on the other folds of its group (``folds``: study_id,
    fold), with the class prior fitted on the same training folds beside it (``prior_*`` columns)."""
    rows = rows.merge(folds[["study_id", "fold"]], on="study_id", how="inner")
    rows = rows.assign(group=rows["condition"].map(CONDITION_GROUP))
    parts = []
    for (group, fold), held in rows.groupby(["group", "fold"]):
        train = rows[(rows["group"] == group) & (rows["fold"] != fold)]
        probs = fit_predict(train, held)
        prior = class_prior(train, held)
        parts.append(held.assign(**{c: probs[:, i] for i, c in enumerate(PROBABILITY_COLUMNS)},
                                 **{f"prior_{c}": prior[:, i] for i, c in enumerate(PROBABILITY_COLUMNS)}))
    return pd.concat(parts, ignore_index=True)


def fitted_on(train: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (a test split) predicted by the oracle and the prior fitted on every training row."""
    parts = []
    for group in GROUPS:
        conditions = list(GROUPS[group].conditions)
        fit, held = train[train["condition"].isin(conditions)], rows[rows["condition"].isin(conditions)]
        if not len(held):
            continue
        probs, prior = fit_predict(fit, held), class_prior(fit, held)
        parts.append(held.assign(**{c: probs[:, i] for i, c in enumerate(PROBABILITY_COLUMNS)},
                                 **{f"prior_{c}": prior[:, i] for i, c in enumerate(PROBABILITY_COLUMNS)}))
    return pd.concat(parts, ignore_index=True)


def scores(predicted: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The metric's terms for the oracle, for the prior, and their ratio (oracle / prior), per term."""
    oracle = competition_score(predicted)
    prior = competition_score(predicted.drop(columns=list(PROBABILITY_COLUMNS)).rename(
        columns={f"prior_{c}": c for c in PROBABILITY_COLUMNS}))
    return {"oracle": oracle, "prior": prior, "ratio": {k: oracle[k] / prior[k] for k in oracle}}
