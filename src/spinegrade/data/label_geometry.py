"""How the labelled points of a dataset are spread over slices: the figures that say whether a
locator may put a study's points on one slice, or must find each level's own.

Computed the same way on the real ``train_label_coordinates.csv`` and on a synthetic set, so the
generator's postures (``synthetic.sample_posture``) can be checked against the real data:

- ``canal_several_slices``: share of studies whose spinal canal points (one series) lie on more than
  one instance across the five levels; ``canal_spread_2``: two or more instances apart;
- ``foramen_spread_1`` / ``foramen_spread_2`` (per side): the same for each side's foramina;
- ``foramen_left_right_gap_median``: instances between a level's left and right foramina, median;
- ``recess_other_instance``: share of levels whose left and right lateral recesses are labelled on
  different axial instances (or series); ``recess_other_series``: on different series.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.constants import condition_title
from spinegrade.data.index import read_csv_checked

CANAL = condition_title("spinal_canal_stenosis")
SIDES = {"left": "Left", "right": "Right"}


def _spread(points: pd.DataFrame) -> pd.Series:
    """Per study: max - min instance number of its points, where they all lie on one series (else NaN)."""
    grouped = points.groupby("study_id")
    one_series = grouped["series_id"].nunique() == 1
    spread = grouped["instance_number"].max() - grouped["instance_number"].min()
    return spread.where(one_series)


def label_geometry(coordinates: pd.DataFrame) -> dict:
    """The figures above from a coordinates table (``train_label_coordinates.csv``'s columns)."""
    c = coordinates
    out: dict = {"studies": int(c["study_id"].nunique())}
    canal = _spread(c[c["condition"] == CANAL]).dropna()
    out["canal_several_slices"] = float((canal >= 1).mean())
    out["canal_spread_2"] = float((canal >= 2).mean())
    for side, title in SIDES.items():
        spread = _spread(c[c["condition"] == f"{title} Neural Foraminal Narrowing"]).dropna()
        out[f"foramen_spread_1_{side}"] = float((spread >= 1).mean())
        out[f"foramen_spread_2_{side}"] = float((spread >= 2).mean())
    left = c[c["condition"] == "Left Neural Foraminal Narrowing"]
    right = c[c["condition"] == "Right Neural Foraminal Narrowing"]
    pairs = left.merge(right, on=["study_id", "series_id", "level"], suffixes=("_l", "_r"))
    gap = (pairs["instance_number_l"] - pairs["instance_number_r"]).abs()
    out["foramen_left_right_gap_median"] = float(gap.median()) if len(gap) else float("nan")
    left = c[c["condition"] == "Left Subarticular Stenosis"]
    right = c[c["condition"] == "Right Subarticular Stenosis"]
    pairs = left.merge(right, on=["study_id", "level"], suffixes=("_l", "_r"))
    other_series = pairs["series_id_l"] != pairs["series_id_r"]
    other = other_series | (pairs["instance_number_l"] != pairs["instance_number_r"])
    out["recess_other_instance"] = float(other.mean()) if len(pairs) else float("nan")
    out["recess_other_series"] = float(other_series.mean()) if len(pairs) else float("nan")
    return {k: (round(v, 4) if isinstance(v, float) and np.isfinite(v) else v) for k, v in out.items()}


def dataset_label_geometry(data_dir: str | Path) -> dict:
    """:func:`label_geometry` of a dataset's ``train_label_coordinates.csv``."""
    path = Path(data_dir) / "train_label_coordinates.csv"
    return label_geometry(read_csv_checked(path, ["study_id", "series_id", "instance_number", "condition", "level"]))
