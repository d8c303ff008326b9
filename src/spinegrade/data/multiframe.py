"""Store a series as one Enhanced MR Image file, as modern scanners and PACS exports often do.

``synth --multiframe`` writes its test studies this way, and the tests grade such studies against
their single-frame twins. The conversion is highdicom's legacy converter (Legacy Converted Enhanced MR
Image): every frame keeps its ImagePositionPatient in the per-frame functional groups, the shared
orientation, spacing and rescale in the shared ones, and TR/TE among the converted attributes. A
series whose slices differ in orientation (an axial series of tilted per-level blocks) is one file all
the same: the orientation then moves to the per-frame groups.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from spinegrade.data.dicom import list_dicom_files


def to_multiframe(series_dir: Path, target_dir: Path | None = None) -> Path:
    """Write ``series_dir``'s files as one multi-frame file ``<target_dir>/1.dcm`` (default: in place of
    the series' files, which are removed). Returns the file."""
    import logging

    import highdicom as hd
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    files = list_dicom_files(series_dir)
    datasets = [pydicom.dcmread(f) for f in files]
    first = datasets[0]
    logging.getLogger("highdicom").setLevel(logging.ERROR)  # it names each optional attribute it leaves out
    image = LegacyConvertedEnhancedMRImage(
        datasets, series_instance_uid=first.SeriesInstanceUID, series_number=int(first.get("SeriesNumber") or 1),
        sop_instance_uid=hd.UID(), instance_number=1)
    image.SeriesDescription = first.get("SeriesDescription", "")  # the converter appends "(enhanced conversion)"
    target_dir = target_dir or series_dir
    target_dir.mkdir(parents=True, exist_ok=True)
    if target_dir == series_dir:
        for f in files:
            f.unlink()
    out = target_dir / "1.dcm"
    image.save_as(out, enforce_file_format=True)
    return out
