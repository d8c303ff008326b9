"""The synthetic dataset: exact RSNA layout, consistent geometry, and a grade signal in the pixels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from spinegrade.constants import LABEL_COLUMNS, PROBABILITY_COLUMNS
from spinegrade.data.dicom import read_slice
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


def test_spinal_grade_can_be_read_from_canal_width(synth_dataset):
    index = build_index(synth_dataset)
    rows = index.usable("spinal_canal_stenosis")
    widths, grades = [], []
    for row in rows.itertuples():
        s = read_slice(row.image_path)
        widths.append(_canal_width_mm(s.pixels, row.x, row.y, s.pixel_spacing[1]))
        grades.append(row.severity)
    widths, grades = np.array(widths), np.array(grades)
    assert (grades > 0).sum() >= 3, "the fixture needs some moderate or severe levels"
    # Narrower canal, worse grade: the width alone separates normal from stenotic levels.
    assert roc_auc_score(grades > 0, -widths) > 0.9
    assert widths[grades == 0].mean() > widths[grades > 0].mean() + 3


def test_grade_balance_close_to_the_real_data():
    rng = np.random.default_rng(0)
    spinal = np.array([sample_anatomy(rng).grades["spinal_canal_stenosis"] for _ in range(1500)])
    shares = [(spinal == k).mean() for k in range(3)]
    assert abs(shares[0] - 0.878) < 0.02 and abs(shares[1] - 0.075) < 0.015 and abs(shares[2] - 0.048) < 0.012
    severe_per_level = (spinal == 2).mean(axis=0)
    assert severe_per_level.argmax() == 3  # worst at L4/L5


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
