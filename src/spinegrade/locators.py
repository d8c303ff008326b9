"""The groups' locators (``locating.Locator``), and what is done with any of them: train one on a run's
folds, locate a split, report it out of fold, say whether it is trained and which files it is made of.

Which locator a group uses is the registry's ``constants.GROUPS[group].locator``, one of ``LOCATORS``:

- ``sagittal_levels`` (spinal): the slice locator of ``slice_locator.py`` on Sagittal T2/STIR, each level
  on its own slice (:class:`LevelsLocator`);
- ``sagittal_foramina`` (foraminal): the learned offsets from the canal (``offsets.py``) as the
  starting window and fallback, and the slice locator of ``slice_locator.py`` on Sagittal T1 deciding each
  foramen's slice and point (``foramina.py``);
- ``axial_subarticular`` (subarticular): the offsets, projected on every axial stack, as the starting
  window and fallback, and the slice locator of ``slice_locator.py`` on Axial T2 deciding each recess's
  slice and point (``subarticular.py``).

The two placed from the canal can be trained without their slice locator (``head=False``: the offsets
alone, for comparison). A fourth group adds a registry entry and a ``Locator`` here, nothing else.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pandas as pd

from spinegrade.config import LocatorConfig
from spinegrade.constants import GROUPS, LEVELS
from spinegrade.data.dicom import DicomReadError, Stack, main_stack
from spinegrade.errors import SpinegradeError
from spinegrade.foramina import locate_foramina
from spinegrade.layout import RunLayout
from spinegrade.slice_locator import MARKER as SLICE_MARKER
from spinegrade.slice_locator import SliceLocator
from spinegrade.locating import (
    LOCATION_COLUMNS,
    LocatedStudy,
    Locator,
    canal_points,
    has_geometry,
    locations_table,
)
from spinegrade.logs import get_logger
from spinegrade.offsets import ANCHOR_GROUP
from spinegrade.offsets import MARKER as OFFSETS_MARKER
from spinegrade.offsets import PointOffsets
from spinegrade.progress import Progress
from spinegrade.study import Study, split_studies
from spinegrade.subarticular import locate_subarticular

log = get_logger(__name__)


def _slice_head_files(root: Path) -> list[Path]:
    """A slice locator's marker and its fold models, relative to ``root``."""
    files = [Path(SLICE_MARKER)]
    for fold in sorted(p.parent for p in root.glob("fold*/best.safetensors")):
        files += [fold.relative_to(root) / "localizer.json", fold.relative_to(root) / "best.safetensors"]
    return files


def _ensemble(root: Path, device, fold: int | None, choice: dict | None) -> SliceLocator:
    return SliceLocator(root, device=device, folds=None if fold is None else [fold], choice=choice)


class LevelsLocator(Locator):
    """The spinal canal at every level on the study's first Sagittal T2/STIR series: the slice locator
    decides each level's slice within a window around the middle slice (moved by the most common
    labelled offset), falling back on that slice where it is unsure."""

    name = "sagittal_levels"

    def __init__(self, group: str, root: Path, device, fold: int | None = None, threshold: float | None = None,
                 choice: dict | None = None):
        super().__init__(group, root, device, fold, threshold, choice)
        self.ensemble = _ensemble(self.root, device, fold, choice)

    @classmethod
    def train(cls, group, config, data_dir, folds_path, output_dir, device, resume, force, head):
        from spinegrade.slice_locator_training import train_slice_locator

        return train_slice_locator(config, data_dir, folds_path, output_dir, device=device, resume=resume, force=force,
                               group=group)

    @classmethod
    def finished(cls, root: Path) -> bool:
        return (root / SLICE_MARKER).is_file()

    @classmethod
    def files(cls, root: Path) -> list[Path]:
        return _slice_head_files(root)

    def locate(self, study: Study, start: LocatedStudy | None) -> LocatedStudy:
        kind = GROUPS[self.group].series_kind
        series = study.of_kind(kind)[:1]  # the first (a scanner folder: the largest)
        stacks, problem = series[0].read() if series else ([], f"no {kind} series listed")
        return locate_levels(study.study_id, main_stack(stacks), series[0].key if series else "", self.group,
                             self.ensemble, problem, self.threshold)


def locate_levels(study_id: int, stack: Stack | None, series: str, group: str, slice_locator: SliceLocator,
                  problem: str | None = None, threshold: float | None = None) -> LocatedStudy:
    """Each level's spinal canal slice of the series' main ``stack`` and its point there (``threshold``:
    the presence a slice needs, default the one chosen out of fold)."""
    started = time.perf_counter()
    if stack is None or len(stack) == 0:
        return LocatedStudy(study_id, {}, None, problem or f"no readable {GROUPS[group].series_kind} slice")
    while True:  # a slice whose pixels cannot be decoded leaves the stack, and the choice is made again
        try:
            located = slice_locator.locate(stack, threshold)
            break
        except DicomReadError:
            stack.slices.pop(slice_locator.choose_slice(stack))
            if not stack.slices:
                return LocatedStudy(study_id, {}, None, problem or f"no decodable {GROUPS[group].series_kind} slice")
    chosen = set(int(k) for k in located.slice_index)
    for i, s in enumerate(stack.slices):  # keep memory flat over hundreds of studies
        if i not in chosen:
            s.pixels = None
    rows = [[study_id, condition, level, series, stack.slices[int(k)].instance_number, stack.slices[int(k)].frame, float(x), float(y),
             "located" if sure or not slice_locator.presence else "located, unsure: the middle slice", float(score)]
            for condition in GROUPS[group].conditions
            for level, k, (x, y), sure, score in zip(LEVELS, located.slice_index, located.points, located.sure,
                                                     located.score)]
    return LocatedStudy(study_id, {series: [stack]}, pd.DataFrame(rows, columns=LOCATION_COLUMNS),
                        seconds=time.perf_counter() - started)


class OffsetsLocator(Locator):
    """Points beside the spinal canal, on every series of the group's description: each level's canal
    point (the spinal locator's) plus the learned offset of its side and level gives the starting
    window; where the run has the group's slice locator, the image decides within it (``place``: the
    group's placing function, ``foramina.locate_foramina`` or ``subarticular.locate_subarticular``).
    Sides come from ImagePositionPatient and ImageOrientationPatient, so a series without them is set
    aside with a problem naming it."""

    anchor = ANCHOR_GROUP
    place: ClassVar[Callable]  # (study_id, canal points, series -> stacks, offsets, head=, threshold=) -> (rows, outside)

    def __init__(self, group: str, root: Path, device, fold: int | None = None, threshold: float | None = None,
                 choice: dict | None = None):
        super().__init__(group, root, device, fold, threshold, choice)
        self.offsets = PointOffsets.load(self.root, folds=None if fold is None else [fold])
        with_head = choice is not None or (self.root / SLICE_MARKER).is_file()
        self.head = _ensemble(self.root, device, fold, choice) if with_head else None

    @classmethod
    def train(cls, group, config, data_dir, folds_path, output_dir, device, resume, force, head):
        from spinegrade.slice_locator_training import train_slice_locator
        from spinegrade.offsets import train_offsets

        train_offsets(data_dir, folds_path, output_dir, group)
        if head:
            return train_slice_locator(config, data_dir, folds_path, output_dir, device=device, resume=resume,
                                   force=force, group=group)
        root = RunLayout(output_dir).locator_dir(group, existing=False)
        (root / SLICE_MARKER).unlink(missing_ok=True)  # the offsets alone: an earlier head must not be read back
        for fold in root.glob("fold*"):
            shutil.rmtree(fold)
        return None

    @classmethod
    def finished(cls, root: Path) -> bool:
        has_head = any(root.glob("fold*/localizer.json"))
        return (root / OFFSETS_MARKER).is_file() and (not has_head or (root / SLICE_MARKER).is_file())

    @classmethod
    def files(cls, root: Path) -> list[Path]:
        return [Path(OFFSETS_MARKER), *(_slice_head_files(root) if (root / SLICE_MARKER).is_file() else [])]

    def locate(self, study: Study, start: LocatedStudy | None) -> LocatedStudy:
        study_id, description = study.study_id, GROUPS[self.group].series_kind
        stacks, problems = {}, []
        for series in study.of_kind(description):
            try:
                found, problem = series.read()
            except Exception as exc:  # one bad series must never stop the run
                found, problem = [], f"{series.key}: {type(exc).__name__}: {exc}"
            if found and not has_geometry(found):  # a default orientation would place the sides anywhere
                found, problem = [], f"{series.key}: no ImagePositionPatient/ImageOrientationPatient, so its sides cannot be told"
            if found:
                stacks[series.key] = found
            else:
                problems.append(problem)
        if start is not None and start.locations is not None and not all(
                start.slice_of(r).has_geometry for r in start.locations.itertuples()):
            start = LocatedStudy(study_id, {}, None, "its slice has no ImagePositionPatient/ImageOrientationPatient")
        if not stacks:
            return LocatedStudy(study_id, {}, None, problems[0] if problems else f"no {description} series listed")
        if start is None or start.locations is None:
            reason = start.problem if start is not None else "not located"
            return LocatedStudy(study_id, stacks, None, f"no spinal canal points to start the {self.group} points "
                                                        f"from (Sagittal T2/STIR: {reason})")
        extra = {"head": self.head, "threshold": self.threshold} if self.head is not None else {}
        try:
            rows, outside = self.place(study_id, canal_points(start), stacks, self.offsets, **extra)
        except Exception as exc:  # one bad study must never stop the run: it gets the prior
            rows, outside = [], []
            problems.insert(0, f"cannot place its {self.group} points ({type(exc).__name__}: {exc})")
        if outside:
            log.info(f"study {study_id}: no {description} series reaches the {self.group} points at "
                     f"{', '.join(outside)}; prior rows there")
        if rows:
            return LocatedStudy(study_id, stacks, pd.DataFrame(rows, columns=LOCATION_COLUMNS))
        return LocatedStudy(study_id, stacks, None,
                            problems[0] if problems else f"no {self.group} point inside the {description} volume")


class ForaminaLocator(OffsetsLocator):
    """Each neural foramen on Sagittal T1, per level and side (``foramina.py``)."""

    name = "sagittal_foramina"
    place = staticmethod(locate_foramina)


class RecessLocator(OffsetsLocator):
    """Both lateral recesses of each level on Axial T2, every stack of every series (``subarticular.py``)."""

    name = "axial_subarticular"
    place = staticmethod(locate_subarticular)


LOCATORS: dict[str, type[Locator]] = {c.name: c for c in (LevelsLocator, ForaminaLocator, RecessLocator)}


def locator_class(group: str) -> type[Locator] | None:
    """The registry's locator of ``group`` (None: the group has none yet)."""
    name = GROUPS[group].locator
    if name is None:
        return None
    if name not in LOCATORS:
        raise SpinegradeError(f"{group}: the registry names locator {name!r}, which is not one of {sorted(LOCATORS)}")
    return LOCATORS[name]


# --- what is done with any locator -----------------------------------------------------------------

def locator_trained(output_dir: Path, group: str) -> bool:
    """Whether the group's locator (and every locator it starts from) has finished training in this run."""
    cls = locator_class(group)
    return (cls is not None and cls.finished(RunLayout(output_dir).locator_dir(group))
            and (cls.anchor is None or locator_trained(output_dir, cls.anchor)))


def needed_locators(groups: list[str]) -> list[str]:
    """The locators that predicting ``groups`` runs: theirs and those they start from, in registry order."""
    needed = set()
    for group in groups:
        needed.add(group)
        cls = locator_class(group)
        if cls is not None and cls.anchor is not None:
            needed.update(needed_locators([cls.anchor]))
    return [g for g in GROUPS if g in needed]


def locator_files(root: Path, group: str) -> list[Path]:
    """The files of the group's trained locator in ``root``, relative to it (what a kernel carries)."""
    return locator_class(group).files(root)


def _by_fold(studies, folds: pd.Series | None) -> dict[int | None, list[int]]:
    """``studies`` grouped by the fold whose locator locates them (study -> fold in ``folds``), or all
    under None (the locator of every fold together)."""
    if folds is None:
        return {None: sorted(studies)}
    return {int(f): sorted(s for s in folds.index[folds == f] if s in studies) for f in sorted(folds.unique())}


def locate_studies(studies: list[Study], output_dir: Path, group: str, device, folds: pd.Series | None = None,
                   anchors: list[LocatedStudy] | None = None, threshold: float | None = None,
                   choice: dict | None = None) -> list[LocatedStudy]:
    """Each study located for ``group``, one after the other. With ``folds`` (study -> fold), each study
    by the locator of the fold that never saw it (out of fold). ``anchors``: the located studies of the
    group this locator starts from, when already at hand (else located here, on the same studies).
    ``threshold`` and ``choice``: a slice locator's presence threshold and its ``slice_choice.json``,
    in place of the saved ones (the out-of-fold report that chooses the threshold)."""
    cls = locator_class(group)
    if cls is None:
        raise SpinegradeError(f"{group}: no locator places its points yet")
    output_dir = Path(output_dir)
    if cls.anchor is not None and anchors is None:
        anchors = locate_studies(studies, output_dir, cls.anchor, device, folds)
    start = {st.study_id: st for st in anchors or []}
    by_id = {s.study_id: s for s in studies}
    root = RunLayout(output_dir).locator_dir(group)
    located: list[LocatedStudy] = []
    started, loading = time.perf_counter(), 0.0
    progress = Progress(len(studies), "located")
    for fold, ids in _by_fold(by_id, folds).items():
        t0 = time.perf_counter()
        locator = cls(group, root, device, fold=fold, threshold=threshold, choice=choice)
        loading += time.perf_counter() - t0
        for study_id in ids:
            study = by_id[study_id]
            t0 = time.perf_counter()
            try:
                st = locator.locate(study, start.get(study_id))
            except Exception as exc:  # one bad study must never stop the run: it gets the prior
                series = study.of_kind(GROUPS[group].series_kind)
                st = LocatedStudy(study_id, {}, None, f"{series[0].key if series else f'study {study_id}'}: "
                                                      f"{type(exc).__name__}: {exc}")
            st.seconds = time.perf_counter() - t0
            located.append(st)
            progress.step()
    log.info(f"{group}: located {sum(s.locations is not None for s in located)} of {len(located)} studies "
             f"({(time.perf_counter() - started - loading) / max(len(located), 1):.2f} s per study: reading and "
             f"locating; its models loaded in {loading:.2f} s)")
    return located


def locate_split(data_dir: Path, split: str, output_dir: Path, group: str, device, folds: pd.Series | None = None,
                 anchors: list[LocatedStudy] | None = None, threshold: float | None = None,
                 choice: dict | None = None) -> list[LocatedStudy]:
    """Every listed study of ``split`` located for ``group`` (:func:`locate_studies`)."""
    return locate_studies(split_studies(data_dir, split), output_dir, group, device, folds, anchors, threshold, choice)


def report_locator(output_dir: str | Path, data_dir: str | Path, group: str, folds_path: str | Path | None = None,
                   device: str | None = None, choice: dict | None = None) -> dict:
    """A group's locator out of fold on the training studies, as prediction runs it (each study by the
    fold models that never saw it), against the labelled points: ``oof_report.json`` in the locator's folder (``RunLayout.locator_report``).

    ``choice``: a slice locator just trained (what its ``slice_choice.json`` will hold, less the
    threshold). Its presence threshold is chosen first, on these out-of-fold studies
    (``locator_report.choose_threshold``), then ``slice_choice.json`` is written, marking it finished. The
    report's figures locate each fold at the threshold chosen on the other folds
    (``locator_report.nested_thresholds``), so they choose nothing on the studies they score."""
    from spinegrade.data.folds import read_folds
    from spinegrade.device import select_device
    from spinegrade.layout import run_folds
    from spinegrade.slice_locator_training import write_slice_choice
    from spinegrade.locator_report import (
        NEVER,
        choose_threshold,
        compare_with_labels,
        nested_thresholds,
        summarise,
        with_threshold,
        write_locator_report,
    )

    output_dir, data_dir = Path(output_dir), Path(data_dir)
    folds = read_folds(run_folds(RunLayout(output_dir), folds_path)).set_index("study_id")["fold"]
    device_ = select_device(device)
    anchor = locator_class(group).anchor
    # a locator that starts from another group's points starts from the same ones however often it is run here
    anchors = locate_split(data_dir, "train", output_dir, anchor, device_, folds=folds) if anchor else None

    def compared(threshold: float | None = None, with_choice: dict | None = None) -> pd.DataFrame:
        located = locate_split(data_dir, "train", output_dir, group, device_, folds=folds, anchors=anchors,
                               threshold=threshold, choice=with_choice)
        stacks = {(st.study_id, series): found for st in located for series, found in st.stacks.items()}
        return compare_with_labels(locations_table(located), stacks, data_dir, group)

    if choice is None:
        return write_locator_report(compared(), output_dir, group)
    by_head, by_geometry = compared(0.0, choice), compared(NEVER, choice)
    threshold = choose_threshold(by_head, by_geometry)
    write_slice_choice(output_dir, group, {**choice, "threshold": threshold})
    nested, per_fold = nested_thresholds(by_head, by_geometry, folds)
    log.info(f"{group}: presence threshold {threshold:.3f}, chosen out of fold on every fold (per held-out fold, "
             f"chosen on the others: {', '.join(f'{t:.3f}' for t in per_fold.values())})")
    pooled = summarise(with_threshold(by_head, by_geometry, threshold))  # chosen on the rows it scores
    optimistic = {k: pooled[k] for k in ("slice_within_one", "slice_exact", "median_mm", "image_decided")}
    return write_locator_report(nested, output_dir, group, threshold=threshold,
                                threshold_per_fold={str(k): v for k, v in per_fold.items()},
                                optimistic_threshold_on_every_fold=optimistic)


def train_locator(group: str, config: LocatorConfig, data_dir: str | Path, folds_path: str | Path,
                  output_dir: str | Path, device: str | None = None, resume: bool = False, force: bool = False,
                  head: bool = True) -> dict | None:
    """Train ``group``'s locator on every fold and write its out-of-fold report (returned). A group
    whose locator starts from another group's points needs that group's locator trained first.
    ``head``: train the slice locator of a group placed from the canal (else its offsets alone, and an
    earlier head is removed)."""
    cls = locator_class(group)
    if cls is None:
        log.warning(f"{group}: no locator to train yet; its rows are the training prior at prediction")
        return None
    choice = cls.train(group, config, Path(data_dir), Path(folds_path), Path(output_dir), device, resume, force, head)
    return report_locator(output_dir, data_dir, group, folds_path, device=device, choice=choice)
