"""Store a DICOM slice as another scanner might, with the anatomy left where it is in patient space.

Datasets in the RSNA layout differ in how they store the same anatomy: matrix and aspect ratio,
pixel spacing, photometric interpretation, signed values with a rescale, bit depth. Results should
depend on the anatomy alone. These rewrites let the tests and `benchmarks/storage_invariance.py`
check that on real files: each keeps ImagePositionPatient and PixelSpacing consistent with the
new pixels, so a point in patient space lands on the same anatomy before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from spinegrade.data.dicom import read_slice
from spinegrade.data.multiframe import to_multiframe


@dataclass(frozen=True)
class Storage:
    """How to store a slice. ``pad_columns``: fractions of the width added as black on the left and
    right; ``row_scale``: the rows resampled to this fraction of their number (taller pixels);
    ``rescale``: (slope, intercept) with signed stored values; ``bits``: 16 or 8; ``in_plane``: the
    matrix stored ``"turned"`` (90 degrees clockwise), ``"transposed"`` or ``"mirrored"`` (its columns
    reversed), ImageOrientationPatient following so the anatomy stays put (a transposed or mirrored
    slice's normal points the other way: its series runs the other way too); ``syntax``: the transfer
    syntax (:func:`encode`); ``multiframe``: a split's series each one file (``multiframe.py``)."""

    pad_columns: tuple[float, float] = (0.0, 0.0)
    row_scale: float = 1.0
    monochrome1: bool = False
    rescale: tuple[float, float] | None = None
    bits: int = 16
    in_plane: str | None = None
    syntax: str = ExplicitVRLittleEndian  # the transfer syntax written (``encode``)
    multiframe: bool = False  # each series one Enhanced MR Image file (``restore_split``)


IN_PLANE = ("turned", "transposed", "mirrored")


def _in_plane(values: np.ndarray, position: np.ndarray, orientation: np.ndarray, spacing: tuple[float, float],
              how: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """(pixels, position, orientation, (row, column) spacing) of a slice stored ``how`` (``IN_PLANE``),
    every pixel at the same patient point as before."""
    across, down = orientation[:3], orientation[3:]
    row_spacing, col_spacing = spacing
    rows, cols = values.shape
    if how == "turned":  # new (row i, column j) = old (row rows-1-j, column i)
        return (np.ascontiguousarray(np.rot90(values, -1)), position + (rows - 1) * row_spacing * down,
                np.concatenate([-down, across]), (col_spacing, row_spacing))
    if how == "transposed":
        return np.ascontiguousarray(values.T), position, np.concatenate([down, across]), (col_spacing, row_spacing)
    if how == "mirrored":
        return (np.ascontiguousarray(values[:, ::-1]), position + (cols - 1) * col_spacing * across,
                np.concatenate([-across, down]), spacing)
    raise ValueError(f"in_plane must be one of {IN_PLANE}, not {how!r}")


def restore(src: Path, dst: Path, storage: Storage) -> Path:
    """Write ``src`` stored as ``storage`` says to ``dst``."""
    ds = pydicom.dcmread(src)
    values = read_slice(src).pixels.astype(np.float64)  # what the file means: rescaled, bright is high
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            delattr(ds, keyword)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    position = np.array([float(v) for v in ds.ImagePositionPatient])
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    if storage.row_scale != 1.0:
        rows = max(1, int(round(values.shape[0] * storage.row_scale)))
        actual = rows / values.shape[0]
        values = cv2.resize(values, (values.shape[1], rows), interpolation=cv2.INTER_AREA)
        # The first row's centre moves by half a new pixel less half an old one.
        position = position + (0.5 / actual - 0.5) * row_spacing * orientation[3:]
        row_spacing /= actual
    if storage.in_plane:
        values, position, orientation, (row_spacing, col_spacing) = _in_plane(
            values, position, orientation, (row_spacing, col_spacing), storage.in_plane)
        ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
    left, right = (int(round(f * values.shape[1])) for f in storage.pad_columns)
    values = np.pad(values, ((0, 0), (left, right)))
    position = position - left * col_spacing * orientation[:3]
    if storage.monochrome1:
        values = values.max() - values
    signed = storage.rescale is not None
    if signed:
        slope, intercept = storage.rescale
        values = (values - intercept) / slope  # a reader's values are stored * slope + intercept
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if storage.bits == 8:
        values = (values - values.min()) * (255.0 / max(np.ptp(values), 1e-6))
        dtype = np.int8 if signed else np.uint8
        values = values - 128 if signed else values
    else:
        dtype = np.int16 if signed else np.uint16
    values = np.round(values)
    limits = np.iinfo(dtype)
    if values.min() < limits.min or values.max() > limits.max:
        raise ValueError(f"{src}: stored values {values.min():g}..{values.max():g} do not fit {np.dtype(dtype).name} "
                         f"with {storage}")
    stored = values.astype(dtype)
    ds.BitsAllocated = ds.BitsStored = storage.bits
    ds.HighBit = storage.bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PhotometricInterpretation = "MONOCHROME1" if storage.monochrome1 else "MONOCHROME2"
    ds.PixelSpacing = [round(row_spacing, 6), round(col_spacing, 6)]
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    ds.Rows, ds.Columns = stored.shape
    encode(ds, stored, storage.syntax)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


# Lossy syntaxes and what they keep: JPEG baseline at quality 90 (8 bits), JPEG extended at 90 (12 bits),
# JPEG 2000 at a compression ratio of 10.
JPEG_QUALITY, J2K_RATIO = 90, 10


def encode(ds: pydicom.Dataset, stored: np.ndarray, syntax: str) -> None:
    """Set ``ds``'s pixel data to ``stored`` written in transfer syntax ``syntax``: uncompressed and
    deflated as they are; RLE, JPEG-LS and JPEG 2000 by pydicom's encoders (pylibjpeg-rle, pyjpegls,
    pylibjpeg-openjpeg); JPEG lossless (process 14), baseline and extended by imagecodecs (the suite's
    only use of it: pydicom encodes none of the JPEG family)."""
    syntax = UID(syntax)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = stored.tobytes()
    if syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
        ds.compress(syntax, stored, generate_instance_uid=False)
    elif syntax == JPEG2000:
        ds.compress(syntax, stored, generate_instance_uid=False, j2k_cr=[J2K_RATIO])
    elif syntax in (JPEGLosslessSV1, JPEGLossless, JPEGBaseline8Bit, JPEGExtended12Bit):
        import imagecodecs

        if syntax == JPEGBaseline8Bit and stored.dtype != np.uint8:
            raise ValueError("JPEG baseline holds 8 bits: store with bits=8")
        if syntax == JPEGExtended12Bit:
            ds.BitsStored, ds.HighBit = 12, 11
            stored = np.clip(stored, 0, 4095)
        options = ({"lossless": True, "predictor": 1 if syntax == JPEGLosslessSV1 else 6}
                   if syntax in (JPEGLosslessSV1, JPEGLossless)
                   else {"level": JPEG_QUALITY, **({"bitspersample": 12} if syntax == JPEGExtended12Bit else {})})
        ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(stored, **options)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        raise ValueError(f"no encoder here for transfer syntax {syntax} ({syntax.name})")


def restore_split(data_dir: Path, target: Path, storage: Storage, split: str = "test") -> Path:
    """A copy of ``data_dir`` whose ``{split}_images`` are stored as ``storage`` says; every other
    file and folder is linked, not copied."""
    target.mkdir(parents=True)
    images = f"{split}_images"
    for entry in data_dir.iterdir():
        if entry.name != images:
            (target / entry.name).symlink_to(entry.resolve())
    for path in sorted((data_dir / images).rglob("*")):
        if path.is_file():
            restore(path, target / images / path.relative_to(data_dir / images), storage)
    if storage.multiframe:
        for series_dir in sorted(p for p in (target / images).glob("*/*") if p.is_dir()):
            to_multiframe(series_dir)
    return target


def restore_study(study_dir: Path, target: Path, storage: Storage) -> Path:
    """``study_dir``'s series (its sub-folders) stored as ``storage`` says, in ``target``."""
    for path in sorted(study_dir.rglob("*")):
        if path.is_file():
            restore(path, target / path.relative_to(study_dir), storage)
    if storage.multiframe:
        for series_dir in sorted(p for p in target.iterdir() if p.is_dir()):
            to_multiframe(series_dir)
    return target
