"""Small real DICOM files with chosen geometry and quirks, for the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_mr(path: Path, pixels: np.ndarray, *, instance: int, position=(0.0, 0.0, 0.0), orientation=SAGITTAL,
             spacing=(0.8, 0.8), description="Sagittal T2/STIR", monochrome1=False, rescale=None,
             compress=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.InstanceNumber = instance
    ds.SeriesDescription = description
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = list(spacing)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    pixels = pixels.astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    if compress is not None:
        ds.compress(compress, pixels, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(rows=24, cols=20, offset=0) -> np.ndarray:
    return (np.arange(rows * cols).reshape(rows, cols) + offset).astype(np.uint16)


def restored(src: Path, dst: Path, *, pad_columns: tuple[int, int] = (0, 0), row_scale: float = 1.0,
             monochrome1: bool = False, rescale: tuple[float, float] | None = None) -> Path:
    """``src`` stored as another scanner might: columns of black added on each side (the image's
    position moves with its left edge), rows resampled by ``row_scale`` (the row spacing grows to
    match), inverted as MONOCHROME1, or kept as signed values with a slope and intercept. The
    anatomy stays where it is in patient space."""
    import cv2
    import pydicom

    ds = pydicom.dcmread(src)
    values = ds.pixel_array.astype(np.float64)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    position = np.array([float(v) for v in ds.ImagePositionPatient])
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    if row_scale != 1.0:
        rows = int(round(values.shape[0] * row_scale))
        actual = rows / values.shape[0]
        values = cv2.resize(values, (values.shape[1], rows), interpolation=cv2.INTER_AREA)
        # The first row's centre moves by half an old pixel less half a new one.
        position = position + (0.5 / actual - 0.5) * row_spacing * orientation[3:]
        row_spacing = row_spacing / actual
    left, right = pad_columns
    values = np.pad(values, ((0, 0), (left, right)))
    position = position - left * col_spacing * orientation[:3]
    if monochrome1:
        values = values.max() - values
    ds.PixelRepresentation = 0
    if rescale is not None:
        slope, intercept = rescale
        values = (values - intercept) / slope  # stored; the reader's values are stored * slope + intercept
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelRepresentation = 1
    stored = np.round(values).astype(np.int16 if rescale is not None else np.uint16)
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.PixelSpacing = [row_spacing, col_spacing]
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.Rows, ds.Columns = stored.shape
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = stored.tobytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst
