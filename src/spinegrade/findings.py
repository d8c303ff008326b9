"""What was found for each target of one graded study, in the one shape every per-study output reads:
``grades.json``'s targets, the structured report's measurement groups (``structured_report.py``) and
the study page's table (``study_page.py``), whether the study came off a scanner or from a split.

A target is a dict: row_id, condition, group, side, level (``L4/L5``), grade, probabilities, source
("model", or "prior: " and why) and the points it was read at (series, its SeriesInstanceUID and
kind, instance, pixel x and y, patient mm).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.blend import Blend
from spinegrade.constants import (
    CONDITION_GROUP,
    CONDITION_SPECS,
    GROUPS,
    PROBABILITY_COLUMNS,
    SEVERITIES,
    level_title,
    parse_row_id,
)
from spinegrade.locating import LocatedStudy
from spinegrade.predict import SplitGrades
from spinegrade.study import Study


def located_in(grades: SplitGrades, study_id: int) -> dict[str, LocatedStudy | None]:
    """Group -> the study's located study for that group (None: the group was located, not this study)."""
    return {group: next((st for st in studies if st.study_id == study_id), None)
            for group, studies in grades.located.items()}


def study_targets(study: Study, grades: SplitGrades, submission: pd.DataFrame) -> list[dict]:
    """Every target of ``study`` in ``submission`` (its 25 rows; other studies' rows are ignored),
    with where it comes from and the points it was read at."""
    located = located_in(grades, study.study_id)
    by_key = {f.key: f for f in study.series}
    mine = submission[submission["row_id"].str.startswith(f"{study.study_id}_")]
    targets = []
    for r in mine.itertuples(index=False):
        _, condition, level = parse_row_id(r.row_id)
        group = CONDITION_GROUP[condition]
        probs = np.array([getattr(r, c) for c in PROBABILITY_COLUMNS])
        st = located.get(group)
        points = []
        if st is not None and st.locations is not None:
            for h in st.locations[(st.locations["condition"] == condition) & (st.locations["level"] == level)].itertuples():
                s = st.slice_of(h)
                f = by_key[h.series]
                points.append({"series": f.description, "series_uid": s.series_uid, "series_kind": f.kind,
                               "instance": int(h.instance_number), "frame": int(s.frame), "x": float(h.x), "y": float(h.y),
                               "patient_mm": [round(float(v), 2) for v in s.pixel_to_patient(h.x, h.y)]})
        if grades.graded(group, study.study_id, condition, level):
            source = "model"
        elif group not in grades.located:
            source = "prior: no model grades this group"
        elif st is not None and st.problem:
            source = f"prior: {st.problem}"
        else:
            source = f"prior: no {GROUPS[group].series_kind} slice reaches this level"
        targets.append({"row_id": r.row_id, "condition": condition, "group": group, "side": CONDITION_SPECS[condition].side,
                        "level": level_title(level), "grade": SEVERITIES[int(probs.argmax())],
                        "probabilities": dict(zip(PROBABILITY_COLUMNS, map(float, probs))), "source": source,
                        "points": points})
    return targets


def source_files(study: Study, grades: SplitGrades) -> dict[tuple[str, int], Path]:
    """(SeriesInstanceUID, InstanceNumber) -> file of every slice a point of ``study`` was read on; for a
    study with no point at all, one readable file of its series, so that a report still lands in its
    study (none: no readable file)."""
    sources = {(s.series_uid, s.instance_number): s.path
               for st in located_in(grades, study.study_id).values() if st is not None and st.locations is not None
               for s in (st.slice_of(r) for r in st.locations.itertuples())}
    if not sources:
        for series in study.series:
            stacks, _ = series.read()
            if stacks:
                s = stacks[0].slices[0]
                return {(s.series_uid, s.instance_number): s.path}
    return sources


def models_used(blends: dict[str, Blend]) -> dict[str, dict]:
    """Group -> the backbones of its blend and their weights, the blend's mode and the group's locator."""
    return {group: {"backbones": dict(zip(b.backbones, map(float, b.weights))), "mode": b.mode,
                    "locator": GROUPS[group].locator} for group, b in blends.items()}
