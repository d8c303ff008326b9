"""Out-of-fold evaluation: every training study predicted by the fold model that never saw it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spinegrade.constants import PROBABILITY_COLUMNS, SEVERITY_INDEX, parse_row_id
from spinegrade.metrics import competition_score, weighted_prior


def read_oof(output_dir: str | Path, name: str) -> pd.DataFrame:
    """All fold files of one backbone, with study_id, condition, level and severity parsed out."""
    paths = sorted((Path(output_dir) / "oof" / name).glob("fold*.csv"))
    if not paths:
        return pd.DataFrame()
    oof = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    parsed = [parse_row_id(r) for r in oof["row_id"]]
    return oof.assign(study_id=[p[0] for p in parsed], condition=[p[1] for p in parsed],
                      level=[p[2] for p in parsed], severity=oof["label"].map(SEVERITY_INDEX).astype(int))


def prior_predictions(oof: pd.DataFrame) -> pd.DataFrame:
    """The weight-scaled class prior of each condition and level, fitted on the training folds of each
    row's fold (so the baseline, like the model, never sees the row it predicts)."""
    out = oof.copy()
    for fold in oof["fold"].unique():
        train = oof[oof["fold"] != fold]
        for (condition, level), rows in oof[oof["fold"] == fold].groupby(["condition", "level"]):
            seen = train[(train["condition"] == condition) & (train["level"] == level)]["severity"].to_numpy()
            out.loc[rows.index, list(PROBABILITY_COLUMNS)] = weighted_prior(seen)
    return out


def oof_scores(oof: pd.DataFrame) -> dict[str, float]:
    """Competition terms of the OOF predictions and of the prior baseline on the same rows."""
    model = competition_score(oof)
    prior = competition_score(prior_predictions(oof))
    return {**model, **{f"prior_{k}": v for k, v in prior.items()}, "rows": len(oof),
            "studies": int(oof["study_id"].nunique()), "folds": int(oof["fold"].nunique())}


def format_scores(name: str, scores: dict[str, float]) -> str:
    terms = [k for k in ("spinal", "any_severe_spinal", "score") if k in scores]
    model = "  ".join(f"{k} {scores[k]:.4f}" for k in terms)
    prior = "  ".join(f"{k} {scores['prior_' + k]:.4f}" for k in terms)
    return (f"{name}: out-of-fold over {scores['folds']} folds, {scores['studies']} studies, {scores['rows']} levels\n"
            f"  model: {model}\n  prior: {prior}")

