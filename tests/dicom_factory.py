"""Small real DICOM files with chosen geometry and quirks, for the data-layer tests; and where a dataset's
labelled points lie in patient space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _mr_file(path: Path, sop_class: str, instance: int, description: str) -> FileDataset:
    """An empty MR file's dataset of ``sop_class``, explicit VR little endian, its parent folder made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.InstanceNumber = instance
    ds.SeriesDescription = description
    return ds


def write_mr(path: Path, pixels: np.ndarray, *, instance: int, position=(0.0, 0.0, 0.0), orientation=SAGITTAL,
             spacing=(0.8, 0.8), description="Sagittal T2/STIR", monochrome1=False, rescale=None,
             compress=None) -> Path:
    ds = _mr_file(path, MRImageStorage, instance, description)
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



def labelled_canal(table, study: int) -> dict[str, np.ndarray]:
    """Level -> patient point (mm) of the labelled spinal canal point of ``study`` (an index table)."""
    from spinegrade.data.dicom import read_slice

    rows = table[(table["study_id"] == study) & (table["condition"] == "spinal_canal_stenosis")
                 & table["instance_number"].notna()]
    return {r.level: read_slice(r.image_path, with_pixels=False).pixel_to_patient(r.x, r.y) for r in rows.itertuples()}


def mirror_series(source: Path, target: Path) -> None:
    """The same slices stored with their rows running the other way: pixel columns reversed, the row
    direction negated and the first pixel's position moved to the other end. Patient space is unchanged."""
    target.mkdir(parents=True)
    for f in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        pixels = ds.pixel_array[:, ::-1].copy()
        orientation = [float(v) for v in ds.ImageOrientationPatient]
        row = np.array(orientation[:3])
        position = np.array([float(v) for v in ds.ImagePositionPatient]) + row * float(ds.PixelSpacing[1]) * (ds.Columns - 1)
        ds.ImageOrientationPatient = [*(-row).tolist(), *orientation[3:]]
        ds.ImagePositionPatient = position.tolist()
        ds.PixelData = pixels.tobytes()
        ds.save_as(target / f.name)


def write_enhanced_mr(path: Path, frames: list[np.ndarray], positions: list, *, orientation=SAGITTAL,
                      spacing=(0.8, 0.8), frame_spacing: dict | None = None, slopes: list | None = None,
                      repetition_time=600.0, echo_times: list | None = None,
                      description="Sagittal T2/STIR") -> Path:
    """A true Enhanced MR Image file, its groups mixed as real files mix them: the orientation, the
    spacing and TR shared; each frame's position, rescale and TE its own; ``frame_spacing`` (frame index ->
    spacing) carries PixelMeasures in both places for those frames (the frame's own must win). Nothing
    of the geometry at the top level."""
    ds = _mr_file(path, EnhancedMRImageStorage, 1, description)
    ds.SeriesInstanceUID = generate_uid()
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames[0].shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0

    def item(**values) -> Dataset:
        d = Dataset()
        for k, v in values.items():
            setattr(d, k, v)
        return d

    shared = Dataset()
    shared.PlaneOrientationSequence = [item(ImageOrientationPatient=list(orientation))]
    shared.PixelMeasuresSequence = [item(PixelSpacing=list(spacing), SliceThickness=4.0)]
    shared.MRTimingAndRelatedParametersSequence = [item(RepetitionTime=repetition_time)]
    shared.PixelValueTransformationSequence = [item(RescaleSlope=1.0, RescaleIntercept=0.0, RescaleType="US")]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k, position in enumerate(positions):
        own = Dataset()
        own.FrameContentSequence = [item(InStackPositionNumber=k + 1)]
        own.PlanePositionSequence = [item(ImagePositionPatient=list(position))]
        if slopes is not None:
            own.PixelValueTransformationSequence = [item(RescaleSlope=slopes[k], RescaleIntercept=-10.0, RescaleType="US")]
        if echo_times is not None:
            own.MREchoSequence = [item(EffectiveEchoTime=echo_times[k])]
        if frame_spacing and k in frame_spacing:
            own.PixelMeasuresSequence = [item(PixelSpacing=list(frame_spacing[k]), SliceThickness=4.0)]
        per_frame.append(own)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.stack([f.astype(np.uint16) for f in frames]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
