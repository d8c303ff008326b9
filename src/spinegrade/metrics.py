"""The competition metric and the class prior, on plain arrays: the one place for both. Never mutates
its inputs.

For each metric group of the registry (spinal; foraminal left and right together; subarticular left
and right together) a log loss with sample weights 1/2/4 by true grade, on rows normalised to sum to
one; plus, for a group with an ``any_severe_term`` (``any_severe_spinal``): per study, label 1 when
any of its levels is Severe, prediction the largest Severe probability over its rows, weight the
largest sample weight among those rows. The score is the mean of the terms present. Unlabelled rows
(grade -1) are not scored. :class:`FixedRowsScore` is the same metric for rows fixed in advance (the
blend's optimiser calls it thousands of times); a test holds the two equal.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from spinegrade.constants import CONDITION_GROUP, GROUPS, PROBABILITY_COLUMNS, SEVERITY_WEIGHTS

EPS = 1e-15


def normalise(probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, None)
    total = p.sum(axis=1, keepdims=True)
    return np.divide(p, total, out=np.full_like(p, 1 / p.shape[1]), where=total > 0)


def weighted_log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Multiclass log loss with the metric's 1/2/4 sample weights; rows with label -1 ignored."""
    labels = np.asarray(labels)
    keep = labels >= 0
    if not keep.any():
        return float("nan")
    p = np.clip(normalise(probabilities)[keep], EPS, 1 - EPS)
    y = labels[keep].astype(int)
    w = np.asarray(SEVERITY_WEIGHTS)[y]
    return float(np.sum(w * -np.log(p[np.arange(len(y)), y])) / np.sum(w))


def any_severe_log_loss(study_ids: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The any_severe_spinal term over spinal canal rows grouped by study."""
    labels = np.asarray(labels)
    keep = labels >= 0
    if not keep.any():
        return float("nan")
    frame = pd.DataFrame({
        "study": np.asarray(study_ids)[keep],
        "severe_p": normalise(probabilities)[keep][:, 2],
        "is_severe": (labels[keep] == 2).astype(float),
        "weight": np.asarray(SEVERITY_WEIGHTS)[labels[keep].astype(int)],
    })
    per_study = frame.groupby("study").agg(y=("is_severe", "max"), p=("severe_p", "max"), w=("weight", "max"))
    p = np.clip(per_study["p"].to_numpy(), EPS, 1 - EPS)
    y = per_study["y"].to_numpy()
    losses = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(np.sum(per_study["w"].to_numpy() * losses) / np.sum(per_study["w"].to_numpy()))


def competition_score(frame: pd.DataFrame) -> dict[str, float]:
    """Terms of the metric for the groups present in ``frame`` and their mean.

    ``frame`` columns: study_id, condition, severity (-1 unlabelled), and the three probabilities as
    ``normal_mild, moderate, severe``. Terms for groups with no labelled row are left out, so a
    spinal-only model is scored on ``spinal`` and ``any_severe_spinal``.
    """
    probs = frame[list(PROBABILITY_COLUMNS)].to_numpy()
    groups = frame["condition"].map(CONDITION_GROUP).to_numpy()
    labels = frame["severity"].to_numpy()
    terms: dict[str, float] = {}
    severe_terms: dict[str, float] = {}
    for group in GROUPS.values():
        mask = groups == group.name
        if not (mask.any() and (labels[mask] >= 0).any()):
            continue
        terms[group.name] = weighted_log_loss(labels[mask], probs[mask])
        if group.any_severe_term:
            severe_terms[group.any_severe_term] = any_severe_log_loss(
                frame["study_id"].to_numpy()[mask], labels[mask], probs[mask])
    terms.update(severe_terms)  # after the group terms, as the competition lists them
    terms["score"] = float(np.mean(list(terms.values()))) if terms else float("nan")
    return terms


class FixedRowsScore:
    """:func:`competition_score`'s ``score`` for a fixed set of rows, with the grouping precomputed:
    called with the rows' (N, 3) probabilities only."""

    def __init__(self, frame: pd.DataFrame):
        labels = frame["severity"].to_numpy()
        groups = frame["condition"].map(CONDITION_GROUP).to_numpy()
        weights = np.asarray(SEVERITY_WEIGHTS)
        self.groups, self.any_severe = [], []
        for group in GROUPS.values():
            rows = np.flatnonzero((groups == group.name) & (labels >= 0))
            if not len(rows):
                continue
            self.groups.append((rows, labels[rows], weights[labels[rows]]))
            if group.any_severe_term:
                order = rows[np.argsort(frame["study_id"].to_numpy()[rows], kind="stable")]
                studies = frame["study_id"].to_numpy()[order]
                starts = np.flatnonzero(np.r_[True, studies[1:] != studies[:-1]])
                y = np.maximum.reduceat((labels[order] == 2).astype(float), starts)
                w = np.maximum.reduceat(weights[labels[order]], starts)
                self.any_severe.append((order, starts, y, w))

    def __call__(self, probs: np.ndarray) -> float:
        p = np.clip(normalise(probs), EPS, 1 - EPS)
        terms = [float(np.sum(w * -np.log(p[rows, y])) / np.sum(w)) for rows, y, w in self.groups]
        for order, starts, y, w in self.any_severe:
            q = np.clip(np.maximum.reduceat(p[order, 2], starts), EPS, 1 - EPS)
            terms.append(float(np.sum(w * -(y * np.log(q) + (1 - y) * np.log(1 - q))) / np.sum(w)))
        return float(np.mean(terms)) if terms else float("nan")


def study_bootstrap(frame: pd.DataFrame, resamples: int = 1000, level: float = 0.9,
                    seed: int = 0) -> dict[str, tuple[float, float]]:
    """Each term's ``level`` interval over studies drawn with replacement (``frame`` as for
    :func:`competition_score`): how far a figure on these studies could move on others like them. A
    study drawn twice counts as two studies (the any_severe term groups by the draw, not the id)."""
    rng = np.random.default_rng(seed)
    studies = frame["study_id"].to_numpy()
    ids, inverse = np.unique(studies, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == i) for i in range(len(ids))]
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        picked = rng.integers(len(ids), size=len(ids))
        index = np.concatenate([rows_of[i] for i in picked])
        sample = frame.iloc[index].assign(study_id=np.repeat(np.arange(len(picked)), [len(rows_of[i]) for i in picked]))
        for term, value in competition_score(sample).items():
            draws.setdefault(term, []).append(value)
    tail = (1 - level) / 2 * 100
    return {term: (float(np.nanpercentile(v, tail)), float(np.nanpercentile(v, 100 - tail))) for term, v in draws.items()}


def weighted_prior(labels: np.ndarray, pseudo_count: float = 1.0) -> np.ndarray:
    """The weight-scaled class prior: p_k proportional to n_k * w_k, the best constant under this loss.

    A pseudo-count per grade keeps a grade unseen in a small training fold from getting probability
    zero (and an infinite loss); on the real data it moves the reference score by less than 0.001.
    """
    labels = np.asarray(labels)
    counts = np.array([(labels == k).sum() + pseudo_count for k in range(3)], dtype=float) * np.asarray(SEVERITY_WEIGHTS)
    return counts / counts.sum()


def prior_table(labels: pd.DataFrame) -> pd.DataFrame:
    """The weight-scaled prior of every (condition, level) in ``labels`` (rows with study_id,
    condition, level, severity: the index table, or OOF rows): what the submission gives targets no
    model grades, what every model is compared with, what a kernel falls back on (saved with the
    models as ``priors.csv``)."""
    rows = [{"condition": c, "level": lv, **dict(zip(PROBABILITY_COLUMNS, weighted_prior(g["severity"].to_numpy())))}
            for (c, lv), g in labels.groupby(["condition", "level"])]
    return pd.DataFrame(rows, columns=["condition", "level", *PROBABILITY_COLUMNS])


def prior_for(table: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """(len(rows), 3): each row's (condition, level) prior from a :func:`prior_table`; a pair the table
    lacks gets the weight-scaled prior of no label at all (the pseudo-counts alone)."""
    known = {(r.condition, r.level): np.array([getattr(r, c) for c in PROBABILITY_COLUMNS], dtype=float)
             for r in table.itertuples()}
    fallback = weighted_prior(np.array([], dtype=int))
    return np.stack([known.get((c, lv), fallback) for c, lv in zip(rows["condition"], rows["level"])]) \
        if len(rows) else np.zeros((0, 3))


def class_prior(train: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """The class prior fitted on ``train`` (the training folds) for ``rows`` (the held-out ones): the
    baseline a fold's model must beat, never fitted on the rows it predicts."""
    return prior_for(prior_table(train), rows)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins."""
    p = normalise(probabilities)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(labels)).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def _binned(confidence: np.ndarray, hit: np.ndarray, bins: int) -> pd.DataFrame:
    """Per equal-width bin of ``confidence``: its range, count, mean confidence and the share of ``hit``."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        in_bin = which == b
        rows.append({"bin_low": edges[b], "bin_high": edges[b + 1], "count": int(in_bin.sum()),
                     "confidence": float(confidence[in_bin].mean()) if in_bin.any() else float("nan"),
                     "accuracy": float(hit[in_bin].mean()) if in_bin.any() else float("nan")})
    return pd.DataFrame(rows)


def reliability_table(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Per confidence bin: mean confidence, accuracy and count (the reliability diagram's data)."""
    p = normalise(probabilities)
    return _binned(p.max(axis=1), (p.argmax(axis=1) == np.asarray(labels)).astype(float), bins)


def severe_reliability_table(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Per bin of the Severe probability: its mean, how often the label is Severe ("accuracy"), and the
    count: whether a Severe probability means what it says (what the any_severe term and the weight of 4
    punish)."""
    return _binned(normalise(probabilities)[:, 2], (np.asarray(labels) == 2).astype(float), bins)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """Accuracy, balanced accuracy, precision/recall/F1 per grade and averaged, one-vs-rest ROC AUC per
    grade, ECE and the confusion matrix, for labelled rows (grade >= 0)."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    labels = np.asarray(labels)
    keep = labels >= 0
    y, p = labels[keep].astype(int), normalise(probabilities)[keep]
    predicted = p.argmax(axis=1)
    with warnings.catch_warnings():  # a level with one grade only is legitimate; its recall is still defined
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y, predicted))
    out: dict = {"accuracy": float(accuracy_score(y, predicted)), "balanced_accuracy": balanced}
    precision, recall, f1, support = precision_recall_fscore_support(y, predicted, labels=[0, 1, 2], zero_division=0)
    for k, name in enumerate(PROBABILITY_COLUMNS):
        out[f"precision_{name}"], out[f"recall_{name}"], out[f"f1_{name}"] = float(precision[k]), float(recall[k]), float(f1[k])
        out[f"support_{name}"] = int(support[k])
        positives = y == k
        out[f"roc_auc_{name}"] = float(roc_auc_score(positives, p[:, k])) if 0 < positives.sum() < len(y) else float("nan")
    for average in ("macro", "weighted"):
        pr, rc, f, _ = precision_recall_fscore_support(y, predicted, labels=[0, 1, 2], average=average, zero_division=0)
        out[f"precision_{average}"], out[f"recall_{average}"], out[f"f1_{average}"] = float(pr), float(rc), float(f)
    out["ece"] = expected_calibration_error(y, p)
    out["confusion_matrix"] = confusion_matrix(y, predicted, labels=[0, 1, 2]).tolist()
    return out
