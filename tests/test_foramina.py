"""The foraminal group on Sagittal T1: each side found on its own slices from DICOM geometry, whichever
way a series runs; every fallback (no T1, unreadable T1, no Sagittal T2/STIR, a foramen outside the T1
volume, two T1 series) leaves the rest of the study predicted."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dicom_factory import labelled_canal

from spinegrade.constants import GROUPS, LEVELS, SAGITTAL_T1, SAGITTAL_T2, row_id
from spinegrade.data.dicom import main_stack, read_series, read_slice
from spinegrade.data.folds import make_folds, write_csv_atomic
from spinegrade.data.index import build_index
from spinegrade.foramina import locate_foramina
from spinegrade.offsets import PointOffsets, train_offsets
from spinegrade.layout import RunLayout
from spinegrade.locators import locate_split
from spinegrade.submit import predict_split

LEFT, RIGHT = GROUPS["foraminal"].conditions


def test_each_side_is_found_on_its_own_slices_whichever_way_the_t1_series_runs(synth_dataset, tmp_path):
    """From the labelled canal points, the offsets alone (the geometric window the slice locator starts
    from): nearly every left foramen lies within a slice of its labelled left point, right likewise, and
    every one on its own side of the canal; a swap of sides would put each on the other side's slices,
    30 mm away, and fail. (The foramina scatter by level and side as real ones do, so a median offset
    misses some by two slices: the slice locator's tests find those.)"""
    index = build_index(synth_dataset, check_images=False)
    folds = tmp_path / "folds.csv"
    write_csv_atomic(make_folds(index.labels_wide(), n_folds=2, seed=0), folds)
    train_offsets(synth_dataset, folds, tmp_path, "foraminal")
    offsets = PointOffsets.load(RunLayout(tmp_path).locator_dir("foraminal"))
    table = index.table
    labelled = table[table["condition"].isin([LEFT, RIGHT]) & table["instance_number"].notna()]
    assert (labelled.pivot_table(index=["study_id", "level"], columns="condition", values="severity")
            .pipe(lambda w: (w[LEFT] != w[RIGHT]).sum())) >= 5  # left and right grades differ often
    directions, checked, near = set(), 0, 0
    for study, points in labelled.groupby("study_id"):
        series_dir = Path(points["image_path"].iloc[0]).parent
        stack = main_stack(read_series(series_dir, with_pixels=False))
        instances = [s.instance_number for s in stack.slices]  # ordered by position along the normal
        directions.add(int(np.sign(instances[-1] - instances[0]) * np.sign(stack.normal[0])))
        rows, _ = locate_foramina(study, labelled_canal(table, study), {str(series_dir): [stack]}, offsets)
        found = {(c, lv): (inst, x, y) for _, c, lv, _, inst, x, y, *_ in rows}
        for r in points.itertuples():
            inst, x, y = found[(r.condition, r.level)]
            k_found, k_label = stack.index_of_instance(inst), stack.index_of_instance(int(r.instance_number))
            near += abs(k_found - k_label) <= 1
            side_x = stack.slices[k_found].pixel_to_patient(x, y)[0] - labelled_canal(table, study)[r.level][0]
            assert (side_x > 10) if r.condition == LEFT else (side_x < -10)  # +x is the patient's left
            checked += 1
    assert directions == {1, -1}, "the set should hold T1 series stored left to right and right to left"
    assert checked >= 100 and near >= 0.85 * checked, (near, checked)


@pytest.fixture(scope="module")
def quirky_test_split(trained_run, tmp_path_factory):
    """The trained run's test studies, each with one Sagittal T1 problem: T1 not listed, T1 unreadable,
    Sagittal T2/STIR absent, T1 cut to the patient's right half, and a second T1 series."""
    root = tmp_path_factory.mktemp("quirky")
    data = root / "data"
    source = trained_run["data"]
    shutil.copytree(source / "test_images", data / "test_images")
    for name in ("train.csv", "train_series_descriptions.csv", "train_label_coordinates.csv", "sample_submission.csv"):
        if (source / name).is_file():
            shutil.copy2(source / name, data / name)
    series = pd.read_csv(source / "test_series_descriptions.csv")
    t1 = series[series["series_description"] == SAGITTAL_T1].drop_duplicates("study_id").set_index("study_id")["series_id"]
    studies = sorted(t1.index)
    assert len(studies) >= 5, "the fixture's test split needs five studies with a Sagittal T1"
    not_listed, unreadable, no_t2, cut, doubled = studies[:5]
    series = series[~((series["study_id"] == not_listed) & (series["series_description"] == SAGITTAL_T1))]
    for f in (data / "test_images" / str(unreadable) / str(t1[unreadable])).glob("*.dcm"):
        f.write_bytes(b"not a DICOM file")
    series = series[~((series["study_id"] == no_t2) & (series["series_description"] == SAGITTAL_T2))]
    cut_dir = data / "test_images" / str(cut) / str(t1[cut])
    for f in cut_dir.glob("*.dcm"):
        s = read_slice(f, with_pixels=False)
        if s.position[0] > -5:  # keep the slices right of the midline only (patient x < 0)
            f.unlink()
    second = 999_000_001
    shutil.copytree(data / "test_images" / str(doubled) / str(t1[doubled]), data / "test_images" / str(doubled) / str(second))
    series = pd.concat([series, pd.DataFrame([{"study_id": doubled, "series_id": second,
                                               "series_description": SAGITTAL_T1}])], ignore_index=True)
    series.to_csv(data / "test_series_descriptions.csv", index=False)
    return {"data": data, "not_listed": not_listed, "unreadable": unreadable, "no_t2": no_t2, "cut": cut,
            "doubled": doubled, "second": data / "test_images" / str(doubled) / str(second)}


def test_every_t1_fallback_is_named_and_located_where_it_can_be(trained_run, quirky_test_split):
    q = quirky_test_split
    located = {st.study_id: st for st in locate_split(q["data"], "test", trained_run["out"], "foraminal", "cpu")}
    assert located[q["not_listed"]].locations is None and "no Sagittal T1 series listed" in located[q["not_listed"]].problem
    assert located[q["unreadable"]].locations is None and "no readable DICOM file" in located[q["unreadable"]].problem
    assert located[q["no_t2"]].locations is None and "no spinal canal points" in located[q["no_t2"]].problem
    cut = located[q["cut"]].locations
    assert cut is not None and set(cut["condition"]) == {RIGHT}  # the left foramina lie outside the cut volume
    doubled = located[q["doubled"]].locations
    assert doubled["series"].nunique() == 2 and str(q["second"]) in set(doubled["series"])
    per_target = doubled.groupby(["condition", "level"]).size()
    assert (per_target == 2).all() and len(per_target) == 2 * len(LEVELS)  # each target on both series


def test_predict_grades_every_other_group_and_gives_the_prior_where_t1_fails(trained_run, quirky_test_split, tmp_path,
                                                                             logged):
    q = quirky_test_split
    out = tmp_path / "submission.csv"
    per_backbone, submission = predict_split(q["data"], "test", trained_run["out"], out=out, device="cpu",
                                             predictions_dir=tmp_path)
    messages = "\n".join(logged())
    for study in (q["not_listed"], q["unreadable"], q["no_t2"]):
        assert f"study {study}:" in messages and "foraminal rows get the training prior" in messages
    graded = set(per_backbone["row_id"])
    for study in (q["not_listed"], q["unreadable"]):  # the spinal group is still graded
        assert {row_id(study, "spinal_canal_stenosis", lv) for lv in LEVELS} <= graded
        assert not {row_id(study, c, lv) for c in (LEFT, RIGHT) for lv in LEVELS} & graded
    assert not {row_id(q["cut"], LEFT, lv) for lv in LEVELS} & graded  # outside the volume: prior rows
    assert {row_id(q["cut"], RIGHT, lv) for lv in LEVELS} <= graded
    assert {row_id(q["doubled"], c, lv) for c in (LEFT, RIGHT) for lv in LEVELS} <= graded
    assert len(submission) == 25 * submission["row_id"].str.split("_").str[0].nunique()
    assert np.allclose(submission.iloc[:, 1:].sum(axis=1), 1)


def test_the_trained_run_locates_foramina_out_of_fold(trained_run):
    report = trained_run["foramen_report"]
    assert report["points"] >= 200
    assert report["slice_within_one"] >= 0.9
    assert report["median_mm"] < 12  # a 40 mm crop holds the foramen
    assert set(report["per_level_side"]) == {f"{side} {lv}" for side in ("left", "right") for lv in LEVELS}
