"""The subarticular group's locator (``axial_subarticular`` in ``constants.GROUPS``): which Axial T2
slice shows each level, and where the left and right lateral recesses are on it, from DICOM
geometry alone.

The real axial data is the competition's worst: a study may have two to four Axial T2 series, a
series may hold several stacks at different angles (a block per disc), a stack may not reach every
level, and rows may run either way. So every stack of every axial series is read (grouped by
ImageOrientationPatient, ``data.dicom.group_into_stacks``) and each level's spinal canal point,
found by the level locator on the Sagittal T2/STIR, is projected along each stack's own normal:

- per stack, the nearest slice, if it lies within half the distance from that level's canal point
  to the neighbouring level's (farther, it shows another level or none);
- per series, the stack whose slice is nearest;
- across series, each series that has the level is graded and the probabilities are averaged
  (``predict.grade_studies``).

On the chosen slice, each side's point is the canal point plus that side's learned offset
(``offsets.py``), projected onto the slice: the patient's left is +x in patient space, whatever the
image's rows do. That is the starting window and the fallback. Where the run has the subarticular
slice locator (``slice_locator.SliceLocator``, its heatmaps the patient's sides on slices turned to one
orientation by their geometry), the image decides: it scores the slices within ``WINDOW`` of that
slice, in the same stack, that are still nearer this level than its neighbours, and each side takes
the slice where its presence is highest, at its heatmap's point (real labels put the two recesses of
a level on different slices in 43 % of levels). An unsure side (presence under the threshold chosen
out of fold, or a point off the image) keeps the offset's slice and point, and its ``source`` says so.
A level that no stack reaches gets prior rows, and the command says which.
"""

from __future__ import annotations

import numpy as np

from spinegrade.constants import GROUPS, LEVELS, CONDITION_SPECS, level_title
from spinegrade.data.dicom import Stack
from spinegrade.offsets import PointOffsets

GROUP = "subarticular"
WINDOW = 2  # slices either side of the geometric slice that the head reads


def neighbour_points(canal: dict[str, np.ndarray], level: str) -> list[np.ndarray]:
    """The canal points of the levels just above and below ``level``, where located."""
    k = LEVELS.index(level)
    return [canal[LEVELS[j]] for j in (k - 1, k + 1) if 0 <= j < len(LEVELS) and LEVELS[j] in canal]


def level_reach(canal: dict[str, np.ndarray], level: str) -> float:
    """Half the distance (mm) from ``level``'s canal point to its nearest neighbouring level's: a slice
    farther than that along its normal is nearer another level. Without a neighbour, 20 mm (half a
    typical lumbar level)."""
    neighbours = neighbour_points(canal, level)
    if not neighbours:
        return 20.0
    return 0.5 * min(float(np.linalg.norm(canal[level] - n)) for n in neighbours)


def nearest_level_slice(stack: Stack, point: np.ndarray, reach: float,
                        others: list[np.ndarray] = ()) -> tuple[int, float] | None:
    """(index in the stack, distance along its normal in mm) of the slice nearest ``point``; None when
    it is farther than ``reach``, nearer one of ``others`` (the neighbouring levels' canal points: on a
    stack tilted against the spine, distances along its normal are not distances along the spine), or
    when ``point`` projects outside its image."""
    projected = [s.patient_to_pixel(point) for s in stack.slices]
    distances = np.array([abs(d) for _, _, d in projected])
    k = int(distances.argmin())
    if distances[k] > reach or any(abs(stack.slices[k].patient_to_pixel(o)[2]) < distances[k] for o in others):
        return None
    x, y, _ = projected[k]
    return (k, float(distances[k])) if stack.slices[k].shows(x, y) else None


def level_window(stack: Stack, k: int, point: np.ndarray, reach: float, others: list[np.ndarray]) -> list[int]:
    """The slices within ``WINDOW`` of ``k`` that still show ``point``'s level: within ``reach`` of it
    along the stack's normal and nearer it than the neighbouring levels' canal points (``others``)."""
    window = []
    for j in range(max(0, k - WINDOW), min(len(stack), k + WINDOW + 1)):
        distance = abs(stack.slices[j].patient_to_pixel(point)[2])
        if distance <= reach and all(abs(stack.slices[j].patient_to_pixel(o)[2]) > distance for o in others):
            window.append(j)
    return window


def locate_subarticular(study_id: int, canal: dict[str, np.ndarray], stacks: dict[str, list[Stack]],
                        offsets: PointOffsets, head=None, threshold: float | None = None) -> tuple[list[list], list[str]]:
    """Rows of the locations table for every (side, level, axial series) that images the level, and
    a note per level that no series reaches. ``canal``: level -> patient point of its spinal canal;
    ``stacks``: series -> its stacks; ``head``: the subarticular slice locator (a
    ``slice_locator.SliceLocator``), None for the offsets alone; ``threshold``: its presence threshold
    (default: the one chosen out of fold)."""
    limit = head.threshold if threshold is None and head is not None else threshold
    sides = [CONDITION_SPECS[c].side for c in GROUPS[GROUP].conditions]  # the head's heatmaps, in this order
    # Each level's nearest slice on each axial series that reaches it, then the head on all their
    # windows at once (one forward pass per fold model for the study).
    reads: list[tuple[str, str, Stack, int, list[int]]] = []  # (level, series, stack, slice, window)
    for level in LEVELS:
        if level not in canal:
            continue
        reach, others = level_reach(canal, level), neighbour_points(canal, level)
        for series, series_stacks in stacks.items():
            hits = [(hit[1], stack, hit[0]) for stack in series_stacks
                    if (hit := nearest_level_slice(stack, canal[level], reach, others)) is not None]
            if hits:
                _, stack, k = min(hits, key=lambda h: h[0])
                window = level_window(stack, k, canal[level], reach, others) if head is not None else []
                reads.append((level, series, stack, k, window))
    scored = iter(head.score_many([(stack, window) for _, _, stack, _, window in reads if window]) if head is not None else [])
    rows, found = [], set()
    for level, series, stack, k, window in reads:
        probability, points = next(scored) if window else (None, None)
        for condition in GROUPS[GROUP].conditions:
            target = offsets.target(condition, level, canal[level])
            if target is None:
                continue
            s = stack.slices[k]
            x, y, _ = s.patient_to_pixel(target)
            source, score = "located" if head is None else "located, unsure: the offset's slice", np.nan
            if window:
                side = sides.index(CONDITION_SPECS[condition].side)
                best = int(np.nan_to_num(probability[:, side], nan=-1.0).argmax())
                score = float(probability[best, side])
                bx, by = points[best, side]
                if score >= limit and stack.slices[window[best]].shows(bx, by):
                    s, x, y, source = stack.slices[window[best]], float(bx), float(by), "located"
            if s.shows(x, y):
                rows.append([study_id, condition, level, series, s.instance_number, s.frame, float(x), float(y), source,
                             score])
                found.add(level)
    outside = [level_title(level) for level in LEVELS if level not in found]
    return rows, outside

