"""The foraminal group's locator (``sagittal_foramina`` in ``constants.GROUPS``): where each neural
foramen is on the Sagittal T1 series, per level and side, from DICOM geometry alone.

The foramen is placed at its learned offset from the level's spinal canal point (``offsets.py``).
Each T1 series is then read along its own normal: the slice nearest the foramen, and the foramen
projected onto it. Which side a slice shows comes from its ImagePositionPatient and
ImageOrientationPatient only, so a series stored left to right or right to left, in any file
order, gives the same slices.
"""

from __future__ import annotations

import numpy as np

from spinegrade.constants import GROUPS, LEVELS, level_title
from spinegrade.data.dicom import Stack, main_stack
from spinegrade.offsets import PointOffsets

GROUP = "foraminal"
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


def locate_foramina(study_id: int, canal: dict[str, np.ndarray], stacks: dict[str, list[Stack]],
                    offsets: PointOffsets) -> tuple[list[list], list[str]]:
    """Rows of the locations table for every (side, level, T1 series) whose foramen lies in that
    series' volume (its main stack), and a note per (side, level) that no series reaches. ``canal``:
    level -> patient point of its spinal canal; ``stacks``: series -> its stacks."""
    rows, outside = [], []
    for condition in GROUPS[GROUP].conditions:
        for level in LEVELS:
            point = offsets.target(condition, level, canal[level]) if level in canal else None
            found = False
            for series, series_stacks in stacks.items():
                stack = main_stack(series_stacks)
                hit = nearest_slice(stack, point) if point is not None and stack is not None else None
                if hit is None:
                    continue
                k, x, y = hit
                rows.append([study_id, condition, level, series, stack.slices[k].instance_number, x, y, "localised"])
                found = True
            if not found:
                outside.append(f"{condition.split('_')[0]} {level_title(level)}")
    return rows, outside
