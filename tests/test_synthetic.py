"""The synthetic dataset: exact RSNA layout, consistent geometry, and a grade signal in the pixels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from spinegrade.constants import LABEL_COLUMNS, PROBABILITY_COLUMNS
from spinegrade.data.dicom import read_slice
from spinegrade.data.grade_model import GRADE_CUTS, TARGETS, grade_spearman, marginals, study_grades
from spinegrade.data.index import build_index
from spinegrade.data.label_geometry import dataset_label_geometry, label_geometry
from spinegrade.data.synthetic import SynthSettings, coordinate_frames, label_records, sample_anatomy, write_dataset


def test_layout_and_index_round_trip(synth_dataset):
    for name in ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv",
                 "test_series_descriptions.csv", "sample_submission.csv"):
        assert (synth_dataset / name).is_file(), name
    train = pd.read_csv(synth_dataset / "train.csv")
    assert list(train.columns) == ["study_id", *LABEL_COLUMNS]
    index = build_index(synth_dataset)
    assert _unexpected(index.problems) == []
    assert len(index.study_ids) == 16
    usable = index.usable()
    # Every labelled cell that has a point is usable, and only a few subarticular cells are blank.
    assert len(usable) == int((index.table["severity"] >= 0).sum())
    for row in usable.itertuples():
        s = read_slice(row.image_path, with_pixels=False)
        assert 0 <= row.x < s.shape[1] and 0 <= row.y < s.shape[0], row


def test_test_split_has_no_labels_and_answers_live_outside(synth_dataset):
    assert not (synth_dataset / "test.csv").exists()
    assert not (synth_dataset / "test_label_coordinates.csv").exists()
    answers = synth_dataset.parent / f"{synth_dataset.name}-answers"
    test_labels = pd.read_csv(answers / "test.csv")
    test_series = pd.read_csv(synth_dataset / "test_series_descriptions.csv")
    assert set(test_labels["study_id"]) == set(test_series["study_id"]) and len(test_labels) == 3
    sample = pd.read_csv(synth_dataset / "sample_submission.csv")
    assert list(sample.columns) == ["row_id", *PROBABILITY_COLUMNS] and len(sample) == 3 * 25
    test_index = build_index(synth_dataset, split="test")
    assert len(test_index.table) == 75 and _unexpected(test_index.problems) == []


def test_same_seed_same_bytes(tmp_path):
    settings = SynthSettings(studies=2, test_studies=1, seed=3, image_size=(64, 80), workers=1)
    digests = []
    for name in ("a", "b"):
        write_dataset(tmp_path / name, settings)
        files = sorted(p for p in (tmp_path / name).rglob("*") if p.is_file())
        digests.append({str(p.relative_to(tmp_path / name)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    assert digests[0] == digests[1] and len(digests[0]) > 50
    other = SynthSettings(studies=2, test_studies=1, seed=4, image_size=(64, 80), workers=1)
    write_dataset(tmp_path / "c", other)
    assert (tmp_path / "c" / "train.csv").read_bytes() != (tmp_path / "a" / "train.csv").read_bytes()


def _canal_width_mm(image: np.ndarray, x: float, y: float, spacing: float) -> float:
    """Width of the bright run through (x, y) along the row (antero-posterior on a sagittal slice)."""
    r, c = int(round(y)), int(round(x))
    band = image[max(r - 1, 0): r + 2].mean(axis=0)
    half = int(25 / spacing)
    seg = band[max(c - half, 0): c + half]
    threshold = (np.median(seg) + seg.max()) / 2
    bright = seg > threshold
    centre = min(c, half)
    if not bright[max(centre - 2, 0): centre + 3].any():
        return 0.0
    centre = max(range(max(centre - 2, 0), min(centre + 3, len(seg))), key=lambda i: seg[i])
    left = centre
    while left > 0 and bright[left - 1]:
        left -= 1
    right = centre
    while right < len(seg) - 1 and bright[right + 1]:
        right += 1
    return (right - left + 1) * spacing


def test_spinal_narrowing_can_be_read_from_canal_width(synth_dataset):
    """The pixels show the image's narrowing (the answers folder's), not the reader's label: the canal's
    width separates the image's normal levels from its stenotic ones."""
    index = build_index(synth_dataset)
    rows = index.usable("spinal_canal_stenosis")
    answers = pd.read_csv(synth_dataset.parent / f"{synth_dataset.name}-answers" / "train_grades.csv")
    image = {(r.study_id, r.level): r.image_narrowing for r in answers.itertuples()}
    widths, narrowing = [], []
    for row in rows.itertuples():
        s = read_slice(row.image_path)
        widths.append(_canal_width_mm(s.pixels, row.x, row.y, s.pixel_spacing[1]))
        narrowing.append(image[(row.study_id, row.level)])
    widths, narrowing = np.array(widths), np.array(narrowing)
    stenotic = narrowing > GRADE_CUTS[0]
    assert stenotic.sum() >= 3, "the fixture needs some moderate or severe levels"
    assert spearmanr(widths, narrowing)[0] < -0.5  # a coarse measure (pixels of 1.1 to 1.6 mm), but it follows
    severe = narrowing > GRADE_CUTS[1]
    assert widths[~stenotic].mean() > widths[severe].mean() + 2  # a severe pinch takes a quarter of the canal


def test_grade_balance_close_to_the_real_data():
    rng = np.random.default_rng(0)
    spinal = np.array([sample_anatomy(rng).grades["spinal_canal_stenosis"] for _ in range(1500)])
    shares = [(spinal == k).mean() for k in range(3)]
    assert abs(shares[0] - 0.878) < 0.02 and abs(shares[1] - 0.075) < 0.015 and abs(shares[2] - 0.048) < 0.012
    severe_per_level = (spinal == 2).mean(axis=0)
    assert severe_per_level.argmax() == 3  # worst at L4/L5


def _simulated(studies: int, seed: int = 0):
    rng, rater = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    return [study_grades(rng, rater) for _ in range(studies)]


def test_grades_are_drawn_jointly_as_the_real_ones_correlate():
    """Every pair of the 25 targets correlates (Spearman, labels as written, wrong ones included) within
    0.1 of the real train.csv, and each level keeps its grade frequencies."""
    real = json.loads(REAL_GEOMETRY.read_text())["grade_spearman"]
    assert tuple(real["targets"]) == TARGETS
    drawn = _simulated(10000)
    labels = pd.DataFrame(np.stack([g.labels for g in drawn]), columns=list(TARGETS))
    gap = np.abs(grade_spearman(labels) - np.array(real["spearman"], dtype=float))[np.triu_indices(25, 1)]
    assert np.nanmax(gap) < 0.1, np.nanmax(gap)
    named = {t: i for i, t in enumerate(TARGETS)}
    same_level = grade_spearman(labels)[named["spinal_canal_stenosis_l4_l5"], named["left_subarticular_stenosis_l4_l5"]]
    assert same_level > 0.4  # the pairs the issue names are far from independent
    for grades in (np.stack([g.drawn for g in drawn]), labels.to_numpy()):
        shares = np.stack([(grades == k).mean(axis=0) for k in range(3)], axis=1)
        assert np.abs(shares - marginals()).max() < 0.03


def test_wrong_labels_are_about_two_percent_of_three_kinds():
    drawn = _simulated(4000, seed=3)
    wrong = np.array([w for g in drawn for w in g.wrong])
    changed = np.concatenate([g.labels != g.drawn for g in drawn])
    assert 0.015 < (wrong != "").mean() < 0.025
    assert (changed == (wrong != "")).all()  # every wrong label changed its grade, and only those changed
    kinds = pd.Series(wrong[wrong != ""]).value_counts(normalize=True)
    assert set(kinds.index) == {"grade", "side", "level"} and kinds.min() > 0.1, kinds
    for g in drawn:  # a side swap exchanges the two sides' grades at one level
        for t in np.flatnonzero(np.array(g.wrong) == "side"):
            condition = TARGETS[t][: -len("_l1_l2")]
            other = condition.replace("left", "right") if "left" in condition else condition.replace("right", "left")
            partner = TARGETS.index(other + TARGETS[t][-len("_l1_l2"):])
            assert g.labels[t] == g.drawn[partner] and g.labels[partner] == g.drawn[t]


def test_clean_twin_has_the_same_studies_and_joint_grades(tmp_path):
    """``clean_grades``: the same studies, points and drawn grades; the image shows the graded narrowing and
    every label is the drawn grade. The noisy set lists each wrong label in the answers folder."""
    noisy, clean = (label_records(SynthSettings(studies=40, test_studies=0, seed=5, clean_grades=c)) for c in (False, True))
    assert [r.coordinates for r in noisy] == [r.coordinates for r in clean]
    for a, b in zip(noisy, clean):
        assert [x[4] for x in a.answers] == [x[4] for x in b.answers]  # the drawn grades
        assert all(x[2] == x[3] and x[6] == x[4] and not x[7] for x in b.answers)  # clean: image = graded, no wrong
    strayed = np.array([x[2] - x[3] for r in noisy for x in r.answers])
    assert 0.04 < strayed.std() < 0.2  # the rater's spread, all families together
    assert sum(bool(x[7]) for r in noisy for x in r.answers) > 0


def test_answers_folder_holds_every_labels_image_and_wrong_labels(synth_dataset):
    answers = synth_dataset.parent / f"{synth_dataset.name}-answers"
    for split, labels_csv in (("train", synth_dataset / "train.csv"), ("test", answers / "test.csv")):
        grades = pd.read_csv(answers / f"{split}_grades.csv", keep_default_na=False)
        wide = pd.read_csv(labels_csv, keep_default_na=False).set_index("study_id")
        assert len(grades) == int((wide != "").to_numpy().sum())  # every labelled cell, once
        for r in grades.itertuples():
            assert wide.loc[r.study_id, f"{r.condition}_{r.level}"] == r.label
        assert ((grades["label"] != grades["drawn_grade"]) == (grades["wrong_label"] != "")).all()
    listed = pd.read_csv(answers / "wrong_labels.csv")
    assert set(listed.columns) == {"split", "study_id", "condition", "level", "kind", "drawn_grade", "label"}


def _unexpected(problems) -> list:
    """The index's problems other than the generator's deliberate quirk: a study without Sagittal T1."""
    return [p for p in problems if not (p.kind == "missing_series" and p.message.endswith("has no Sagittal T1 series"))]


# How close a generated set's label geometry must come to the real data's (absolute, on 300 studies):
# the statistics a locator's design rests on. The left-right foramen gap and the recesses on another
# axial series are reported but not held to the real figure (see GEOMETRY_NOT_MATCHED).
GEOMETRY_TOLERANCE = {"canal_several_slices": 0.06, "canal_spread_2": 0.03, "foramen_spread_1_left": 0.08,
                      "foramen_spread_1_right": 0.08, "foramen_spread_2_left": 0.08, "foramen_spread_2_right": 0.08,
                      "recess_other_instance": 0.08, "foramen_left_right_gap_median": 1.0}
REAL_GEOMETRY = Path(__file__).parent / "data" / "real_label_geometry.json"


def _real_geometry() -> dict:
    """From the real CSV when it is at hand, else the derived figures committed beside the tests."""
    from conftest import SHARED_METADATA

    if (SHARED_METADATA / "train_label_coordinates.csv").is_file():
        return dataset_label_geometry(SHARED_METADATA)
    return json.loads(REAL_GEOMETRY.read_text())


def test_label_geometry_matches_the_real_data():
    records = label_records(SynthSettings(studies=300, test_studies=0, seed=1, image_size=(96, 128)))
    synthetic, real = label_geometry(coordinate_frames(records)[0]), _real_geometry()
    off = {k: (synthetic[k], real[k]) for k, tol in GEOMETRY_TOLERANCE.items() if abs(synthetic[k] - real[k]) > tol}
    assert not off, f"synthetic vs real label geometry: {off}"
    # the committed figures are the real CSV's, when it is at hand to check
    committed = json.loads(REAL_GEOMETRY.read_text())
    assert all(committed[k] == v for k, v in real.items()), "tests/data/real_label_geometry.json is stale"


def test_straight_spines_keep_one_canal_slice_and_curved_ones_do_not():
    curved = label_geometry(coordinate_frames(label_records(SynthSettings(studies=60, test_studies=0, seed=2, image_size=(64, 80))))[0])
    straight = label_geometry(coordinate_frames(label_records(
        SynthSettings(studies=60, test_studies=0, seed=2, image_size=(64, 80), straight=True)))[0])
    assert straight["canal_several_slices"] == 0 and curved["canal_several_slices"] > 0.1


def test_label_records_are_what_write_dataset_wrote(synth_dataset):
    """The label-only path draws exactly what the writer drew: same studies, slices and points."""
    written = pd.read_csv(synth_dataset / "train_label_coordinates.csv")
    records = label_records(SynthSettings(studies=16, test_studies=3, seed=7, image_size=(128, 176)))
    again = coordinate_frames(records)[0]
    pd.testing.assert_frame_equal(written.reset_index(drop=True), again.reset_index(drop=True), check_dtype=False)


def test_posture_moves_points_only_on_its_own_stream():
    """Straight or curved, a study's grades, sizes and series are the same draws."""
    a = label_records(SynthSettings(studies=6, test_studies=0, seed=5, image_size=(64, 80)))
    b = label_records(SynthSettings(studies=6, test_studies=0, seed=5, image_size=(64, 80), straight=True))
    assert [r.labels for r in a] == [r.labels for r in b] and [r.series for r in a] == [r.series for r in b]
    assert [c[4:] for r in a for c in r.coordinates] != [c[4:] for r in b for c in r.coordinates]
