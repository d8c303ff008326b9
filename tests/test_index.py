"""The index on every trap of the real data, each built as a small fixture from the synthetic set."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest

from spinegrade.constants import SAGITTAL_T1
from spinegrade.data.index import build_index, format_report
from spinegrade.errors import SpinegradeError


def _kinds(index):
    return {p.kind for p in index.problems}


def test_missing_series_loses_only_its_conditions(dataset_copy):
    series = pd.read_csv(dataset_copy / "train_series_descriptions.csv")
    victim = series[series["series_description"] == SAGITTAL_T1].iloc[0]
    series.drop(index=victim.name).to_csv(dataset_copy / "train_series_descriptions.csv", index=False)
    shutil.rmtree(dataset_copy / "train_images" / str(victim.study_id) / str(victim.series_id))
    index = build_index(dataset_copy)
    assert "missing_series" in _kinds(index)
    assert any(str(victim.study_id) in str(p) and "Sagittal T1" in str(p) for p in index.problems)
    study = index.table[index.table["study_id"] == victim.study_id]
    foraminal = study[study["condition"].str.contains("foraminal")]
    assert not foraminal["usable"].any()
    spinal = study[study["condition"] == "spinal_canal_stenosis"]
    assert spinal["usable"].all()


def test_unlabelled_cells_coordinates_without_labels_and_unknown_grades(dataset_copy):
    train = pd.read_csv(dataset_copy / "train.csv", dtype=str, keep_default_na=False)
    train.loc[0, "spinal_canal_stenosis_l2_l3"] = ""  # unlabelled, its coordinate now has no label
    train.loc[1, "spinal_canal_stenosis_l4_l5"] = "Sever"  # a typo
    train.to_csv(dataset_copy / "train.csv", index=False)
    index = build_index(dataset_copy)
    kinds = _kinds(index)
    assert {"coordinate_without_label", "unknown_label"} <= kinds
    typo = next(p for p in index.problems if p.kind == "unknown_label")
    assert typo.file == "train.csv" and typo.line == 3 and "Sever" in typo.message
    t = index.table.set_index(["study_id", "condition", "level"])
    assert t.loc[(int(train.loc[0, "study_id"]), "spinal_canal_stenosis", "l2_l3"), "severity"] == -1
    assert not t.loc[(int(train.loc[1, "study_id"]), "spinal_canal_stenosis", "l4_l5"), "usable"]
    report = format_report(index)
    assert "unknown_label" in report and "train.csv:3" in report


def test_label_without_coordinates(dataset_copy, synth_dataset):
    coords = pd.read_csv(dataset_copy / "train_label_coordinates.csv")
    coords.iloc[1:].to_csv(dataset_copy / "train_label_coordinates.csv", index=False)
    index = build_index(dataset_copy)
    problem = next(p for p in index.problems if p.kind == "label_without_coordinates")
    assert str(coords.iloc[0].study_id) in problem.message
    assert len(index.usable()) == len(build_index(synth_dataset).usable()) - 1


def test_corrupt_and_absent_files_are_named_and_skipped(dataset_copy):
    index = build_index(dataset_copy)
    usable_before = len(index.usable())
    rows = index.usable("spinal_canal_stenosis")
    corrupt = rows.iloc[0].image_path
    with open(corrupt, "r+b") as f:  # keep the name, destroy the content
        f.truncate(200)
    other_study = rows[rows["study_id"] != rows.iloc[0].study_id].iloc[0]
    series_dir = f"{dataset_copy}/train_images/{other_study.study_id}/{other_study.series_id}"
    shutil.rmtree(series_dir)
    index = build_index(dataset_copy)
    assert {"unreadable_dicom", "series_folder_missing"} <= _kinds(index)
    unreadable = next(p for p in index.problems if p.kind == "unreadable_dicom")
    assert unreadable.file.endswith(corrupt.split("/train_images/")[1])
    lost = usable_before - len(index.usable())
    same_slice = (rows["image_path"] == corrupt).sum()
    gone_series = (index.table["series_id"] == other_study.series_id).sum()
    assert lost == same_slice + gone_series


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "train.csv").write_text(""), "train.csv: file is empty"),
    (lambda d: (d / "train_label_coordinates.csv").unlink(), "train_label_coordinates.csv: required file not found"),
    (lambda d: pd.read_csv(d / "train_series_descriptions.csv").rename(columns={"series_description": "desc"})
     .to_csv(d / "train_series_descriptions.csv", index=False), "missing column(s) series_description"),
])
def test_required_file_or_column_missing_fails_with_its_name(dataset_copy, damage, message):
    damage(dataset_copy)
    with pytest.raises(SpinegradeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_index(dataset_copy)


def test_cli_reports_user_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "spinegrade.cli", "index", "--data-dir", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "nope" in result.stderr


def test_real_metadata_counts(real_metadata):
    start = time.perf_counter()
    index = build_index(real_metadata)
    elapsed = time.perf_counter() - start
    t = index.table
    assert t["study_id"].nunique() == 1975 and len(index.series) == 6294
    spinal = t[t["condition"] == "spinal_canal_stenosis"]["severity"].value_counts()
    assert (spinal[0], spinal[1], spinal[2], spinal[-1]) == (8664, 736, 470, 5)
    assert int((t["severity"] < 0).sum()) == 572
    per_study_axial = index.series[index.series["series_description"] == "Axial T2"].groupby("study_id").size()
    assert int((per_study_axial >= 2).sum()) == 335
    missing = {p.message for p in index.problems if p.kind == "missing_series"}
    assert missing == {"study 2492114990 has no Sagittal T1 series", "study 2780132468 has no Sagittal T1 series",
                       "study 3008676218 has no Sagittal T2/STIR series"}
    assert sum(p.kind == "series_folder_missing" for p in index.problems) == 6294  # no images in this folder
    assert not t["usable"].any()
    assert "unexpected_series" in _kinds(index)  # the study with spinal points on a Sagittal T1 series
    assert elapsed < 30, f"index took {elapsed:.1f}s"
