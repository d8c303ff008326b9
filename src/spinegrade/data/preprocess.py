"""Decode each needed DICOM slice once into model-ready 8-bit images, cached on disk.

Training never touches DICOM: every sample's image (the whole slice, its shape kept, or a crop of fixed
physical size around the labelled point) is computed once and stored in one memory-mapped array
per cache key. Each sample keeps its neighbouring slices too, and a crop keeps a margin around
it, so that training can shift the point and the slice the way a locator's errors would
without decoding anything again. The key covers everything that changes the bytes (condition group, input mode, image
size, crop size, the samples and their points, the preprocessing version), so folds and backbones
sharing those settings share the cache, and a changed setting can never read a stale one. A cache
is written to a temporary folder and renamed into place: a killed build leaves nothing trusted.

Decoding is the slow part (the real set is 147,000 files), so it runs over all cores and lands one
file per series (``cache/series-*/``), each written whole or not at all. A build stopped half-way
picks up at the first series not decoded, and another sample set with the same preprocessing (more
studies, other folds) decodes only the series it adds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from spinegrade.constants import CONDITION_GROUP, GROUPS, LEVELS, CONDITION_SPECS
from spinegrade.data.dicom import MIN_IMAGE_SIDE, Slice, Stack, load_pixels, read_series
from spinegrade.errors import DicomReadError, SpinegradeError
from spinegrade.logs import get_logger
from spinegrade.progress import Progress

log = get_logger(__name__)

# What a trained model was fed, recorded with it (``model.json``, ``localizer.json``) and checked by
# :func:`refuse_other_inputs` before it is used: bump a version with any change to what its images are.
PREPROCESS_VERSION = 7  # 7: every crop turned to one in-plane orientation (:func:`canonical_turn`), sagittal included; 6: neighbours in anatomical order, a far neighbour replaced by the labelled slice; 5: crops of an oriented group turned by side; 4: whole slices keep their shape, padding outside the window; 3: window after the crop
LOCATOR_INPUT_VERSION = 2  # 2: slices turned by :func:`canonical_turn` (transposes too), sagittal included, neighbours by :func:`neighbour_indices`; 1 (never recorded): axial slices flipped only, neighbours in the opposite order
# Intensity window: robust to the scanner's arbitrary scale and to a few hot pixels.
LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.5


@dataclass(frozen=True)
class PreprocessSettings:
    group: str  # the condition group (constants.GROUPS) whose samples these are
    input: str  # "full" or "crop"
    image_size: int
    crop_mm: float
    neighbours: int = 1  # slices cached on each side of the labelled one (:func:`cached_neighbours`)
    margin: float = 0.25  # a crop's cached canvas is this much larger, for point jitter
    turn_by_side: bool = False  # crops turned for their side (:func:`canonical_turn`)

    @classmethod
    def from_config(cls, config) -> "PreprocessSettings":
        return cls(config.group, config.input, config.image_size, config.crop_mm,
                   neighbours=cached_neighbours(config.slices),
                   turn_by_side=GROUPS[config.group].turn_by_side and config.input == "crop")

    @classmethod
    def from_model(cls, spec: dict) -> "PreprocessSettings":
        """What a trained fold's ``model.json`` was trained on, with the neighbours it reads as channels
        and no more (prediction's images; one from before condition groups names its ``condition``
        instead of its group; one from before turned crops saw them unturned; one from before
        neighbouring slices as channels reads one slice)."""
        group = spec.get("group") or CONDITION_GROUP[spec["condition"]]
        return cls(group, spec["input"], int(spec["image_size"]), float(spec["crop_mm"]),
                   neighbours=int(spec.get("slices", 1)) // 2, turn_by_side=bool(spec.get("turn_by_side", False)))

    @property
    def canvas_size(self) -> int:
        """Side of a cached image: the model's input plus an even margin (crops only)."""
        if self.input != "crop":
            return self.image_size
        return self.image_size + 2 * int(round(self.image_size * self.margin / 2))

    @property
    def mm_per_pixel(self) -> float:
        return self.crop_mm / self.image_size


def cached_neighbours(slices: int) -> int:
    """Slices cached on each side of the labelled one for a model that reads ``slices`` (odd) slices as
    channels: one more than it reads, so that training can move the whole stack by one slice (a
    locator's error) without leaving the cache. So the cache is keyed per setting: 1 slice caches 3
    canvases a sample, 3 slices 5, and 5 slices 7."""
    return slices // 2 + 1


# The window's percentiles are read on about this many pixels (an even grid over the image): the
# same window to within a grey level, at a fraction of the cost of sorting a 512 x 512 slice.
WINDOW_SAMPLE_PIXELS = 65536


def content_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), ends excluded: the slice without the rows and columns at its edges
    that hold one single value. Those are padding (a scanner's rectangular field of view filled
    out, an image pasted on a larger matrix), never anatomy: even air has noise."""
    varying_rows = np.flatnonzero(np.ptp(pixels, axis=1) > 0)
    varying_cols = np.flatnonzero(np.ptp(pixels, axis=0) > 0)
    whole = 0, pixels.shape[0], 0, pixels.shape[1]
    if len(varying_rows) == 0 or len(varying_cols) == 0:
        return whole
    box = int(varying_rows[0]), int(varying_rows[-1]) + 1, int(varying_cols[0]), int(varying_cols[-1]) + 1
    # A few varying pixels on a flat slice (a marker, a hot pixel) are no content to centre on or scale to.
    return box if min(box[1] - box[0], box[3] - box[2]) >= MIN_IMAGE_SIDE else whole


def window_limits(pixels: np.ndarray) -> tuple[float, float]:
    """The slice's intensity window: the 1st and 99.5th percentiles of its content (robust to scanner
    scale and hot pixels; black padding, left out by :func:`content_box`, would drag the 1st down)."""
    top, bottom, left, right = content_box(pixels)
    pixels = pixels[top:bottom, left:right]
    stride = max(1, int(np.sqrt(pixels.size / WINDOW_SAMPLE_PIXELS)))
    lo, hi = percentiles(pixels[::stride, ::stride], (LOW_PERCENTILE, HIGH_PERCENTILE))
    return float(lo), float(hi)


# Integer pixels spanning at most this many grey levels are counted rather than partitioned.
COUNTED_SPAN = 1 << 18


def percentiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile(values, qs)`` (its default, linear method), to the last bit. Whole-numbered
    pixels (the DICOM norm: 12 to 16 bit integers, as read or as floats after an integer rescale) are
    counted per grey level and each order statistic read off the cumulative counts: a fifth of the
    time of the partition numpy does, which was the costliest step of reading a slice. Other values
    (a fractional rescale) go to numpy itself."""
    flat = np.ravel(values)
    if flat.size == 0 or flat.dtype.kind not in "iuf" or (flat.dtype.kind == "u" and flat.dtype.itemsize == 8):
        return [float(v) for v in np.percentile(flat, qs)]
    with np.errstate(invalid="ignore"):  # NaN and infinities cast to nonsense, caught just below
        whole = flat.astype(np.int64)
    if flat.dtype.kind == "f" and not np.array_equal(whole, flat):  # fractions, NaN or infinities
        return [float(v) for v in np.percentile(flat, qs)]
    low, high = int(whole.min()), int(whole.max())
    if high - low > COUNTED_SPAN:
        return [float(v) for v in np.percentile(flat, qs)]
    cumulative = np.cumsum(np.bincount(whole - low, minlength=high - low + 1))
    kind, n = flat.dtype.type, flat.size

    def order_statistic(rank: int) -> np.ndarray:  # the rank-th smallest value (from 0), as a 1-array of the input's dtype
        return np.array([low + int(np.searchsorted(cumulative, rank, side="right"))]).astype(kind)

    out = []
    for q in qs:  # numpy's steps for the linear method: virtual index, neighbours, gamma, its lerp (on arrays, as numpy)
        virtual = (n - 1) * (np.float64(q) / 100)
        below = np.floor(virtual)
        if virtual >= n - 1:
            a = b = order_statistic(n - 1)
        else:
            a, b = order_statistic(int(below)), order_statistic(int(below) + 1)
        gamma = np.array([virtual - below])
        difference = b - a  # wraps as numpy's does for a narrow integer type, silently
        out.append(float((b - difference * (1 - gamma) if gamma[0] >= 0.5 else a + difference * gamma)[0]))
    return out


def apply_window(values: np.ndarray, limits: tuple[float, float]) -> np.ndarray:
    lo, hi = limits
    scaled = (np.asarray(values, dtype=np.float32) - lo) * (255.0 / max(hi - lo, 1e-6))
    return np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)


@dataclass(frozen=True)
class SquareView:
    """Where a whole slice sits in a square model input, in millimetres rather than pixels.

    The square shows ``field_mm`` (by default the longer side of the slice's content) centred on
    the slice's content: the slice is resized to that scale along both axes, black around it, cut
    where it is larger. So the anatomy keeps its shape whatever the slice's matrix, aspect ratio or
    pixel spacing, and with a fixed ``field_mm`` (the locator's) its size too. Squashing each
    slice into the square instead moved a locator's points by 11 mm (median) when the same slices
    were padded to 4:3 on one side. The content is the slice less its padding (:func:`content_box`),
    so black bands added on one side do not push the anatomy off-centre. Fields may be numpy arrays
    (one view per row of a table).
    """

    rows: int | np.ndarray  # the slice's size in pixels
    cols: int | np.ndarray
    width: int | np.ndarray  # the slice's size in the square, in its pixels
    height: int | np.ndarray
    left: int | np.ndarray  # the slice's top-left corner in the square (negative: cut on that side)
    top: int | np.ndarray
    size: int  # the square's side

    @classmethod
    def of(cls, shape: tuple[int, int], pixel_spacing: tuple[float, float], size: int,
           field_mm: float | None = None, content: tuple[int, int, int, int] | None = None) -> "SquareView":
        """``content``: (top, bottom, left, right) pixel rows and columns, ends excluded, to centre
        and measure (the whole slice by default); ``field_mm`` None: the content's longer side."""
        rows, cols = shape
        top, bottom, left, right = content or (0, rows, 0, cols)
        field_mm = field_mm or max((bottom - top) * pixel_spacing[0], (right - left) * pixel_spacing[1])
        width = max(1, round(size * cols * pixel_spacing[1] / field_mm))
        height = max(1, round(size * rows * pixel_spacing[0] / field_mm))
        # The content's centre (in pixel edges: the slice spans 0..cols) lands on the square's centre.
        return cls(rows, cols, width, height, math.floor(size / 2 - (left + right) / 2 * width / cols),
                   math.floor(size / 2 - (top + bottom) / 2 * height / rows), size)

    @classmethod
    def squashed(cls, shape: tuple[int, int], size: int) -> "SquareView":
        """The whole slice resized to the square whatever its shape: how locators trained before
        ``field_mm`` existed saw every slice, kept so that they still see what they learnt on."""
        return cls(shape[0], shape[1], size, size, 0, 0, size)

    @classmethod
    def fitted(cls, pixels: np.ndarray, pixel_spacing: tuple[float, float], size: int,
               field_mm: float | None = None) -> "SquareView":
        """The view of a decoded slice: centred on its content, padding left out."""
        return cls.of(pixels.shape, pixel_spacing, size, field_mm, content_box(pixels))

    @classmethod
    def columns(cls, table: pd.DataFrame, size: int, trailing_axes: int = 0) -> "SquareView":
        """The views of every row of a table with the ``view_*`` columns :meth:`as_dict` writes, as
        arrays of shape ``(N,) + (1,) * trailing_axes``, to broadcast against (N, ...) points."""
        shape = (-1,) + (1,) * trailing_axes
        return cls(*(table[f"view_{k}"].to_numpy().reshape(shape)
                     for k in ("rows", "cols", "width", "height", "left", "top")), size)

    def as_dict(self) -> dict:
        return {"view_rows": self.rows, "view_cols": self.cols, "view_width": self.width, "view_height": self.height,
                "view_left": self.left, "view_top": self.top}

    def render(self, pixels: np.ndarray, limits: tuple[float, float] | None = None) -> np.ndarray:
        """The slice resized into its place in the square, then windowed (``limits``: the slice's
        own window by default): uint8 (size, size), black around the slice."""
        limits = limits or window_limits(pixels)
        canvas = np.full((self.size, self.size), limits[0], np.float32)  # the window's black
        resized = cv2.resize(np.asarray(pixels, dtype=np.float32), (self.width, self.height),
                             interpolation=cv2.INTER_AREA)
        top, left = max(self.top, 0), max(self.left, 0)  # negative: the slice is cut on that side
        bottom, right = min(self.top + self.height, self.size), min(self.left + self.width, self.size)
        canvas[top:bottom, left:right] = resized[top - self.top:bottom - self.top, left - self.left:right - self.left]
        return apply_window(canvas, limits)

    def to_unit(self, x, y):
        """Pixel coordinates of the slice (centre of the first pixel at 0) -> [0, 1] of the square."""
        return ((self.left + (x + 0.5) * self.width / self.cols) / self.size,
                (self.top + (y + 0.5) * self.height / self.rows) / self.size)

    def to_pixels(self, u, v):
        """The inverse of :meth:`to_unit`."""
        return ((u * self.size - self.left) * self.cols / self.width - 0.5,
                (v * self.size - self.top) * self.rows / self.height - 0.5)


def prepare_image(pixels: np.ndarray, pixel_spacing: tuple[float, float], x: float, y: float,
                  settings: PreprocessSettings, size: int | None = None,
                  limits: tuple[float, float] | None = None) -> np.ndarray:
    """The model's input for one point on one slice: a ``size`` square of uint8 (``image_size`` by
    default; a crop keeps the scale of ``crop_mm`` over ``image_size`` whatever ``size`` is).

    The slice's window (``limits``, computed when not given) is applied after resizing or cropping:
    on the small output, not on the whole slice."""
    limits = limits or window_limits(pixels)
    size = size or settings.image_size
    image = np.asarray(pixels, dtype=np.float32)
    if settings.input == "full":  # the whole slice, its shape kept
        return SquareView.of(image.shape, pixel_spacing, size).render(image, limits)
    row_spacing, col_spacing = pixel_spacing
    mm_per_output_pixel = settings.mm_per_pixel
    sx, sy = col_spacing / mm_per_output_pixel, row_spacing / mm_per_output_pixel
    if sx < 1 or sy < 1:
        # Shrinking: average pixels first (INTER_AREA) so the crop does not alias, then crop at scale 1.
        h, w = image.shape
        new_w, new_h = max(1, round(w * sx)), max(1, round(h * sy))
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        x, y = (x + 0.5) * new_w / w - 0.5, (y + 0.5) * new_h / h - 0.5
        sx, sy = 1.0, 1.0
    # Output pixel u shows input point x + (u - (size - 1) / 2) / sx: the point lands in the centre.
    centre = (size - 1) / 2
    matrix = np.array([[sx, 0.0, centre - sx * x], [0.0, sy, centre - sy * y]])
    # Outside the image is the window's black (its lower limit), whatever the scanner's zero means.
    fitted = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=limits[0])
    return apply_window(fitted, limits)


# Where one in-plane orientation puts the patient (LPS: +x the patient's left, +y posterior, +z head),
# per plane (the patient axis nearest the slice normal): (the image's right, the image's down).
# Axial: the patient's left to the right, the back down (radiology's view mirrored: the way the
# recess models have always seen both sides); sagittal: the back to the right, the feet down;
# coronal: the patient's left to the right, the feet down.
_CANONICAL_RIGHT_DOWN = {2: (np.array([1.0, 0, 0]), np.array([0, 1.0, 0])),
                         0: (np.array([0, 1.0, 0]), np.array([0, 0, -1.0])),
                         1: (np.array([1.0, 0, 0]), np.array([0, 0, -1.0]))}


def canonical_turn(s: Slice, side: str | None = None) -> tuple[bool, bool, bool]:
    """(transpose, flip rows, flip columns) that show slice ``s`` in its plane's one orientation
    (``_CANONICAL_RIGHT_DOWN``), decided by ImageOrientationPatient alone: a series stored turned 90
    degrees, transposed or mirrored reaches every model (locators and graders, sagittal and axial) as
    the same image. With ``side`` on an axial slice, that side's lateral direction goes to the image's
    right instead (the right side's crop is mirrored), so both sides' crops show one anatomy."""
    across, down = s.row_direction, s.column_direction  # where a step along a row, and down a column, goes
    right, below = _CANONICAL_RIGHT_DOWN[int(np.argmax(np.abs(s.normal)))]
    if side == "right" and right[0] == 1.0:
        right = -right  # an axial or coronal slice read for the patient's right: its lateral to the right
    transpose = abs(float(down @ right)) > abs(float(across @ right))  # the columns run where the rows should
    if transpose:
        across, down = down, across
    return transpose, float(down @ below) < 0, float(across @ right) < 0


def turn(image: np.ndarray, transpose: bool, flip_rows: bool, flip_cols: bool) -> np.ndarray:
    """``image`` (H, W) transposed, then flipped, as :func:`canonical_turn` says."""
    image = image.T if transpose else image
    return np.ascontiguousarray(image[::-1 if flip_rows else 1, ::-1 if flip_cols else 1])


def turned_spacing(pixel_spacing: tuple[float, float], how: tuple[bool, bool, bool]) -> tuple[float, float]:
    """A slice's (row, column) spacing once :func:`turn` has turned it."""
    return (pixel_spacing[1], pixel_spacing[0]) if how[0] else (pixel_spacing[0], pixel_spacing[1])


def turn_point(x, y, how: tuple[bool, bool, bool], shape: tuple[int, int]):
    """A pixel point (column x, row y) of an image of ``shape`` (as stored) mapped into it turned by
    :func:`turn`."""
    rows, cols = shape
    if how[0]:
        x, y, rows, cols = y, x, cols, rows
    return (cols - 1 - x if how[2] else x), (rows - 1 - y if how[1] else y)


def unturn_point(x, y, how: tuple[bool, bool, bool], shape: tuple[int, int]):
    """The inverse of :func:`turn_point`: a point of the turned image back in the stored one's pixels."""
    rows, cols = (shape[1], shape[0]) if how[0] else shape
    x, y = (cols - 1 - x if how[2] else x), (rows - 1 - y if how[1] else y)
    return (y, x) if how[0] else (x, y)


def refuse_other_inputs(saved: dict, key: str, current: int, where) -> None:
    """Raise, naming ``where`` (a fold's folder), when a trained model's record (``saved``: its
    model.json or localizer.json) says it was fed other inputs than this code makes (``key``:
    ``preprocess_version`` or ``locator_input_version``), or says nothing of them (saved before
    they were recorded): such a model reads images it never saw, and grades them without a word."""
    version = saved.get(key)
    command = "train-localizer" if key == "locator_input_version" else "train"
    if version is None:
        raise SpinegradeError(f"{where}: saved before its inputs' version ({key}) was recorded, so this code cannot "
                              f"tell whether it makes that model's inputs; train it again ({command} --force)")
    if int(version) != current:
        raise SpinegradeError(f"{where}: trained on inputs of {key} {version}, and this code makes {current}; "
                              f"train it again ({command} --force)")


# What identifies a sample's image; labels and folds are deliberately not part of it (see build_cache).
SAMPLE_KEY = ["study_id", "condition", "level"]


# The patient axis each kind of slice stack's channels run along (LPS: +x the patient's left, +y
# posterior, +z head). Sagittal: from the patient's right to left; for one side's structure (a
# foramen), from the midline out (medial to lateral), so both sides reach a model the same way round.
# Axial: from superior to inferior. Coronal: front to back.
SAGITTAL_ORDER, AXIAL_ORDER, CORONAL_ORDER = np.array([1.0, 0, 0]), np.array([0, 0, -1.0]), np.array([0, 1.0, 0])
NEIGHBOUR_REACH = 0.5  # a neighbour n slices away may lie up to (n + this) slice gaps from the labelled slice


def anatomical_direction(stack: Stack, side: str | None) -> np.ndarray:
    """The patient-space direction a stack's neighbouring slices are ordered along, as channels:
    from the stack's normal (its nearest patient axis) and the side of the structure graded."""
    axis = int(np.argmax(np.abs(stack.normal)))
    if axis == 0:
        return -SAGITTAL_ORDER if side == "right" else SAGITTAL_ORDER
    return AXIAL_ORDER if axis == 2 else CORONAL_ORDER


def anatomical_step(stack: Stack, side: str | None = None) -> int:
    """+1 when the stack's order (along its normal) runs the anatomical way (:func:`anatomical_direction`),
    -1 when it runs against it (a series stored the other way round)."""
    return -1 if float(stack.normal @ anatomical_direction(stack, side)) < 0 else 1


def anatomical_position(stack: Stack, index: int) -> int:
    """Slice ``index``'s place in the stack counted the anatomical way (for no side): the same slice of
    the same anatomy whichever way the series runs."""
    return index if anatomical_step(stack) == 1 else len(stack) - 1 - index


def neighbour_indices(stack: Stack, index: int, neighbours: int, side: str | None = None) -> list[int]:
    """Indices of the ``2 * neighbours + 1`` slices read around slice ``index``, in anatomical order
    (:func:`anatomical_direction`), whichever way the series was stored. Past the stack's ends, or
    farther from the labelled slice than ``n + NEIGHBOUR_REACH`` slice gaps for the n-th neighbour (a
    jump between the blocks of a per-level axial series), the labelled slice stands in."""
    distances = np.array([s.distance for s in stack.slices])
    gap = float(np.median(np.abs(np.diff(distances)))) if len(stack) > 1 else 0.0
    step = anatomical_step(stack, side)
    out = []
    for n in range(-neighbours, neighbours + 1):
        k = index + step * n
        if not 0 <= k < len(stack) or abs(distances[k] - distances[index]) > (abs(n) + NEIGHBOUR_REACH) * gap + 1e-6:
            k = index
        out.append(k)
    return out


def prepare_stack(stack: Stack, index: int, x: float, y: float, settings: PreprocessSettings,
                  windowed: dict[int, tuple[float, float] | None] | None = None,
                  problems: list[str] | None = None, condition: str | None = None) -> np.ndarray:
    """Canvases (2 * neighbours + 1, C, C) for slice ``index`` of ``stack`` and its neighbours, in
    anatomical order (:func:`neighbour_indices`), each centred on the same patient-space point
    (projected on the neighbour's own geometry); past the ends of the stack, across a jump in it, or
    where a neighbour cannot be decoded, the labelled slice stands in. Each canvas is turned to its
    plane's one orientation (:func:`canonical_turn`), with ``settings.turn_by_side`` (a group's
    ``ConditionGroup.turn_by_side``, recorded with its models) for ``condition``'s side.
    Pixels are decoded here, for these slices only; ``windowed`` keeps each slice's window limits
    across the calls for one series (the five levels usually sit on the same few slices)."""
    windowed = {} if windowed is None else windowed
    if index in windowed and windowed[index] is None:  # found undecodable as another sample's neighbour
        raise DicomReadError(stack.slices[index].path, "cannot decode pixel data (named above as a neighbouring slice)")
    point = stack.slices[index].pixel_to_patient(x, y)
    side = CONDITION_SPECS[condition].side if condition else None
    out = []
    for k in neighbour_indices(stack, index, settings.neighbours, side):
        if k not in windowed:
            try:
                windowed[k] = window_limits(load_pixels(stack.slices[k]))
            except DicomReadError as exc:
                if k == index:
                    raise
                if problems is not None:
                    problems.append(f"neighbouring slice replaced by the labelled one: {exc}")
                windowed[k] = None  # undecodable: remembered for the other samples of this series
        if windowed[k] is None:
            k = index
            if k not in windowed:
                windowed[k] = window_limits(load_pixels(stack.slices[k]))
        s = stack.slices[k]
        px, py, _ = s.patient_to_pixel(point)
        canvas = prepare_image(s.pixels, s.pixel_spacing, px, py, settings, size=settings.canvas_size,
                               limits=windowed[k])
        canvas = turn(canvas, *canonical_turn(s, side if settings.turn_by_side else None))
        out.append(canvas)
    return np.stack(out)


def centre_view(canvases: np.ndarray, image_size: int, slices: int = 1) -> np.ndarray:
    """The model's input from a sample's cached canvases (cached slices, C, C): the centre ``slices``
    slices (slices, S, S), cut to ``image_size`` around the centre, as training sees it without jitter
    (and prediction always)."""
    margin = (canvases.shape[-1] - image_size) // 2
    centre = canvases.shape[0] // 2
    return np.asarray(canvases[centre - slices // 2:centre + slices // 2 + 1,
                               margin:margin + image_size, margin:margin + image_size])


@dataclass
class SampleCache:
    """Cached canvases (N, slices, C, C) uint8, memory-mapped, and their samples table (row i <-> i)."""

    directory: Path
    images: np.ndarray
    samples: pd.DataFrame

    def __len__(self) -> int:
        return len(self.samples)


def cache_key(settings: PreprocessSettings, samples: pd.DataFrame) -> str:
    identity = samples[["study_id", "condition", "level", "image_path", "x", "y"]].astype(str).to_csv(index=False)
    payload = json.dumps({"settings": asdict(settings), "version": PREPROCESS_VERSION}, sort_keys=True) + identity
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _prepare_series(args) -> tuple[list[int], list[np.ndarray], list[str]]:
    """All samples on one series: it is decoded once, whatever the number of levels read on it."""
    series_dir, rows, settings = args
    errors: list[DicomReadError] = []
    stacks = read_series(series_dir, with_pixels=False, errors=errors)  # headers; pixels when used
    problems = [f"skipped slice: {e}" for e in errors]
    # A slice too small to show anatomy leaves the stack, so that it is no sample's neighbour either.
    too_small: dict[Path, str] = {}
    for stack in stacks:
        for s in stack.slices:
            if min(s.shape) < MIN_IMAGE_SIDE:
                too_small[Path(s.path)] = f"{s.path}: image of {s.shape[0]}x{s.shape[1]} pixels is too small to grade"
                problems.append(f"skipped slice: {too_small[Path(s.path)]}")
    if too_small:
        stacks = [Stack(kept) for kept in ([s for s in st.slices if Path(s.path) not in too_small] for st in stacks)
                  if kept]
    indices, images = [], []
    windowed: dict[int, dict[int, tuple[float, float]]] = {}  # per stack, per slice: its window
    for i, path, instance, x, y, condition in rows:
        if Path(path) in too_small:
            problems.append(f"skipped sample: {too_small[Path(path)]}")
            continue
        found = [(st, st.index_of_instance(instance)) for st in stacks]
        found = [(st, k) for st, k in found if k is not None]
        if not found:
            multiframe = any(s.frame for st in stacks for s in st.slices)
            reason = next((str(e) for e in errors if Path(e.path) == Path(path)),
                          f"{path}: its series is stored as one multi-frame file; a training label names one "
                          "file per slice (instance_number), so it cannot be trained on" if multiframe
                          else f"{path}: file not found")
            problems.append(f"skipped sample: {reason}")
            continue
        stack, k = found[0]
        height, width = stack.slices[k].shape
        # A point off the image would be cropped from the black border: an empty image with a grade.
        if not (np.isfinite(x) and np.isfinite(y) and 0 <= x < width and 0 <= y < height):
            problems.append(f"skipped sample: {path}: point ({x:g}, {y:g}) lies outside the image "
                            f"({height}x{width} pixels, rows x columns)")
            continue
        try:
            images.append(prepare_stack(stack, k, x, y, settings, windowed.setdefault(id(stack), {}), problems,
                                        condition))
        except DicomReadError as exc:
            problems.append(f"skipped sample: {exc}")
            continue
        indices.append(i)
    return indices, images, problems


def build_cache(samples: pd.DataFrame, settings: PreprocessSettings, cache_root: str | Path,
                workers: int = 0) -> SampleCache:
    """Cache the images of ``samples`` (usable rows of the tidy index) or reuse a cache with the same key.

    Samples whose file turns out unreadable are dropped (and logged with the file's path). The
    returned table carries the *current* columns of ``samples`` (grade, fold...), never those of the
    run that built the cache: only the images are cached, so a corrected label or a new folds file
    can never be served stale.
    """
    samples = samples.reset_index(drop=True)
    key = cache_key(settings, samples)
    directory = Path(cache_root) / f"{settings.group}-{settings.input}-{settings.image_size}-{key}"
    if not _complete(directory):
        _write_cache(samples, settings, directory, workers)
    cache = open_cache(directory)
    cached = cache.samples[SAMPLE_KEY + ["level_index"]]
    current = cached.merge(samples, on=SAMPLE_KEY, how="left", validate="one_to_one")
    return SampleCache(cache.directory, cache.images, current)


def _complete(directory: Path) -> bool:
    return (directory / "samples.csv").is_file() and (directory / "images.npy").is_file()


def _series_chunk_name(series_dir: str, rows: list[tuple], settings: PreprocessSettings) -> str:
    """A decoded series is identified by its folder, the samples read on it and the settings: the same
    chunk serves any sample set (another folds file, a few more studies) that contains those samples."""
    identity = json.dumps([series_dir, [r[1:] for r in rows], asdict(settings), PREPROCESS_VERSION])
    return hashlib.sha256(identity.encode()).hexdigest()[:24] + ".npz"


def _save_chunk(path: Path, rows: list[tuple], result: tuple[list[int], list[np.ndarray], list[str]],
                settings: PreprocessSettings) -> None:
    """One series' canvases, written to a temporary name and renamed: a chunk that exists is whole."""
    indices, images, problems = result
    position = {row[0]: k for k, row in enumerate(rows)}
    c = settings.canvas_size
    stacked = np.stack(images) if images else np.zeros((0, 2 * settings.neighbours + 1, c, c), np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # unique across machines
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, rows=np.array([position[i] for i in indices], dtype=np.int64), images=stacked,
                     problems=np.array(problems, dtype=str))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_cache(samples: pd.DataFrame, settings: PreprocessSettings, directory: Path, workers: int) -> None:
    """Decode every series not decoded before (in parallel, one chunk file per series, so an
    interrupted build resumes where it stopped), then assemble the samples' array from the chunks."""
    series_dirs = samples["image_path"].map(lambda p: str(Path(p).parent))
    jobs = [(series_dir, [(int(i), r.image_path, int(r.instance_number), float(r.x), float(r.y), r.condition)
                          for i, r in group.iterrows()])
            for series_dir, group in samples.groupby(series_dirs, sort=True)]
    chunks = directory.parent / f"series-{settings.group}-{settings.input}-{settings.image_size}-" \
        f"{hashlib.sha256(json.dumps([asdict(settings), PREPROCESS_VERSION]).encode()).hexdigest()[:12]}"
    chunks.mkdir(parents=True, exist_ok=True)
    paths = [chunks / _series_chunk_name(d, rows, settings) for d, rows in jobs]
    todo = [(job, path) for job, path in zip(jobs, paths) if not _chunk_is_whole(path)]
    if len(todo) < len(jobs):
        log.info(f"cache: {len(jobs) - len(todo)} of {len(jobs)} series already decoded in {chunks}; "
                 f"decoding the other {len(todo)}")
    workers = workers or os.cpu_count() or 1
    progress = Progress(len(todo), "cache: decoded", unit="series")
    if workers > 1 and len(todo) > 4:
        with ProcessPoolExecutor(min(workers, len(todo))) as pool:
            futures = {pool.submit(_prepare_series, (d, rows, settings)): (rows, path) for (d, rows), path in todo}
            for future in as_completed(futures):
                rows, path = futures[future]
                _save_chunk(path, rows, future.result(), settings)
                progress.step()
    else:
        for (d, rows), path in todo:
            _save_chunk(path, rows, _prepare_series((d, rows, settings)), settings)
            progress.step()
    _assemble(samples, jobs, paths, settings, directory)


def _assemble(samples: pd.DataFrame, jobs: list, paths: list[Path], settings: PreprocessSettings,
              directory: Path) -> None:
    """The samples' canvases in sample order, written straight to a memory-mapped file (memory stays
    flat however many studies), into a temporary folder renamed into place."""
    ok = np.zeros(len(samples), dtype=bool)
    for (_, rows), path in zip(jobs, paths):
        chunk = _read_chunk(path, ("rows", "problems"))
        if chunk is None:
            raise SpinegradeError(f"{path}: damaged while this cache was being built; run again to decode that series again")
        for problem in chunk["problems"]:
            log.warning(str(problem))
        ok[[rows[k][0] for k in chunk["rows"]]] = True
    slot = np.cumsum(ok) - 1  # a kept sample's row in the assembled array
    kept = samples[ok].reset_index(drop=True)
    kept = kept.assign(level_index=kept["level"].map({lv: i for i, lv in enumerate(LEVELS)}))
    c = settings.canvas_size
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(kept), 2 * settings.neighbours + 1, c, c))
        for (_, rows), path in zip(jobs, paths):
            chunk = _read_chunk(path)
            if chunk is None or chunk["images"].shape[1:] != images.shape[1:]:
                raise SpinegradeError(f"{path}: damaged while this cache was being built; run again to decode "
                                      "that series again")
            for k, image in zip(chunk["rows"], chunk["images"]):
                images[slot[rows[k][0]]] = image
        images.flush()
        del images
        kept[SAMPLE_KEY + ["level_index", "image_path", "x", "y"]].to_csv(tmp / "samples.csv", index=False)
        (tmp / "settings.json").write_text(json.dumps({**asdict(settings), "version": PREPROCESS_VERSION}, indent=1))
        tmp.chmod(0o755)
        os.replace(tmp, directory)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(directory):  # not another process finishing the same cache first
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size_mb = (directory / "images.npy").stat().st_size / 1e6
    log.info(f"cache: {len(kept)} samples from {len(jobs)} series in {directory} ({size_mb:.1f} MB, "
             f"{size_mb * 1000 / max(kept['study_id'].nunique(), 1):.0f} kB per study)")


def open_cache(directory: str | Path) -> SampleCache:
    """Never unpickles (``np.load`` refuses object arrays); a damaged cache is named, to be deleted."""
    directory = Path(directory)
    try:
        images = np.load(directory / "images.npy", mmap_mode="r")
        samples = pd.read_csv(directory / "samples.csv")
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise SpinegradeError(f"{directory}: damaged preprocessing cache ({type(exc).__name__}: {exc}); "
                              "delete that folder and it is built again") from None
    if len(images) != len(samples):
        raise SpinegradeError(f"{directory}: damaged preprocessing cache ({len(images)} images, {len(samples)} "
                              "samples); delete that folder and it is built again")
    return SampleCache(directory, images, samples)


CHUNK_FIELDS = ("rows", "images", "problems")


def _chunk_is_whole(path: Path) -> bool:
    """The archive holds exactly the expected plain arrays (headers only are read: cheap). A damaged
    or tampered file fails this and its series is decoded again."""
    try:
        with zipfile.ZipFile(path) as archive:
            if sorted(archive.namelist()) != sorted(f"{name}.npy" for name in CHUNK_FIELDS):
                return False
            for name in archive.namelist():
                with archive.open(name) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    if read_header(f)[2].hasobject:
                        return False
        return True
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False


def _read_chunk(path: Path, fields: tuple[str, ...] = CHUNK_FIELDS) -> dict | None:
    """Those fields of a decoded series (never unpickled), or None when the file is damaged."""
    try:
        with np.load(path) as chunk:
            return {name: chunk[name] for name in fields}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
