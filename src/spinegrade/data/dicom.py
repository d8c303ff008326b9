"""The pipeline's only DICOM reader: DICOM slices and series with their geometry.

Slice order in a series is taken from geometry, never from file names or instance numbers: the
real data has instance numbers that start at 5031 and sagittal series that run right-to-left as
often as left-to-right. Slices are ordered by ImagePositionPatient projected on the slice normal
(the cross product of the two ImageOrientationPatient direction cosines), and one axial series may
hold several stacks with different orientations, which are returned separately.

A file may hold a whole series: an Enhanced MR Image (or a legacy-converted one, as PACS exports
make) keeps every frame's position, orientation, spacing and rescale in its functional groups, per
frame or shared by all (a group in both: the frame's own wins). Each frame is a :class:`Slice` of its
own (``frame``: its number, from 1), read with its own geometry; the file is decoded once for all.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from spinegrade.errors import DicomReadError

# Fallback geometry for files without the optional position tags: a plain sagittal plane, slices
# stacked along the normal in instance-number order.
_DEFAULT_ORIENTATION = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])
# Two slices belong to the same stack when their direction cosines agree to this tolerance.
_ORIENTATION_TOLERANCE = 1e-3
# A slice with a side shorter than this shows no anatomy (a 1x1 placeholder, an icon): it is never
# graded, and never serves as a graded slice's neighbour either.
MIN_IMAGE_SIDE = 8


@dataclass
class Slice:
    """One DICOM image with what is needed to place it in patient space (LPS, millimetres)."""

    path: Path
    instance_number: int
    position: np.ndarray  # ImagePositionPatient: centre of the top-left pixel
    orientation: np.ndarray  # ImageOrientationPatient: row direction (3), column direction (3)
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as DICOM orders it
    shape: tuple[int, int]  # (rows, columns)
    series_description: str = ""
    series_uid: str = ""
    study_uid: str = ""
    pixels: np.ndarray | None = field(default=None, repr=False)  # float32, rescaled, MONOCHROME2
    # False when ImagePositionPatient or ImageOrientationPatient is missing and a default stands in: such a
    # slice can be ordered, but it says nothing of the patient's sides.
    has_geometry: bool = True
    # The contrast, when the header gives it (ms): what tells T1 from T2 without a series description.
    repetition_time: float | None = None
    echo_time: float | None = None
    inversion_time: float | None = None
    # A multi-frame file's frame number (from 1, as ReferencedFrameNumber counts); 0: a single-frame file.
    frame: int = 0
    rescale: tuple[float, float] = (1.0, 0.0)  # a frame's (slope, intercept): applied when its file is decoded

    @property
    def row_direction(self) -> np.ndarray:
        """Unit vector along a row (increasing column index)."""
        return self.orientation[:3]

    @property
    def column_direction(self) -> np.ndarray:
        """Unit vector down a column (increasing row index)."""
        return self.orientation[3:]

    @cached_property
    def normal(self) -> np.ndarray:
        """The slice normal (row direction x column direction); kept, as ``distance``: a stack's order and
        every neighbour lookup ask for them again (the orientation and position never change)."""
        return np.cross(self.row_direction, self.column_direction)

    @cached_property
    def distance(self) -> float:
        """Position along the slice normal: the sort key of a stack."""
        return float(np.dot(self.position, self.normal))

    def pixel_to_patient(self, x: float, y: float) -> np.ndarray:
        """Patient coordinates (mm) of pixel column ``x``, row ``y``."""
        row_spacing, col_spacing = self.pixel_spacing
        return self.position + x * col_spacing * self.row_direction + y * row_spacing * self.column_direction

    def patient_to_pixel(self, point: np.ndarray) -> tuple[float, float, float]:
        """(x, y, distance from the plane in mm) of a patient-space point projected on this slice."""
        row_spacing, col_spacing = self.pixel_spacing
        offset = np.asarray(point, dtype=float) - self.position
        x = float(np.dot(offset, self.row_direction)) / col_spacing
        y = float(np.dot(offset, self.column_direction)) / row_spacing
        return x, y, float(np.dot(offset, self.normal))

    def shows(self, x: float, y: float) -> bool:
        """Whether pixel coordinates (centre of the first pixel at 0) fall on the image."""
        rows, cols = self.shape
        return -0.5 <= x <= cols - 0.5 and -0.5 <= y <= rows - 0.5


@dataclass
class Stack:
    """Slices sharing one orientation, ordered by position along their normal."""

    slices: list[Slice]

    @property
    def orientation(self) -> np.ndarray:
        return self.slices[0].orientation

    @property
    def normal(self) -> np.ndarray:
        return self.slices[0].normal

    def __len__(self) -> int:
        return len(self.slices)

    def index_of_instance(self, instance_number: int, frame: int = 0) -> int | None:
        for i, s in enumerate(self.slices):
            if s.instance_number == instance_number and s.frame == frame:
                return i
        return None


def _float_list(ds: pydicom.Dataset, keyword: str) -> list[float] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return [float(v) for v in value] if isinstance(value, (list, tuple, MultiValue)) else [float(value)]
    except (TypeError, ValueError):
        return None


def _grey(pixels: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Colour to grey, and MONOCHROME1 turned so that bright means high signal."""
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        pixels = pixels.mean(axis=-1)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        pixels = pixels.max() + pixels.min() - pixels
    return pixels


def _decode_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """A single-frame file's pixel data as float32 in the modality's units, bright meaning high signal."""
    pixels = ds.pixel_array.astype(np.float32)
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if slope is not None or intercept is not None:
        pixels = pixels * float(slope if slope is not None else 1.0) + float(intercept or 0.0)
    return _grey(pixels, ds)


def _open(path: Path, with_pixels: bool) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not with_pixels)
    except InvalidDicomError as exc:
        if "DICM" not in str(exc):
            raise DicomReadError(path, f"InvalidDicomError: {exc}") from None
        # pydicom's message advises force=True, which would only turn a stray file into garbage pixels.
        raise DicomReadError(path, "not a DICOM file: no 'DICM' marker after the 128-byte preamble") from None
    except (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DicomReadError(path, f"{type(exc).__name__}: {exc}") from None


def _frame_count(ds: pydicom.Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def read_slice(path: str | Path, with_pixels: bool = True) -> Slice:
    """Read one file's image (a multi-frame file's first frame: :func:`read_frames` reads them all);
    raise :class:`DicomReadError` naming it if it cannot be read or decoded."""
    return read_frames(path, with_pixels)[0]


def read_frames(path: str | Path, with_pixels: bool = True) -> list[Slice]:
    """Every image of one file: one :class:`Slice`, or one per frame of a multi-frame file (each with
    its own geometry). Raises :class:`DicomReadError` naming the file if it cannot be read or decoded."""
    path = Path(path)
    ds = _open(path, with_pixels)
    if _frame_count(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        frames = _frames(ds, path)
        if with_pixels:
            pixels, _ = _decoded(path, ds)
            for s in frames:
                s.pixels = _frame_pixels(pixels, s, ds)
        return frames
    return [_single(ds, path, with_pixels)]


def _single(ds: pydicom.Dataset, path: Path, with_pixels: bool) -> Slice:
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise DicomReadError(path, "no Rows/Columns: not an image")
    instance_number = _instance_number(ds, path)
    spacing = _spacing(_float_list(ds, "PixelSpacing"), path)
    # Without a position, stack along the normal by instance number so ordering still works.
    orientation_arr, position_arr, geometry = _placement(_float_list(ds, "ImageOrientationPatient"),
                                                         _float_list(ds, "ImagePositionPatient"), instance_number)
    pixels = None
    if with_pixels:
        try:
            pixels = _decode_pixels(ds)
        except Exception as exc:  # any decoder failure is a property of the file, not a bug here
            raise DicomReadError(path, f"cannot decode pixel data: {type(exc).__name__}: {exc}") from None
        if pixels.shape != (int(rows), int(cols)):
            raise DicomReadError(path, f"pixel data shape {pixels.shape} does not match Rows/Columns")
    return Slice(
        path=path,
        instance_number=instance_number,
        position=position_arr,
        orientation=orientation_arr,
        pixel_spacing=spacing,
        shape=(int(rows), int(cols)),
        series_description=str(ds.get("SeriesDescription", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        pixels=pixels,
        repetition_time=_float_or_none(ds, "RepetitionTime"),
        echo_time=_float_or_none(ds, "EchoTime"),
        inversion_time=_float_or_none(ds, "InversionTime"),
        has_geometry=geometry,
    )


def _instance_number(ds: pydicom.Dataset, path: Path) -> int:
    """InstanceNumber; without one, a numeric file name stands in (else 0)."""
    instance = ds.get("InstanceNumber")
    try:
        return int(instance) if instance not in (None, "") else int(path.stem) if path.stem.isdigit() else 0
    except (TypeError, ValueError):
        raise DicomReadError(path, f"InstanceNumber {instance!r} is not a number") from None


def _placement(orientation: list[float] | None, position: list[float] | None,
               order: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(orientation, position, whether both were given) of an image: without ImageOrientationPatient a
    plain sagittal plane stands in, without ImagePositionPatient a point ``order`` steps along the normal
    (its instance number, or its frame), so that ordering still works, though the sides cannot be told."""
    given = bool(orientation and len(orientation) == 6 and position is not None and len(position) == 3)
    orientation_arr = np.array(orientation if orientation and len(orientation) == 6 else _DEFAULT_ORIENTATION)
    if position is None or len(position) != 3:
        return orientation_arr, np.cross(orientation_arr[:3], orientation_arr[3:]) * float(order), given
    return orientation_arr, np.array(position), given


def _spacing(spacing: list[float] | None, path: Path) -> tuple[float, float]:
    if spacing is None:
        return 1.0, 1.0  # physical-size crops of such a file are in pixels, not millimetres
    if len(spacing) != 2 or not all(np.isfinite(v) and v > 0 for v in spacing):
        raise DicomReadError(path, f"invalid PixelSpacing {spacing}")
    return float(spacing[0]), float(spacing[1])


# Where a multi-frame file keeps what a single-frame file has at its top level: the functional group
# (a sequence of one item, per frame or shared) and the attribute in it.
_GROUP_OF = {"ImageOrientationPatient": ("PlaneOrientationSequence", "ImageOrientationPatient"),
             "ImagePositionPatient": ("PlanePositionSequence", "ImagePositionPatient"),
             "PixelSpacing": ("PixelMeasuresSequence", "PixelSpacing"),
             "RescaleSlope": ("PixelValueTransformationSequence", "RescaleSlope"),
             "RescaleIntercept": ("PixelValueTransformationSequence", "RescaleIntercept"),
             "RepetitionTime": ("MRTimingAndRelatedParametersSequence", "RepetitionTime"),
             "EchoTime": ("MREchoSequence", "EffectiveEchoTime"),
             "InversionTime": ("MRModifierSequence", "InversionTimes")}
# A legacy-converted file keeps what fits no functional group in these, per frame or shared.
_UNASSIGNED = ("UnassignedPerFrameConvertedAttributesSequence", "UnassignedSharedConvertedAttributesSequence")


def _frame_value(ds: pydicom.Dataset, own: pydicom.Dataset | None, keyword: str) -> list[float] | None:
    """A frame's value of ``keyword`` (a top-level keyword of a single-frame file): from its functional
    group, the frame's own before the shared one (a group in both: the frame's wins); else from the
    converted attributes left unassigned, the frame's before the shared; else the top level."""
    sequence, inner = _GROUP_OF[keyword]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    places = [(g, sequence, inner) for g in (own, shared)] + [(g, u, keyword) for g in (own, shared) for u in _UNASSIGNED]
    for groups, name, attribute in places:
        if groups is not None and name in groups and len(groups[name].value):
            found = _float_list(groups[name].value[0], attribute)
            if found is not None:
                return found
    return _float_list(ds, keyword)


def _frames(ds: pydicom.Dataset, path: Path) -> list[Slice]:
    """One header :class:`Slice` per frame of a multi-frame file, each with its own geometry, rescale
    and contrast (:func:`_frame_value`)."""
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise DicomReadError(path, "no Rows/Columns: not an image")
    count = _frame_count(ds)
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if per_frame and len(per_frame) != count:
        raise DicomReadError(path, f"{len(per_frame)} per-frame functional groups for {count} frames")
    instance_number = _instance_number(ds, path)  # two files of one series must not collide
    slices = []
    for k in range(count):
        own = per_frame[k] if per_frame else None

        def value(keyword: str) -> float | None:
            found = _frame_value(ds, own, keyword)
            return found[0] if found and np.isfinite(found[0]) else None

        orientation_arr, position_arr, geometry = _placement(_frame_value(ds, own, "ImageOrientationPatient"),
                                                             _frame_value(ds, own, "ImagePositionPatient"), k)
        slope, intercept = value("RescaleSlope"), value("RescaleIntercept")
        slices.append(Slice(
            path=path, instance_number=instance_number, position=position_arr, orientation=orientation_arr,
            pixel_spacing=_spacing(_frame_value(ds, own, "PixelSpacing"), path), shape=(int(rows), int(cols)),
            series_description=str(ds.get("SeriesDescription", "")), series_uid=str(ds.get("SeriesInstanceUID", "")),
            study_uid=str(ds.get("StudyInstanceUID", "")), has_geometry=geometry,
            repetition_time=value("RepetitionTime"), echo_time=value("EchoTime"), inversion_time=value("InversionTime"),
            frame=k + 1, rescale=(slope if slope is not None else 1.0, intercept or 0.0)))
    return slices


# A multi-frame file is decoded once for all its frames: the last few files' pixel data are kept (one
# series' frames are read together), never more.
_DECODED: OrderedDict[tuple, tuple[np.ndarray, pydicom.Dataset]] = OrderedDict()
_DECODED_FILES = 3  # a study's three series: each group reads its own, the grader after the locator


def _decoded(path: Path, ds: pydicom.Dataset | None = None) -> tuple[np.ndarray, pydicom.Dataset]:
    """(frames, rows, cols[, samples]) stored values of a multi-frame file, decoded once, and its dataset."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise DicomReadError(path, f"{type(exc).__name__}: {exc}") from None
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)  # a rewritten file is read again
    if key not in _DECODED:
        ds = ds if ds is not None and "PixelData" in ds else _open(path, with_pixels=True)
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # any decoder failure is a property of the file, not a bug here
            raise DicomReadError(path, f"cannot decode pixel data: {type(exc).__name__}: {exc}") from None
        if _frame_count(ds) == 1:
            pixels = pixels[None]
        _DECODED[key] = (pixels, ds)
        while len(_DECODED) > _DECODED_FILES:
            _DECODED.popitem(last=False)
    _DECODED.move_to_end(key)
    return _DECODED[key]


def _frame_pixels(pixels: np.ndarray, s: Slice, ds: pydicom.Dataset) -> np.ndarray:
    """One frame of a decoded multi-frame file as float32 in the modality's units, bright meaning high."""
    if s.frame > len(pixels):
        raise DicomReadError(s.path, f"frame {s.frame} of {len(pixels)} decoded: the pixel data is short")
    frame = pixels[s.frame - 1].astype(np.float32) * np.float32(s.rescale[0]) + np.float32(s.rescale[1])
    frame = _grey(frame, ds)
    if frame.shape != s.shape:
        raise DicomReadError(s.path, f"frame {s.frame}'s pixel data shape {frame.shape} does not match Rows/Columns")
    return frame


def _float_or_none(ds: pydicom.Dataset, keyword: str) -> float | None:
    try:
        value = float(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def group_into_stacks(slices: list[Slice]) -> list[Stack]:
    """Group slices by orientation and order each group along its normal.

    Stacks are returned in the order of their first slice's distance, so a caller that wants
    "the" stack of a sagittal series takes the longest one.
    """
    groups: list[list[Slice]] = []
    for s in slices:
        for group in groups:
            if np.allclose(group[0].orientation, s.orientation, atol=_ORIENTATION_TOLERANCE):
                group.append(s)
                break
        else:
            groups.append([s])
    stacks = [Stack(sorted(g, key=lambda s: (s.distance, s.instance_number))) for g in groups]
    return sorted(stacks, key=lambda st: st.slices[0].distance)


def list_dicom_files(directory: str | Path) -> list[Path]:
    """Every file below ``directory`` that might be DICOM (hidden files skipped), sorted."""
    directory = Path(directory)
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))


def load_pixels(s: Slice) -> np.ndarray:
    """The pixels of a slice read without them (headers first, pixels only for the slices used:
    a labelled slice and its neighbours are a few of a series' 15 to 20), kept on the slice."""
    if s.pixels is None:
        if s.frame:
            pixels, ds = _decoded(s.path)
            s.pixels = _frame_pixels(pixels, s, ds)
        else:
            s.pixels = read_slice(s.path, with_pixels=True).pixels
    return s.pixels


def read_series(
    directory: str | Path,
    with_pixels: bool = True,
    errors: list[DicomReadError] | None = None,
) -> list[Stack]:
    """Read every DICOM file in a series folder into stacks.

    An unreadable file raises :class:`DicomReadError`; pass a list as ``errors`` to collect such
    files there and go on with the rest instead.
    """
    return read_files(list_dicom_files(directory), with_pixels, errors)


def read_files(paths: list[Path], with_pixels: bool = True, errors: list[DicomReadError] | None = None) -> list[Stack]:
    """Like :func:`read_series`, for an explicit list of files of one series."""
    slices = []
    for path in paths:
        try:
            slices.extend(read_frames(path, with_pixels=with_pixels))
        except DicomReadError as exc:
            if errors is None:
                raise
            errors.append(exc)
    return group_into_stacks(slices)


def main_stack(stacks: list[Stack]) -> Stack | None:
    """The stack with the most slices (a sagittal series normally has exactly one)."""
    return max(stacks, key=len) if stacks else None
