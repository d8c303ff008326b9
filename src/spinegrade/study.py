"""A study: its id and its series, each of one competition kind (Sagittal T1, Sagittal T2/STIR, Axial
T2), read from a competition split or from a folder straight off a scanner. Everything after reading
(locating, grading, the study page) takes a :class:`Study` and never asks where it came from.

- :func:`split_studies`: every study listed in ``<split>_series_descriptions.csv``, its series the
  listed folders ``<split>_images/<study>/<series>/``, in the CSV's order.
- :func:`scanner_study`: any DICOM files under one folder (any names, any nesting, other files
  ignored), grouped by SeriesInstanceUID; each series' kind from its SeriesDescription, and where the
  description is missing or unusual, from the slices' orientation (the normal along the patient's x
  axis: sagittal; along z: axial) and contrast (RepetitionTime and EchoTime: T1 is short and short,
  T2 long; an inversion recovery with a short inversion time or a long echo is a STIR, one with
  neither a T1 FLAIR).

A series' headers are read the first time a locator asks for them (:meth:`Series.read`), once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spinegrade.constants import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, SERIES_DESCRIPTIONS
from spinegrade.data.dicom import MIN_IMAGE_SIDE, DicomReadError, Slice, Stack, list_dicom_files, read_files, read_frames
from spinegrade.data.index import read_csv_checked
from spinegrade.errors import SpinegradeError

SCANNER_STUDY_ID = 1  # a scanner folder's study id in the rows it gets: the folder may be named anything
# Contrast from timing (ms): T1 has a short repetition and echo time, T2 a long echo or repetition time.
T1_MAX_TR, T1_MAX_TE, T2_MIN_TE, T2_MIN_TR = 1200.0, 40.0, 60.0, 2000.0
STIR_MAX_TI = 300.0  # a short inversion time nulls fat: STIR (a T1 FLAIR inverts at about 800 ms or more)


@dataclass
class Series:
    """One series of a study. ``key`` names it in the locations table and in messages: its folder (a
    split), or its SeriesInstanceUID (a scanner folder)."""

    key: str
    kind: str  # one of SERIES_DESCRIPTIONS
    files: list[Path] | None = None  # None: every DICOM file in the folder ``key``
    description: str = ""  # as its files say it (a scanner folder); a split's is its kind
    found_by: str = "the series CSV"
    uid: str = ""
    _read: tuple[list[Stack], str | None] | None = field(default=None, repr=False)

    def read(self) -> tuple[list[Stack], str | None]:
        """Every stack of the series (headers only: a locator decodes the slices it chooses), or why
        there is none. Placeholder images (under 8 pixels a side) are no slice to grade, as in training."""
        if self._read is None:
            self._read = self._stacks()
        return self._read

    def _stacks(self) -> tuple[list[Stack], str | None]:
        if self.files is None:
            folder = Path(self.key)
            if not folder.is_dir():
                return [], f"{folder}: series folder absent"
            paths = list_dicom_files(folder)
        else:
            paths = self.files
        errors: list[DicomReadError] = []
        stacks = read_files(paths, with_pixels=False, errors=errors)
        stacks = [Stack(kept) for kept in ([s for s in st.slices if min(s.shape) >= MIN_IMAGE_SIDE] for st in stacks) if kept]
        if not stacks:
            return [], f"{self.key}: no readable DICOM file" + (f" ({errors[0]})" if errors else "")
        return stacks, None


@dataclass
class Study:
    """A study's id and its series of the three kinds, in reading order (a split: the CSV's; a
    scanner folder: the largest Sagittal T2/STIR first, the one the level locator reads)."""

    study_id: int
    series: list[Series]

    def of_kind(self, kind: str) -> list[Series]:
        return [s for s in self.series if s.kind == kind]


# --- a competition split ---------------------------------------------------------------------------

def split_studies(data_dir: str | Path, split: str) -> list[Study]:
    """Every study listed for ``split`` in its series descriptions (sorted by id), with its listed
    series of the three kinds. A study listed without any keeps an empty list: it gets the prior."""
    data_dir = Path(data_dir)
    path = data_dir / f"{split}_series_descriptions.csv"
    listed = read_csv_checked(path, ["study_id", "series_id", "series_description"])
    series: dict[int, list[Series]] = {}
    for r in listed.itertuples():
        try:
            study = int(r.study_id)
        except (TypeError, ValueError):
            continue  # the index reports bad ids with their line
        series.setdefault(study, [])
        if r.series_description not in SERIES_DESCRIPTIONS:
            continue
        try:
            folder = data_dir / f"{split}_images" / str(study) / str(int(r.series_id))
        except (TypeError, ValueError):
            continue  # no usable series id: the study gets the prior
        series[study].append(Series(str(folder), r.series_description, description=r.series_description))
    return [Study(study, series[study]) for study in sorted(series)]


# --- a folder straight off a scanner ---------------------------------------------------------------

def kind_from_description(description: str) -> str | None:
    """The competition's series kind a SeriesDescription names, if it names one (whole words: "ax" in
    "max" or "tra" in "contrast" name nothing)."""
    d = description.lower().replace("_", " ")
    if d in (k.lower() for k in SERIES_DESCRIPTIONS):
        return next(k for k in SERIES_DESCRIPTIONS if k.lower() == d)
    words = set(re.findall(r"[a-z0-9]+", d))
    sagittal = bool(words & {"sag", "sagittal"})
    axial = bool(words & {"ax", "axial", "tra", "transverse", "transversal"})
    if sagittal and words & {"t1", "t1w"}:
        return SAGITTAL_T1
    if sagittal and words & {"t2", "t2w", "stir"}:
        return SAGITTAL_T2
    if axial and words & {"t2", "t2w"}:
        return AXIAL_T2
    return None


def kind_from_geometry(s: Slice) -> str | None:
    """The series kind from one slice's orientation and contrast, when the description says nothing
    (nothing without an ImageOrientationPatient)."""
    if not s.has_geometry:
        return None
    axis = int(np.argmax(np.abs(np.cross(s.orientation[:3], s.orientation[3:]))))  # 0: x (sagittal), 2: z (axial)
    tr, te = s.repetition_time, s.echo_time
    if s.inversion_time and (s.inversion_time <= STIR_MAX_TI or (te is not None and te >= T2_MIN_TE)):
        contrast = "T2"  # STIR: read as the T2 series
    elif s.inversion_time:
        contrast = "T1"  # T1 FLAIR
    elif tr is not None and tr <= T1_MAX_TR and (te is None or te <= T1_MAX_TE):
        contrast = "T1"
    elif (te is not None and te >= T2_MIN_TE) or (tr is not None and tr >= T2_MIN_TR):
        contrast = "T2"
    else:
        return None
    if axis == 0:
        return SAGITTAL_T1 if contrast == "T1" else SAGITTAL_T2
    if axis == 2 and contrast == "T2":
        return AXIAL_T2
    return None


def scanner_study(study_dir: str | Path) -> tuple[Study, list[str]]:
    """The study in a scanner folder, and what was left out (other series, files that are not DICOM,
    Sagittal T2/STIR series after the largest, which stay listed but unread). Refused when no series is of the three kinds."""
    study_dir = Path(study_dir)
    by_series: dict[str, list[Path]] = {}
    first: dict[str, Slice] = {}
    images: dict[str, int] = {}  # slices per series: a multi-frame file holds many
    skipped = 0
    for path in list_dicom_files(study_dir):
        try:
            frames = read_frames(path, with_pixels=False)
        except DicomReadError:
            skipped += 1  # not DICOM, or broken: the other files may still make the series
            continue
        header = frames[0]
        key = header.series_uid or header.series_description or "(no series id)"
        by_series.setdefault(key, []).append(path)
        first.setdefault(key, header)
        images[key] = images.get(key, 0) + len(frames)
    studies = sorted({h.study_uid for h in first.values() if h.study_uid})
    if len(studies) > 1:
        raise SpinegradeError(f"{study_dir}: holds {len(studies)} studies (StudyInstanceUID {', '.join(studies)}); "
                              "give one study's folder")
    found, notes = [], []
    for key, files in by_series.items():
        s = first[key]
        kind, how = kind_from_description(s.series_description), "description"
        if kind is None:
            kind, how = kind_from_geometry(s), "orientation and contrast"
        if kind is None:
            notes.append(f"series {s.series_description or key!r} ({images[key]} images): not one of the three kinds")
            continue
        found.append(Series(key, kind, sorted(files), s.series_description, how, s.series_uid))
    if skipped:
        notes.append(f"{skipped} files are not readable DICOM and were skipped")
    if not found:
        raise SpinegradeError(f"{study_dir}: no Sagittal T1, Sagittal T2/STIR or Axial T2 series among "
                              f"{sum(images.values())} DICOM images")
    # the Sagittal T2/STIR the level locator reads: the largest one, first
    found.sort(key=lambda f: (SERIES_DESCRIPTIONS.index(f.kind), -(images[f.key] if f.kind == SAGITTAL_T2 else 0)))
    extra = len([f for f in found if f.kind == SAGITTAL_T2]) - 1
    if extra > 0:
        notes.append(f"{extra} more Sagittal T2/STIR series not read (the level locator reads the largest)")
    return Study(SCANNER_STUDY_ID, found), notes
