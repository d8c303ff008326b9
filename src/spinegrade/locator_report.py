"""Every locator judged the same way, out of fold, against the labelled points: how often the slice
is within one of the labelled slice (a point placed on another stack or series than the labelled
one, or not placed at all, is not), and the point error in mm in patient space (so a wrong slice
counts), per level and side. A slice locator's presence threshold is chosen here too.

Outputs, with the group's locator in ``OUTPUT/trained_models/localizer/<group>/``: ``oof_points.csv``
(every labelled point, where it was located, and by what: ``source``, ``score``) and
``oof_report.json`` (``RunLayout.locator_oof``, ``RunLayout.locator_report``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.constants import GROUPS, CONDITION_SPECS
from spinegrade.data.dicom import Stack
from spinegrade.data.folds import write_csv_atomic
from spinegrade.data.index import build_index
from spinegrade.files import write_text_atomic
from spinegrade.layout import RunLayout
from spinegrade.logs import get_logger
from spinegrade.offsets import find_instance

log = get_logger(__name__)

NEVER = 1.01  # a presence threshold no probability reaches: the geometric choice everywhere
FLOOR = 0.5  # the lowest presence threshold: the head's own even odds


def compare_with_labels(located: pd.DataFrame, stacks: dict[tuple[int, str], list[Stack]], data_dir: Path,
                        group: str) -> pd.DataFrame:
    """One row per labelled point of ``group`` whose slice is readable: where it was located (``located``:
    rows of the locations table), the slice offset and the error in mm. ``stacks``: (study, series) -> stacks."""
    table = build_index(data_dir, check_images=False).table
    labelled = table[table["condition"].isin(GROUPS[group].conditions) & table["instance_number"].notna()]
    by_key: dict[tuple, list] = {}
    for h in located.itertuples():
        by_key.setdefault((h.study_id, h.condition, h.level), []).append(h)
    rows = []
    for r in labelled.itertuples():
        series = str(Path(r.image_path).parent)
        truth_at = find_instance(stacks.get((r.study_id, series), []), int(r.instance_number))
        if truth_at is None:
            continue  # the labelled slice is not readable: the data report names it
        truth_stack = stacks[(r.study_id, series)][truth_at[0]]
        truth = truth_stack.slices[truth_at[1]].pixel_to_patient(float(r.x), float(r.y))
        hits = by_key.get((r.study_id, r.condition, r.level), [])
        hit = next((h for h in hits if h.series == series), hits[0] if hits else None)
        row = {"study_id": r.study_id, "condition": r.condition, "level": r.level, "series": series,
               "instance_labelled": int(r.instance_number), "x_label": r.x, "y_label": r.y, "located": hit is not None,
               "series_found": None, "instance_found": None, "x": np.nan, "y": np.nan, "slice_offset": np.nan,
               "error_mm": np.nan, "source": None, "score": np.nan}
        if hit is not None:
            found_at = find_instance(stacks.get((r.study_id, hit.series), []), int(hit.instance_number),
                                     int(getattr(hit, "frame", 0) or 0))
            if found_at is not None:
                found_slice = stacks[(r.study_id, hit.series)][found_at[0]].slices[found_at[1]]
                same_stack = hit.series == series and found_at[0] == truth_at[0]
                row.update(series_found=hit.series, instance_found=int(hit.instance_number), x=hit.x, y=hit.y,
                           slice_offset=found_at[1] - truth_at[1] if same_stack else np.nan,
                           error_mm=float(np.linalg.norm(found_slice.pixel_to_patient(hit.x, hit.y) - truth)),
                           source=hit.source, score=getattr(hit, "score", np.nan))
        rows.append(row)
    return pd.DataFrame(rows)


def choose_threshold(by_head: pd.DataFrame, by_geometry: pd.DataFrame) -> float:
    """The presence threshold that puts most labelled points on their own slice (then most within one),
    taking the head's choice where its presence reaches the threshold and the geometric one elsewhere.
    ``by_head`` and ``by_geometry``: :func:`compare_with_labels` of the same studies located with every
    presence accepted and with none. The exact slice, not the share within one, because the geometric
    choice already puts nearly every point within one slice on a straight spine: judged within one, the
    image would be switched off exactly where it can place the slice right more often. Of equally good
    thresholds the lowest (the image decides), but never under ``FLOOR``: below it the head itself says
    the slice is more likely not the level's own (a slice that shows nothing falls back on geometry)."""
    key = ["study_id", "condition", "level", "series", "instance_labelled"]
    both = by_head.merge(by_geometry, on=key, suffixes=("_head", "_geometry"))
    if both.empty:
        return FLOOR
    good = {side: (both[f"slice_offset_{side}"] == 0).to_numpy() + 1e-3 * (both[f"slice_offset_{side}"].abs() <= 1).to_numpy()
            for side in ("head", "geometry")}
    score = both["score_head"].to_numpy(dtype=float)
    candidates = np.unique(np.concatenate([[FLOOR, NEVER], score[np.isfinite(score) & (score >= FLOOR)]]))
    gains = [float(np.where(np.nan_to_num(score, nan=-1.0) >= t, good["head"], good["geometry"]).sum()) for t in candidates]
    return float(candidates[int(np.argmax(gains))])


def nested_thresholds(by_head: pd.DataFrame, by_geometry: pd.DataFrame,
                      folds: pd.Series) -> tuple[pd.DataFrame, dict[int, float]]:
    """The out-of-fold report's rows with each fold located at the threshold chosen on the other folds
    (``folds``: study_id -> fold), so the figure chooses nothing on the studies it scores; and those
    thresholds. (Prediction uses the threshold chosen on every fold.)"""
    fold_of = lambda frame: frame["study_id"].map(folds).to_numpy()  # noqa: E731
    head_folds, geometry_folds = fold_of(by_head), fold_of(by_geometry)
    parts, chosen = [], {}
    for fold in sorted(set(geometry_folds[~pd.isna(geometry_folds)].astype(int))):
        threshold = choose_threshold(by_head[head_folds != fold], by_geometry[geometry_folds != fold])
        chosen[fold] = threshold
        parts.append(with_threshold(by_head[head_folds == fold], by_geometry[geometry_folds == fold], threshold))
    frame = pd.concat(parts, ignore_index=True) if parts else with_threshold(by_head, by_geometry, FLOOR)
    return frame, chosen


def with_threshold(by_head: pd.DataFrame, by_geometry: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """What locating with ``threshold`` gives, from the two extremes (:func:`choose_threshold`'s inputs):
    the head's row where its presence reaches the threshold and it was sure of it, else the geometric row."""
    key = ["study_id", "condition", "level", "series", "instance_labelled"]
    geometry = by_geometry.set_index(key)
    head = by_head.set_index(key).reindex(geometry.index)
    take = (head["score"].fillna(-1.0) >= threshold) & (head["source"] == "located")
    out = geometry.copy()
    out.loc[take] = head.loc[take, out.columns]
    return out.reset_index()


def write_locator_report(frame: pd.DataFrame, output_dir: Path, group: str, **extra) -> dict:
    """The out-of-fold table and its summary, overall and per level and side (``extra`` joins the summary)."""
    layout = RunLayout(output_dir)
    layout.locator_oof(group).parent.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(frame, layout.locator_oof(group))
    report = {"points": len(frame), **extra}
    if not frame.empty:
        report.update(summarise(frame))
        report["per_level_side"] = {f"{CONDITION_SPECS[condition].side or 'midline'} {level}": summarise(part)
                                    for (condition, level), part in frame.groupby(["condition", "level"])}
        log.info(f"{group} locator out of fold over {len(frame)} labelled points: located {report['located']:.1%}; "
                 f"slice within one of the labelled {report['slice_within_one']:.1%} (exact {report['slice_exact']:.1%}); "
                 f"point error median {report['median_mm']:.2f} mm, 90th percentile {report['p90_mm']:.2f} mm; "
                 f"the image decided {report['image_decided']:.1%}")
    write_text_atomic(layout.locator_report(group), json.dumps(report, indent=1))
    return report


def summarise(frame: pd.DataFrame) -> dict:
    """Shares over every labelled point (an unlocated one counts as missed); errors over located ones."""
    offset = frame["slice_offset"]
    return {"points": len(frame), "located": float(frame["located"].mean()),
            "slice_within_one": float((offset.abs() <= 1).mean()), "slice_exact": float((offset == 0).mean()),
            "median_mm": float(frame["error_mm"].median()), "p90_mm": float(frame["error_mm"].quantile(0.9)),
            "image_decided": float((frame["source"] == "located").mean() if frame["score"].notna().any() else 0.0)}
