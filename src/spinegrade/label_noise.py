"""Suspect labels: every training label ranked by how far the out-of-fold predictions disagree with it.

One radiologist graded each real study, and readers agree only moderately, so some training labels
are wrong. A label the models, never having seen its study, put a low probability on is either one
they cannot read yet or a wrong one; ranked in the metric's own terms (the label's sample weight times
the log loss of its probability: what the row costs the score), the wrong ones gather at the top.

Per group the predictions are the blend's nested OOF rows when the run has a blend, else the mean of
the group's backbones' OOF rows. ``evaluate`` writes ``results/suspect_labels.csv`` and a section of
``report.html``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.constants import CONDITION_GROUP, GROUPS, PROBABILITY_COLUMNS, SEVERITIES, SEVERITY_WEIGHTS
from spinegrade.layout import BLEND_NAME, RunLayout
from spinegrade.metrics import EPS, normalise
from spinegrade.oof import complete_names, read_oof

SUSPECT_COLUMNS = ["rank", "study_id", "condition", "level", "group", "label", "p_label", "predicted",
                   "disagreement", "source"]


def disagreement(oof: pd.DataFrame) -> pd.DataFrame:
    """``oof`` (parsed OOF rows: study_id, condition, level, severity, probabilities) with each labelled
    row's ``p_label`` and ``disagreement`` (weight of the label times minus the log of its probability)
    and the grade the predictions favour, most disagreeing first."""
    rows = oof[oof["severity"] >= 0].copy()
    p = normalise(rows[list(PROBABILITY_COLUMNS)].to_numpy(dtype=float))
    y = rows["severity"].to_numpy(dtype=int)
    rows["p_label"] = p[np.arange(len(y)), y]
    rows["disagreement"] = np.asarray(SEVERITY_WEIGHTS)[y] * -np.log(np.clip(rows["p_label"], EPS, 1.0))
    rows["predicted"] = [SEVERITIES[k] for k in p.argmax(axis=1)]
    rows["label"] = [SEVERITIES[k] for k in y]
    return rows.sort_values("disagreement", ascending=False, kind="stable")


def run_predictions(layout: RunLayout, folds: list[int]) -> dict[str, tuple[pd.DataFrame, str]]:
    """Per group: the OOF rows the ranking reads and where they come from."""
    out = {}
    for group in GROUPS:
        names, _ = complete_names(layout, group, folds)
        if not names:
            continue
        if BLEND_NAME in names:
            out[group] = (read_oof(layout, BLEND_NAME, group), "blend (nested)")
            continue
        frames = [read_oof(layout, n, group).set_index("row_id") for n in names]
        common = sorted(set.intersection(*(set(f.index) for f in frames)))
        mean = np.mean([f.loc[common, list(PROBABILITY_COLUMNS)].to_numpy(dtype=float) for f in frames], axis=0)
        first = frames[0].loc[common].copy()
        first[list(PROBABILITY_COLUMNS)] = mean
        out[group] = (first.reset_index(), f"mean of {', '.join(names)}")
    return out


def suspect_labels(layout: RunLayout, folds: list[int]) -> pd.DataFrame:
    """Every labelled training row of every graded group, ranked together by disagreement."""
    parts = []
    for group, (oof, source) in run_predictions(layout, folds).items():
        parts.append(disagreement(oof).assign(group=group, source=source))
    if not parts:
        return pd.DataFrame(columns=SUSPECT_COLUMNS)
    ranked = pd.concat(parts, ignore_index=True).sort_values("disagreement", ascending=False, kind="stable")
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    ranked["group"] = ranked["condition"].map(CONDITION_GROUP)
    return ranked[SUSPECT_COLUMNS].reset_index(drop=True)


def dropped_labels(path: str | Path, share: float) -> set[tuple[int, str, str]]:
    """(study_id, condition, level) of the top ``share`` of a suspect-label list (``suspect_labels.csv``)."""
    from spinegrade.data.index import read_csv_checked

    ranked = read_csv_checked(Path(path), ["rank", "study_id", "condition", "level"]).sort_values("rank")
    top = ranked.head(int(round(share * len(ranked))))
    return set(zip(top["study_id"].astype(int), top["condition"], top["level"]))


def recall_of(ranked: pd.DataFrame, wrong: pd.DataFrame, share: float = 0.05) -> dict:
    """How many of the known wrong labels (``wrong``: study_id, condition, level, kind, drawn_grade,
    label; a synthetic set's ``wrong_labels.csv``) the top ``share`` of ``ranked`` holds, per kind (a
    grade off by one step and by two apart), beside what a random list of that length would hold
    (``share`` of them)."""
    top = ranked.head(max(1, int(round(share * len(ranked)))))
    flagged = set(zip(top["study_id"], top["condition"], top["level"]))
    known = set(zip(ranked["study_id"], ranked["condition"], ranked["level"]))
    wrong = wrong[[k in known for k in zip(wrong["study_id"], wrong["condition"], wrong["level"])]].copy()
    index = {s: i for i, s in enumerate(SEVERITIES)}
    steps = (wrong["drawn_grade"].map(index) - wrong["label"].map(index)).abs()
    wrong["kind"] = np.where(wrong["kind"] == "grade", np.where(steps == 2, "grade, two steps", "grade, one step"),
                             wrong["kind"])
    out = {"share": share, "listed": len(top), "labels": len(ranked), "random_recall": share}
    for kind, part in [("all", wrong), *wrong.groupby("kind")]:
        hits = sum(k in flagged for k in zip(part["study_id"], part["condition"], part["level"]))
        out[str(kind)] = {"wrong": len(part), "found": hits, "recall": hits / len(part) if len(part) else float("nan")}
    return out
