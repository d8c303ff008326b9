"""The subarticular group on Axial T2: each level on the slice that shows it, in whichever of a study's
axial series and stacks reach it; each side on the patient's side from DICOM geometry, whichever way
the rows run; a level in two series graded as the mean of both; a study without Axial T2 keeps its
other groups."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from dicom_factory import labelled_canal, mirror_series

from spinegrade.constants import AXIAL_T2, GROUPS, LEVELS, PROBABILITY_COLUMNS, row_id
from spinegrade.data.dicom import read_slice
from spinegrade.data.folds import make_folds, write_csv_atomic
from spinegrade.data.index import build_index
from spinegrade.data.preprocess import PreprocessSettings, prepare_stack
from spinegrade.layout import RunLayout
from spinegrade.offsets import PointOffsets, find_instance, train_offsets
from spinegrade.locating import LOCATION_COLUMNS, LocatedStudy
from spinegrade.locators import locate_split
from spinegrade.predict import grade_studies, load_fold_models
from spinegrade.submit import predict_split
from spinegrade.study import Series
from spinegrade.subarticular import locate_subarticular

LEFT, RIGHT = GROUPS["subarticular"].conditions
CROP = PreprocessSettings("subarticular", "crop", 48, 40.0, neighbours=0, turn_by_side=True)


def _axial_series(data: Path, split: str, study: int) -> list[Path]:
    series = pd.read_csv(data / f"{split}_series_descriptions.csv")
    ids = series[(series["study_id"] == study) & (series["series_description"] == AXIAL_T2)]["series_id"]
    return [data / f"{split}_images" / str(study) / str(s) for s in ids]


@pytest.fixture(scope="module")
def offsets(synth_dataset, tmp_path_factory) -> PointOffsets:
    out = tmp_path_factory.mktemp("subarticular-offsets")
    folds = out / "folds.csv"
    write_csv_atomic(make_folds(build_index(synth_dataset, check_images=False).labels_wide(), n_folds=2, seed=0), folds)
    train_offsets(synth_dataset, folds, out, "subarticular")
    return PointOffsets.load(RunLayout(out).locator_dir("subarticular"))


def test_each_level_and_side_lands_on_its_labelled_slice_in_every_axial_layout(synth_dataset, offsets):
    """From the labelled canal points (the locator's own part alone): every labelled point is found on
    its labelled series and stack, within two slices of its labelled instance and nearly all within one,
    on the patient's own side. (A recess is narrowest a little above or below its disc, sd 1.5 mm: the
    tail of that scatter is a slice past what geometry alone can place; the slice locator reads it.)
    The data holds the layouts that make this hard: rows running either way, a series of several
    tilted stacks, two axial series sharing a level."""
    table = build_index(synth_dataset, check_images=False).table
    labelled = table[table["condition"].isin([LEFT, RIGHT]) & table["instance_number"].notna()]
    assert (labelled.pivot_table(index=["study_id", "level"], columns="condition", values="severity")
            .pipe(lambda w: (w[LEFT] != w[RIGHT]).sum())) >= 5  # left and right grades differ often
    row_directions, tilted, shared, checked, off_by_one = set(), 0, 0, 0, 0
    for study, points in labelled.groupby("study_id"):
        canal = labelled_canal(table, study)
        stacks = {str(d): Series(str(d), AXIAL_T2).read()[0] for d in _axial_series(synth_dataset, "train", study)}
        rows, _ = locate_subarticular(study, canal, stacks, offsets)
        found = pd.DataFrame(rows, columns=LOCATION_COLUMNS)
        for series_stacks in stacks.values():
            row_directions.add(int(np.sign(series_stacks[0].orientation[0])))
            tilted += len(series_stacks) > 1
        if len(stacks) > 1:  # a level both series image is located on both
            per_level = found.groupby("level")["series"].nunique()
            assert (per_level == 2).sum() >= 1, study
            shared += 1
        for r in points.itertuples():
            series = str(Path(r.image_path).parent)
            hit = found[(found["condition"] == r.condition) & (found["level"] == r.level) & (found["series"] == series)]
            assert len(hit) == 1, (study, r.condition, r.level)
            h = hit.iloc[0]
            j_found, k_found = find_instance(stacks[series], int(h.instance_number))
            j_label, k_label = find_instance(stacks[series], int(r.instance_number))
            assert j_found == j_label and abs(k_found - k_label) <= 2, (study, r.condition, r.level)
            off_by_one += abs(k_found - k_label) > 1
            s = stacks[series][j_found].slices[k_found]
            side_x = s.pixel_to_patient(h.x, h.y)[0] - canal[r.level][0]
            assert (side_x > 3) if r.condition == LEFT else (side_x < -3)  # +x is the patient's left
            truth = stacks[series][j_label].slices[k_label].pixel_to_patient(r.x, r.y)
            assert np.linalg.norm(s.pixel_to_patient(h.x, h.y) - truth) < 10  # a slice gap and a few mm: well inside the crop
            checked += 1
    assert row_directions == {1, -1}, "the set should hold axial series whose rows run either way"
    assert tilted >= 1 and shared >= 1, "the set should hold a series of tilted stacks and a study with two axial series"
    assert checked >= 100 and off_by_one <= 0.02 * checked, (off_by_one, checked)


def test_rows_running_the_other_way_give_the_same_points_and_the_same_crops_per_side(synth_dataset, offsets, tmp_path):
    """A series and its mirror image in storage (same anatomy in patient space): each side is placed on
    the same patient point, and its crop (turned for its side) is the same image. Were sides taken from
    image halves, the mirrored series would swap them; were the crops not turned, they would be mirror
    images of each other."""
    table = build_index(synth_dataset, check_images=False).table
    study = int(table[table["condition"] == LEFT]["study_id"].iloc[0])
    source = _axial_series(synth_dataset, "train", study)[0]
    mirrored = tmp_path / "mirrored"
    mirror_series(source, mirrored)
    canal = labelled_canal(table, study)
    located = {}
    for name, folder in (("source", source), ("mirrored", mirrored)):
        stacks = {name: Series(str(folder), AXIAL_T2).read()[0]}
        rows, _ = locate_subarticular(study, canal, stacks, offsets)
        assert {r[1] for r in rows} == {LEFT, RIGHT}
        located[name] = LocatedStudy(study, stacks, pd.DataFrame(rows, columns=LOCATION_COLUMNS))
    a, b = (located[n].locations.set_index(["condition", "level"]).sort_index() for n in ("source", "mirrored"))
    assert list(a.index) == list(b.index) and (a["instance_number"] == b["instance_number"]).all()
    assert (a["x"] - b["x"]).abs().max() > 5  # the columns really are reversed
    for (condition, level), ra in a.iterrows():
        rb = b.loc[(condition, level)]
        crops, points = [], []
        for name, r in (("source", ra), ("mirrored", rb)):
            stack, k = located[name].stack_at(pd.Series({"series": name, "instance_number": r["instance_number"]}))
            crops.append(prepare_stack(stack, k, r["x"], r["y"], CROP, condition=condition)[0].astype(int))
            points.append(stack.slices[k].pixel_to_patient(r["x"], r["y"]))
        assert np.linalg.norm(points[0] - points[1]) < 1e-3, (condition, level)
        assert np.abs(crops[0] - crops[1]).mean() < 1.0, (condition, level)
        left, right = (prepare_stack(stack, k, r["x"], r["y"], CROP, condition=c)[0].astype(int) for c in (LEFT, RIGHT))
        assert np.abs(left - right[:, ::-1]).max() <= 1  # turning for the side is a mirror


@pytest.mark.parametrize("across, down, left, right", [
    ((1, 0, 0), (0, 1, 0), (False, False, False), (False, False, True)),  # usual: rows run to the patient's left
    ((-1, 0, 0), (0, 1, 0), (False, False, True), (False, False, False)),  # rows run the other way
    ((0, 1, 0), (1, 0, 0), (True, False, False), (True, False, True)),  # turned in plane
    ((0, -1, 0), (-1, 0, 0), (True, True, True), (True, True, False)),  # turned the other way
    ((1, 0, 0), (0, -1, 0), (False, True, False), (False, True, True)),  # upside down: the back at the top
])
def test_canonical_turn_puts_each_sides_lateral_edge_right_and_the_back_down(across, down, left, right):
    """Absolute, from the geometry alone: after the turn, a step right in the crop goes lateral (+x for the
    patient's left, -x for the right) and a step down goes posterior (+y)."""
    from spinegrade.data.dicom import Slice
    from spinegrade.data.preprocess import canonical_turn, turn

    s = Slice(Path("x.dcm"), 1, np.zeros(3), np.array([*across, *down], dtype=float), (1.0, 1.0), (4, 4))
    assert canonical_turn(s, "left") == left and canonical_turn(s, "right") == right
    assert canonical_turn(s) == left  # read for no side: the patient's left to the right
    # A 4x4 image whose pixel (r, c) holds its patient point: after the turn, check the directions.
    rows, cols = np.mgrid[0:4, 0:4]
    patient = rows[..., None] * np.array(down) + cols[..., None] * np.array(across)  # (4, 4, 3)
    for side, lateral in (("left", 1), ("right", -1)):
        turned = np.stack([turn(patient[..., a].astype(float), *canonical_turn(s, side)) for a in range(3)], axis=-1)
        assert (np.diff(turned[..., 0], axis=1) == lateral).all()  # rightwards: lateral
        assert (np.diff(turned[..., 1], axis=0) == 1).all()  # downwards: posterior


@pytest.mark.parametrize("across, down", [
    ((0, 1, 0), (0, 0, -1)),  # as the competition's sagittal series are stored
    ((0, 0, -1), (0, 1, 0)),  # transposed
    ((0, 0, 1), (0, 1, 0)),  # turned 90 degrees
    ((0, -1, 0), (0, 0, -1)),  # mirrored
    ((0, -1, 0), (0, 0, 1)),  # upside down
])
def test_canonical_turn_shows_a_sagittal_slice_back_right_and_feet_down_and_maps_points_back(across, down):
    from spinegrade.data.dicom import Slice
    from spinegrade.data.preprocess import canonical_turn, turn, turn_point, unturn_point

    shape = (4, 6)
    s = Slice(Path("x.dcm"), 1, np.zeros(3), np.array([*across, *down], dtype=float), (1.0, 1.0), shape)
    how = canonical_turn(s)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    patient = rows[..., None] * np.array(down) + cols[..., None] * np.array(across)
    turned = np.stack([turn(patient[..., a].astype(float), *how) for a in range(3)], axis=-1)
    assert (np.diff(turned[..., 1], axis=1) == 1).all()  # rightwards: posterior
    assert (np.diff(turned[..., 2], axis=0) == -1).all()  # downwards: towards the feet
    for x, y in ((0, 0), (5, 1), (2.5, 3)):  # a stored point lands on the same patient point once turned, and back
        tx, ty = turn_point(x, y, how, shape)
        expected = y * np.array(down) + x * np.array(across)
        np.testing.assert_allclose(turned[int(round(ty)), int(round(tx))], expected, atol=0.51 * 2)
        np.testing.assert_allclose(unturn_point(tx, ty, how, shape), (x, y))


def _split_axial(series_dir: Path, new_id: int) -> Path:
    """Split one axial series in two: its per-disc blocks of slices below the middle one move to a new
    series, and the middle block is copied there with noise of its own (another acquisition), so that
    one level is in both and reads a little differently. Returns the new folder."""
    slices = [read_slice(f, with_pixels=False) for f in sorted(series_dir.glob("*.dcm"))]
    centre_z = np.array([s.pixel_to_patient(s.shape[1] / 2, s.shape[0] / 2)[2] for s in slices])
    order = np.argsort(centre_z)
    block = np.zeros(len(slices), dtype=int)  # blocks: runs of slices less than 10 mm apart, lowest first
    block[order] = np.concatenate([[0], np.cumsum(np.diff(centre_z[order]) > 10)])
    middle = block.max() // 2
    assert block.max() >= 2, "the series should image three levels or more"
    new_dir = series_dir.parent / str(new_id)
    new_dir.mkdir()
    rng = np.random.default_rng(0)
    for s, b in zip(slices, block):
        if b < middle:
            shutil.move(s.path, new_dir / Path(s.path).name)
        elif b == middle:
            ds = pydicom.dcmread(s.path)
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
            pixels = ds.pixel_array.astype(float)
            noisy = pixels + rng.normal(0, 0.05 * pixels.std(), pixels.shape)
            ds.PixelData = np.clip(noisy, 0, 65535).astype(ds.pixel_array.dtype).tobytes()
            ds.save_as(new_dir / Path(s.path).name)
    return new_dir


@pytest.fixture(scope="module")
def axial_quirks(trained_run, tmp_path_factory):
    """The trained run's test studies: one without Axial T2 listed, one whose axial series is split in
    two series sharing one level, one whose axial series has no ImageOrientationPatient."""
    root = tmp_path_factory.mktemp("axial-quirks")
    data = root / "data"
    source = trained_run["data"]
    shutil.copytree(source / "test_images", data / "test_images")
    for name in ("train.csv", "train_series_descriptions.csv", "train_label_coordinates.csv", "sample_submission.csv"):
        shutil.copy2(source / name, data / name)
    series = pd.read_csv(source / "test_series_descriptions.csv")
    axial = series[series["series_description"] == AXIAL_T2]
    single = sorted(axial.groupby("study_id").filter(lambda g: len(g) == 1)["study_id"])
    no_axial, split, blind = single[:3]
    series = series[~((series["study_id"] == no_axial) & (series["series_description"] == AXIAL_T2))]
    original = _axial_series(source, "test", split)[0]
    new_dir = _split_axial(data / "test_images" / str(split) / original.name, 999_000_002)
    series = pd.concat([series, pd.DataFrame([{"study_id": split, "series_id": int(new_dir.name),
                                               "series_description": AXIAL_T2}])], ignore_index=True)
    blind_dir = data / "test_images" / str(blind) / _axial_series(source, "test", blind)[0].name
    for f in blind_dir.glob("*.dcm"):  # no geometry: sides unknowable
        ds = pydicom.dcmread(f)
        del ds.ImageOrientationPatient
        ds.save_as(f)
    series.to_csv(data / "test_series_descriptions.csv", index=False)
    return {"data": data, "no_axial": no_axial, "split": split, "new": new_dir, "blind": blind}


def _by_target(grades: pd.DataFrame) -> dict[tuple[str, str], np.ndarray]:
    """(condition, level) -> probabilities, from grading's tidy rows."""
    return {(r.condition, r.level): np.array([getattr(r, c) for c in PROBABILITY_COLUMNS]) for r in grades.itertuples()}


def test_a_level_in_two_axial_series_is_graded_as_the_mean_of_both(trained_run, axial_quirks):
    q = axial_quirks
    located = {st.study_id: st for st in locate_split(q["data"], "test", trained_run["out"], "subarticular", "cpu")}
    st = located[q["split"]]
    assert len(st.stacks) == 2
    per_level = st.locations.groupby("level")["series"].nunique()
    shared = list(per_level.index[per_level == 2])
    assert len(shared) == 1 and (per_level[per_level.index != shared[0]] == 1).all()
    assert set(st.locations["series"]) == {str(p) for p in st.stacks} and str(q["new"]) in st.stacks
    cpu = torch.device("cpu")
    models = load_fold_models(trained_run["out"], "efficientnet_lite0", "subarticular", cpu)
    both = _by_target(grade_studies([st], models, cpu))
    one_each = []
    for series in st.stacks:
        alone = LocatedStudy(st.study_id, st.stacks, st.locations[st.locations["series"] == series].reset_index(drop=True))
        one_each.append(_by_target(grade_studies([alone], models, cpu)))
    k = shared[0]
    for condition in (LEFT, RIGHT):
        assert np.allclose(both[condition, k], (one_each[0][condition, k] + one_each[1][condition, k]) / 2, atol=1e-6)
        assert not np.allclose(one_each[0][condition, k], one_each[1][condition, k], atol=1e-4)  # two real readings


def test_a_study_without_axial_t2_gets_the_prior_there_and_keeps_its_other_groups(trained_run, axial_quirks, tmp_path,
                                                                                 logged):
    q = axial_quirks
    per_backbone, submission = predict_split(q["data"], "test", trained_run["out"], out=tmp_path / "submission.csv",
                                             device="cpu", predictions_dir=tmp_path)
    messages = "\n".join(logged())
    assert f"study {q['no_axial']}: no Axial T2 series listed; its subarticular rows get the training prior" in messages
    graded = set(per_backbone["row_id"])
    assert not {row_id(q["no_axial"], c, lv) for c in (LEFT, RIGHT) for lv in LEVELS} & graded
    assert f"study {q['blind']}: " in messages and "no ImagePositionPatient/ImageOrientationPatient" in messages
    assert not {row_id(q["blind"], c, lv) for c in (LEFT, RIGHT) for lv in LEVELS} & graded  # prior: sides unknown
    assert {row_id(q["blind"], "spinal_canal_stenosis", lv) for lv in LEVELS} <= graded
    assert {row_id(q["no_axial"], "spinal_canal_stenosis", lv) for lv in LEVELS} <= graded
    assert {row_id(q["no_axial"], c, lv) for c in ("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing")
            for lv in LEVELS[1:4]} <= graded  # the foramina too
    others = sorted(set(submission["row_id"].str.split("_").str[0].astype(int)) - {q["no_axial"], q["blind"]})
    for study in others:  # every other study's subarticular rows come from the model, both sides
        assert {row_id(study, c, lv) for c in (LEFT, RIGHT) for lv in LEVELS[1:]} <= graded, study
    assert len(submission) == 25 * (len(others) + 2)


def test_the_trained_run_locates_the_lateral_recesses_out_of_fold(trained_run):
    report = trained_run["subarticular_report"]
    assert report["points"] >= 200
    # the recesses scatter a little above and below their disc, as real labels do: from the tiny run's canal
    # points, most lie within a slice
    assert report["located"] >= 0.9 and report["slice_within_one"] >= 0.7
    assert report["median_mm"] < 10  # within the half-width of the 24 mm crop the recess is graded on
    assert set(report["per_level_side"]) == {f"{side} {lv}" for side in ("left", "right") for lv in LEVELS}


def test_series_of_one_slice_are_located_or_left_to_the_prior_without_an_error(synth_dataset, offsets):
    """A T1 or axial series reduced to one slice: the foramina near it and the level it shows are still
    placed, the others are not (prior rows), and nothing raises."""
    from spinegrade.data.dicom import Stack, main_stack, read_series
    from spinegrade.foramina import nearest_slice

    table = build_index(synth_dataset, check_images=False).table
    labelled = table[(table["condition"] == LEFT) & table["instance_number"].notna()].iloc[0]
    study, canal = int(labelled.study_id), labelled_canal(table, int(labelled.study_id))
    axial = Series(str(Path(labelled.image_path).parent), AXIAL_T2).read()[0]
    one = Stack([axial[0].slices[axial[0].index_of_instance(int(labelled.instance_number))]])
    rows, outside = locate_subarticular(study, canal, {"one": [one]}, offsets)
    assert {(r[1], r[2]) for r in rows} == {(LEFT, labelled.level), (RIGHT, labelled.level)}
    assert len(outside) == len(LEVELS) - 1
    t1 = pd.read_csv(synth_dataset / "train_series_descriptions.csv")
    t1 = t1[(t1["study_id"] == study) & (t1["series_description"] == "Sagittal T1")]["series_id"].iloc[0]
    stack = main_stack(read_series(synth_dataset / "train_images" / str(study) / str(t1), with_pixels=False))
    middle = Stack([stack.slices[len(stack) // 2]])  # the mid-sagittal slice: no foramen within 3 mm of it
    assert nearest_slice(middle, canal["l4_l5"] + np.array([20.0, 0, 0])) is None
    assert nearest_slice(middle, middle.slices[0].pixel_to_patient(10, 10)) is not None


def test_the_recess_head_keeps_each_side_on_the_patients_side_whichever_way_the_rows_run(trained_run, tmp_path):
    """The shared run's trained subarticular slice locator, on a study's axial series and on its mirror
    image in storage: the head reads both turned to one orientation by their geometry, so each side gets
    the same slice and the same patient point from both, on the patient's own side of the canal. Were
    the head read on the slices as stored, its left heatmap would follow the image's right; were its
    neighbouring slices read in file order, they would reach it as other input channels."""
    from spinegrade.slice_locator import SliceLocator
    from spinegrade.locator_report import NEVER

    data, out = trained_run["data"], trained_run["out"]
    table = build_index(data, check_images=False).table
    root = RunLayout(out).locator_dir("subarticular")
    head = SliceLocator(root)
    assert len(GROUPS["subarticular"].conditions) == 2
    offsets = PointOffsets.load(root)
    checked = 0
    for study in sorted(table[table["condition"] == LEFT]["study_id"].unique())[:2]:
        canal = labelled_canal(table, study)
        source = _axial_series(data, "train", study)[0]
        mirrored = tmp_path / f"mirrored-{study}"
        mirror_series(source, mirrored)
        found = {}
        for name, folder in (("source", source), ("mirrored", mirrored)):
            stacks = {name: Series(str(folder), AXIAL_T2).read()[0]}
            rows, _ = locate_subarticular(study, canal, stacks, offsets, head=head, threshold=0.0)
            located = LocatedStudy(study, stacks, pd.DataFrame(rows, columns=LOCATION_COLUMNS))
            assert (located.locations["source"] == "located").all()  # threshold 0: the head decides every side
            found[name] = {(r.condition, r.level): (r.instance_number, located.slice_of(r).pixel_to_patient(r.x, r.y))
                           for r in located.locations.itertuples()}
        assert found["source"].keys() == found["mirrored"].keys() and found["source"]
        for key, (instance, point) in found["source"].items():
            other_instance, other_point = found["mirrored"][key]
            assert instance == other_instance and np.linalg.norm(point - other_point) < 1e-6, (study, key)
            side_x = point[0] - canal[key[1]][0]
            assert side_x > 0 if key[0] == LEFT else side_x < 0, (study, key)  # +x is the patient's left
            checked += 1
        # a head sure of nothing: every side keeps the offsets' slice and point, and says so
        stacks = {"source": Series(str(source), AXIAL_T2).read()[0]}
        unsure, _ = locate_subarticular(study, canal, stacks, offsets, head=head, threshold=NEVER)
        alone, _ = locate_subarticular(study, canal, stacks, offsets)
        assert {r[8] for r in unsure} == {"located, unsure: the offset's slice"}
        assert [r[:8] for r in unsure] == [r[:8] for r in alone]
    assert checked >= 10


def test_the_recess_head_decides_the_slice_where_it_is_sure(trained_run):
    """The trained run's report: the threshold chosen out of fold is recorded, and the head, not the
    offsets, placed most recesses out of fold (the rest fell back on the offsets and say so)."""
    report = trained_run["subarticular_report"]
    assert 0.5 <= report["threshold"] <= 1.01
    assert report["image_decided"] >= 0.5
