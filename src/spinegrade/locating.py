"""What every locator is: the interface the groups' locators fill, and the located study they return.

A locator places one condition group's points on the series that group is read on: per target, a row
of the *locations table* (study, condition, level, series, instance, frame, x, y, source, score). Each group
names its locator in the registry (``constants.GROUPS[group].locator``); the implementations are in
``locators.py``. Every locator does the same four things, as timm's models fill one model API:

- **train** on a run's folds (``Locator.train``), writing its files under
  ``OUTPUT/trained_models/localizer/<group>/`` (``RunLayout.locator_dir``), the marker last;
- **load** the models of every fold, or of one fold for out-of-fold use (the constructor);
- **locate** one :class:`~spinegrade.study.Study` (``Locator.locate``), returning a :class:`LocatedStudy`;
- say whether it is **finished** and which **files** a Kaggle kernel must carry.

Reporting out of fold, and locating a whole split, are the same loop for every locator
(``locators.locate_studies``, ``locators.report_locator``). A locator that starts from another group's
points (the foramina and recesses start from the spinal canal) names that group in ``anchor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from spinegrade.config import LocatorConfig
from spinegrade.data.dicom import Slice, Stack
from spinegrade.errors import SpinegradeError
from spinegrade.offsets import find_instance
from spinegrade.study import Study

# ``source``: "located" (the image decided), or "located, unsure: ..." (a slice locator's presence was
# under its threshold, so the geometric choice placed it); ``score``: that presence (NaN: none read).
# ``frame``: the slice's frame number in a multi-frame file (from 1); 0 for a file of one image
LOCATION_COLUMNS = ["study_id", "condition", "level", "series", "instance_number", "frame", "x", "y", "source", "score"]


@dataclass
class LocatedStudy:
    """One study's series for a group and where its points were found on them (``locations``: rows
    of the locations table, whose ``series`` names a key of ``stacks``); ``problem`` says why it has none."""

    study_id: int
    stacks: dict[str, list[Stack]]  # series -> its stacks; only the chosen slices keep their pixels
    locations: pd.DataFrame | None
    problem: str | None = None
    seconds: float = 0.0

    def stack_at(self, row) -> tuple[Stack, int]:
        """The stack a locations row points into, and the index of its slice there (instance numbers
        name a slice within its series: a series whose stacks repeat them is read by its first stack)."""
        stacks = self.stacks.get(row.series, [])
        frame = int(getattr(row, "frame", 0) or 0)
        found = find_instance(stacks, int(row.instance_number), frame)
        if found is None:
            raise SpinegradeError(f"{row.series}: no slice with instance number {int(row.instance_number)}"
                                  + (f", frame {frame}" if frame else ""))
        return stacks[found[0]], found[1]

    def slice_of(self, row) -> Slice:
        """The slice a locations row points at."""
        stack, k = self.stack_at(row)
        return stack.slices[k]


def locations_table(located: list[LocatedStudy]) -> pd.DataFrame:
    """The locations of every located study, one table."""
    frames = [s.locations for s in located if s.locations is not None]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=LOCATION_COLUMNS)


def canal_points(anchor: LocatedStudy | None) -> dict[str, np.ndarray]:
    """Level -> patient point (mm) of the spinal canal where the spinal locator placed it."""
    if anchor is None or anchor.locations is None:
        return {}
    return {r.level: anchor.slice_of(r).pixel_to_patient(r.x, r.y) for r in anchor.locations.itertuples()}


class Locator:
    """One group's locator, loaded with the models of every fold (or of ``fold`` alone, out of fold).

    A subclass sets ``name`` (the registry's name for it) and ``anchor`` (the group whose located
    points it starts from, if any), and fills
    ``train``, ``finished``, ``files`` and ``locate``. ``threshold`` and ``choice`` replace a slice
    locator's saved presence threshold and ``slice_choice.json`` (the out-of-fold report that
    chooses the threshold passes them before it is written)."""

    name: ClassVar[str]
    anchor: ClassVar[str | None] = None

    def __init__(self, group: str, root: Path, device, fold: int | None = None, threshold: float | None = None,
                 choice: dict | None = None):
        self.group, self.root, self.threshold = group, Path(root), threshold

    @classmethod
    def train(cls, group: str, config: LocatorConfig, data_dir: Path, folds_path: Path, output_dir: Path,
              device: str | None, resume: bool, force: bool, head: bool) -> dict | None:
        """Train on every fold of the run; return a slice locator's choice still to be completed by
        the out-of-fold report (its threshold), or None when there is nothing to choose."""
        raise NotImplementedError

    @classmethod
    def finished(cls, root: Path) -> bool:
        """Whether its training finished in ``root`` (not counting the locators it starts from)."""
        raise NotImplementedError

    @classmethod
    def files(cls, root: Path) -> list[Path]:
        """The files a trained locator is made of, relative to ``root`` (what a kernel carries)."""
        raise NotImplementedError

    def locate(self, study: Study, start: LocatedStudy | None) -> LocatedStudy:
        """Where this study's points are, on its series of the group's kind; ``start``: the anchor
        group's located study (None without an anchor)."""
        raise NotImplementedError


def has_geometry(stacks: list[Stack]) -> bool:
    """Whether every slice has ImagePositionPatient and ImageOrientationPatient (sides can be told)."""
    return all(s.has_geometry for stack in stacks for s in stack.slices)
