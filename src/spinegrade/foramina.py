"""The foraminal group's locator (``sagittal_foramina`` in ``constants.GROUPS``): where each neural
foramen is on the Sagittal T1 series, per level and side.

Geometry gives the starting window: the foramen's learned offset from the level's spinal canal point
(``offsets.py``), and on each T1 series the slice nearest that point, read along the series' own
normal. The image decides: the foraminal slice locator (``slice_locator.SliceLocator`` trained on
the labelled foramina) scores the slices of that side within ``WINDOW`` slices of it, and the slice
where the level's presence is highest is the foramen's, at the point its heatmap gives. A head that
is unsure (its best presence under the threshold chosen out of fold, or its point off the image), or
a run trained without a head, keeps the offset's slice and point, and the row's ``source`` says so.
Which side a slice shows comes from its ImagePositionPatient and ImageOrientationPatient only (+x is
the patient's left), so a series stored left to right or right to left, in any file order, gives the
same slices.
"""

from __future__ import annotations

import numpy as np

from spinegrade.constants import GROUPS, LEVELS, CONDITION_SPECS, level_title
from spinegrade.data.dicom import Stack, main_stack
from spinegrade.offsets import PointOffsets

GROUP = "foraminal"
WINDOW = 2  # slices either side of the offset's slice that the head reads
MIDLINE_MM = 4.0  # a slice nearer the canal's centre line than this shows neither side's foramen
# A foramen farther than this many slice gaps from the nearest slice lies outside the T1 volume.
OUTSIDE_GAPS = 0.75
SINGLE_SLICE_MM = 3.0  # a T1 series of one slice reaches this far from it (about half a usual gap)


def nearest_slice(stack: Stack, point: np.ndarray) -> tuple[int, float, float] | None:
    """(index in the stack, x, y in its pixels) of the slice nearest ``point`` (patient mm), projected
    onto it; None when the point lies outside the stack's volume or its image."""
    projected = [s.patient_to_pixel(point) for s in stack.slices]
    distances = np.array([abs(d) for _, _, d in projected])
    k = int(distances.argmin())
    positions = np.array([s.distance for s in stack.slices])
    # one slice: no gap to measure, so the point must lie within SINGLE_SLICE_MM of it
    gap = float(np.median(np.diff(positions))) if len(stack) > 1 else SINGLE_SLICE_MM / OUTSIDE_GAPS
    if distances[k] > OUTSIDE_GAPS * abs(gap) + 1e-6:
        return None
    x, y, _ = projected[k]
    return (k, float(x), float(y)) if stack.slices[k].shows(x, y) else None


def lateral_mm(s, canal: np.ndarray) -> float:
    """How far the plane of slice ``s`` lies from the canal point along the patient's x (+: the patient's left)."""
    return float(-s.patient_to_pixel(canal)[2] * s.normal[0])


def side_window(stack: Stack, k: int, canal: np.ndarray, side: str) -> list[int]:
    """The slices within ``WINDOW`` of ``k`` that lie on ``side`` of the canal (geometry alone)."""
    sign = 1.0 if side == "left" else -1.0
    return [j for j in range(max(0, k - WINDOW), min(len(stack), k + WINDOW + 1))
            if sign * lateral_mm(stack.slices[j], canal) >= MIDLINE_MM]


def locate_foramina(study_id: int, canal: dict[str, np.ndarray], stacks: dict[str, list[Stack]],
                    offsets: PointOffsets, head=None, threshold: float | None = None) -> tuple[list[list], list[str]]:
    """Rows of the locations table for every (side, level, T1 series) whose foramen lies in that
    series' volume (its main stack), and a note per (side, level) that no series reaches. ``canal``:
    level -> patient point of its spinal canal; ``stacks``: series -> its stacks; ``head``: the
    foraminal slice locator (a ``slice_locator.SliceLocator``), None for the offsets alone;
    ``threshold``: its presence threshold (default: the one chosen out of fold)."""
    rows, outside = [], []
    found: dict[tuple[str, str], list[list]] = {}  # (side, level) -> a row per series that reaches it
    for series, series_stacks in stacks.items():
        stack = main_stack(series_stacks)
        if stack is None:
            continue
        starts = {}  # (condition, level) -> the offset's slice and point, and the head's window
        for condition in GROUPS[GROUP].conditions:
            for level in LEVELS:
                point = offsets.target(condition, level, canal[level]) if level in canal else None
                hit = nearest_slice(stack, point) if point is not None else None
                if hit is not None:
                    window = side_window(stack, hit[0], canal[level], CONDITION_SPECS[condition].side) if head else []
                    starts[(condition, level)] = (hit, window)
        scored = sorted({j for _, window in starts.values() for j in window})
        probability, points = head.score(stack, scored) if scored else (None, None)
        limit = head.threshold if threshold is None and head is not None else threshold
        for (condition, level), ((k, x, y), window) in starts.items():
            source, score = "located" if head is None else "located, unsure: the offset's slice", np.nan
            if window:
                at = [scored.index(j) for j in window]
                values = np.nan_to_num(probability[at, LEVELS.index(level)], nan=-1.0)
                best = at[int(values.argmax())]
                score = float(probability[best, LEVELS.index(level)])
                bx, by = points[best, LEVELS.index(level)]
                if score >= limit and stack.slices[scored[best]].shows(bx, by):
                    k, x, y, source = scored[best], float(bx), float(by), "located"
            found.setdefault((condition, level), []).append(
                [study_id, condition, level, series, stack.slices[k].instance_number, stack.slices[k].frame, x, y, source, score])
    for condition in GROUPS[GROUP].conditions:
        for level in LEVELS:
            if (condition, level) in found:
                rows.extend(found[(condition, level)])
            else:
                outside.append(f"{condition.split('_')[0]} {level_title(level)}")
    return rows, outside
