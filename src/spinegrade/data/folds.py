"""Patient-grouped, multilabel-stratified K folds, made once and written to a file.

Each study is one row (in this dataset a study is a patient), so no patient is ever split across
folds. Stratification is over the one-hot grades of all 25 targets, so every fold gets its share
of the rare Severe cells at every level. Training and evaluation read the file and never re-split,
which makes the out-of-fold predictions of different backbones comparable row by row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.errors import SpinegradeError
from spinegrade.files import write_csv_atomic  # noqa: F401  (re-exported: callers import it from here)


def make_folds(labels_wide: pd.DataFrame, n_folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """``labels_wide``: one row per study (index study_id), severity index per target, -1 unlabelled."""
    if n_folds < 2:
        raise SpinegradeError(f"--n-folds must be at least 2, got {n_folds}")
    if len(labels_wide) < n_folds:
        raise SpinegradeError(f"{len(labels_wide)} studies cannot make {n_folds} folds")
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold  # training only: inference never needs it

    values = labels_wide.to_numpy()
    onehot = np.concatenate([(values == k).astype(int) for k in range(3)], axis=1)
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(labels_wide), -1, dtype=int)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(values)), onehot)):
        fold[held_out] = k
    return pd.DataFrame({"study_id": labels_wide.index.to_numpy(), "fold": fold}).sort_values("study_id").reset_index(drop=True)


def read_folds(path: str | Path) -> pd.DataFrame:
    """Read a folds file, checking it has one fold per study."""
    path = Path(path)
    if not path.is_file():
        raise SpinegradeError(f"{path}: folds file not found (make it with `spinegrade folds` / `make folds`)")
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise SpinegradeError(f"{path}: cannot read folds ({exc})") from None
    missing = {"study_id", "fold"} - set(df.columns)
    if missing:
        raise SpinegradeError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    if df["study_id"].duplicated().any():
        dup = df.loc[df["study_id"].duplicated(), "study_id"].iloc[0]
        raise SpinegradeError(f"{path}: study {dup} appears in more than one row")
    return df[["study_id", "fold"]].astype({"study_id": np.int64, "fold": int})


def fold_summary(folds: pd.DataFrame, labels_wide: pd.DataFrame) -> str:
    """Studies per fold and the share of each grade of spinal canal stenosis in it."""
    spinal = [c for c in labels_wide.columns if c.startswith("spinal_canal_stenosis")]
    merged = folds.set_index("study_id").join(labels_wide[spinal])
    lines = ["fold  studies  spinal Normal/Mild  Moderate  Severe"]
    for fold, group in merged.groupby("fold"):
        v = group[spinal].to_numpy().ravel()
        v = v[v >= 0]
        shares = [(v == k).mean() * 100 if len(v) else 0.0 for k in range(3)]
        lines.append(f"{fold:4d}  {len(group):7d}  {shares[0]:17.1f}%  {shares[1]:7.1f}%  {shares[2]:5.1f}%")
    return "\n".join(lines)
