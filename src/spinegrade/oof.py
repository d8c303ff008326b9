"""Reading a run's out-of-fold predictions: ``oof/<name>/<group>/fold<k>.csv`` (a backbone's or the
blend's), with study, condition, level and grade parsed from each row id. Evaluation, blending and the
report read OOF files only through here."""

from __future__ import annotations

import pandas as pd

from spinegrade.constants import SEVERITY_INDEX, parse_row_id
from spinegrade.layout import RunLayout


def read_oof(layout: RunLayout, name: str, group: str) -> pd.DataFrame:
    """All fold files of one name and group (empty when there are none)."""
    paths = sorted(layout.oof_dir(name, group).glob("fold*.csv"))
    if not paths:
        return pd.DataFrame()
    return parsed(pd.concat([pd.read_csv(p) for p in paths], ignore_index=True))


def parsed(oof: pd.DataFrame) -> pd.DataFrame:
    """OOF rows with study_id, condition, level and severity (the grade's index) parsed out."""
    ids = [parse_row_id(r) for r in oof["row_id"]]
    return oof.assign(study_id=[p[0] for p in ids], condition=[p[1] for p in ids],
                      level=[p[2] for p in ids], severity=oof["label"].map(SEVERITY_INDEX).astype(int))


def complete_names(layout: RunLayout, group: str, folds: list[int]) -> tuple[list[str], dict[str, list[int]]]:
    """Names with an OOF file of ``group`` for every fold, and the missing folds of the others. A
    backbone's fold counts once it is finished (a fold still training, or killed, has OOF files but
    no done.json)."""
    complete, partial = [], {}
    for name in layout.oof_names(group):
        present = {int(p.stem.removeprefix("fold")) for p in layout.oof_dir(name, group).glob("fold*.csv")}
        if layout.model_dir(name, group).is_dir():
            present &= {int(p.name.removeprefix("fold")) for p in layout.finished_fold_dirs(name, group)}
        missing = [f for f in folds if f not in present]
        if missing:
            partial[name] = missing
        else:
            complete.append(name)
    return complete, partial
