"""The study page's DICOM Structured Report, read back with pydicom and highdicom (and checked by
dciodvfy where dicom3tools is installed)."""

from __future__ import annotations

import shutil
import subprocess

import pandas as pd
import pydicom
import pytest

from spinegrade.constants import PROBABILITY_COLUMNS, SEVERITIES
from spinegrade.structured_report import SCHEME, pixel_from_scoord, scoord_from_pixel
from spinegrade.study_page import predict_study


def _scanner_copy(trained_run, tmp_path, study: int):
    folder = tmp_path / "incoming"
    for i, f in enumerate(sorted((trained_run["data"] / "test_images" / str(study)).rglob("*.dcm"))):
        target = folder / f"IMG{i:05d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    return folder


def test_scoord_is_measured_from_the_pixel_corner_and_reads_back_to_the_centre():
    assert scoord_from_pixel(0.0, 0.0) == (0.5, 0.5)
    assert pixel_from_scoord(*scoord_from_pixel(12.25, 40.0)) == (12.25, 40.0)


@pytest.fixture(scope="module")
def report(trained_run, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sr")
    series = pd.read_csv(trained_run["data"] / "test_series_descriptions.csv")
    counts = series.groupby("study_id")["series_description"].agg(lambda d: (d == "Axial T2").sum())
    study = int(counts.index[counts == 1][0])
    scanner = _scanner_copy(trained_run, tmp_path, study)
    result = predict_study(scanner, trained_run["out"], out_dir=tmp_path / "result")
    sources = {}
    for f in scanner.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = ds
    return {"path": tmp_path / "result" / "grades-sr.dcm", "result": result, "sources": sources}


def test_the_report_holds_all_25_targets_with_grade_probabilities_and_point(report):
    import highdicom as hd

    sr = hd.sr.srread(report["path"])
    first_source = next(iter(report["sources"].values()))
    assert sr.StudyInstanceUID == first_source.StudyInstanceUID and sr.PatientID == first_source.PatientID
    assert sr.SeriesInstanceUID not in {s.SeriesInstanceUID for s in report["sources"].values()}  # a new series
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == [SCHEME]
    content = sr.content
    regions = content.get_planar_roi_measurement_groups()
    others = content.get_image_measurement_groups()
    by_row = {g.tracking_identifier: g for g in [*regions, *others]}
    targets = {t["row_id"]: t for t in report["result"]["targets"]}
    assert set(by_row) == set(targets) and len(by_row) == 25
    graded = 0
    for row_id, t in targets.items():
        group = by_row[row_id]
        grade = group.get_qualitative_evaluations()[0].value.meaning
        assert grade == t["grade"] and grade in SEVERITIES
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert all(abs(values[f"Probability of {s}"] - t["probabilities"][c]) < 1e-6
                   for c, s in zip(PROBABILITY_COLUMNS, SEVERITIES))
        if t["source"] == "model":
            graded += 1
            region = group.roi
            assert region.graphic_type.value == "POINT"
            uid = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            assert uid in report["sources"]  # an existing source instance
            x, y = pixel_from_scoord(*region.value[0])
            assert abs(x - t["points"][0]["x"]) < 1e-3 and abs(y - t["points"][0]["y"]) < 1e-3
        else:  # the prior, and why
            texts = [item.TextValue for item in group[0].ContentSequence if item.ValueType == "TEXT"]
            assert t["source"].removeprefix("prior: ") in texts
    assert graded == sum(t["source"] == "model" for t in targets.values()) and graded >= 20


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed (apt-get install dicom3tools)")
def test_dciodvfy_finds_no_error_in_the_report(report):
    checked = subprocess.run(["dciodvfy", str(report["path"])], capture_output=True, text=True, timeout=120)
    errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors[:10]


def test_a_folder_holding_two_studies_is_refused_with_their_uids(trained_run, tmp_path):
    from spinegrade.errors import SpinegradeError

    studies = sorted(pd.read_csv(trained_run["data"] / "test_series_descriptions.csv")["study_id"].unique())[:2]
    folder = tmp_path / "two"
    uids = set()
    for study in studies:
        for i, f in enumerate(sorted((trained_run["data"] / "test_images" / str(study)).rglob("*.dcm"))):
            target = folder / str(study) / f"IMG{i:05d}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
        uids.add(pydicom.dcmread(target, stop_before_pixels=True).StudyInstanceUID)
    assert len(uids) == 2
    with pytest.raises(SpinegradeError, match="holds 2 studies") as refused:
        predict_study(folder, trained_run["out"], out_dir=tmp_path / "result")
    assert all(uid in str(refused.value) for uid in uids)


def test_a_split_gets_one_report_per_study_in_its_own_study(trained_run, tmp_path):
    """``predict --split test --sr``: a report per study, in that study (its StudyInstanceUID), with its
    own 25 targets and points on its own instances."""
    import highdicom as hd

    from spinegrade.submit import predict_split

    folder = tmp_path / "sr"
    _, submission = predict_split(trained_run["data"], "test", trained_run["out"], out=tmp_path / "s.csv",
                                  predictions_dir=tmp_path, device="cpu", structured_reports=folder)
    studies = sorted(int(p.name) for p in (trained_run["data"] / "test_images").iterdir())
    assert sorted(int(p.stem) for p in folder.glob("*.dcm")) == studies
    for study in studies:
        sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in
                                                   (trained_run["data"] / "test_images" / str(study)).rglob("*.dcm"))}
        sr = hd.sr.srread(folder / f"{study}.dcm")
        assert sr.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
        content = sr.content
        groups = [*content.get_planar_roi_measurement_groups(), *content.get_image_measurement_groups()]
        assert sorted(g.tracking_identifier for g in groups) == sorted(
            submission.loc[submission["row_id"].str.startswith(f"{study}_"), "row_id"])
        for g in content.get_planar_roi_measurement_groups():
            uid = g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            assert uid in sources
