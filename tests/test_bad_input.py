"""Bad input, one kind at a time, on real files: every problem is named with its file (and CSV line
when it has one); the run goes on without the bad sample when that is safe, and stops with one line
(a SpinegradeError: exit status 2, no traceback) when it is not.

Where each kind is covered:

 1. corrupt and truncated DICOM files   test_corrupt_or_truncated_dicom_is_named_and_skipped;
                                        test_dicom.py::test_unreadable_files_are_named (pydicom's
                                        MR_truncated.dcm), test_dicom.py::test_malformed_header_is_a_named_read_error,
                                        test_index.py::test_corrupt_and_absent_files_are_named_and_skipped
 2. listed in the CSVs, absent on disk  test_listed_file_absent_on_disk_is_named_and_skipped;
                                        a whole series folder: test_index.py::test_corrupt_and_absent_files_...
 3. empty (0 bytes) and headerless CSV  test_empty_or_headerless_csv_stops_in_one_line; a missing CSV:
                                        test_index.py::test_required_file_or_column_missing_fails_with_its_name
 4. wrong column name                   test_wrong_column_name_stops_in_one_line (names with stray spaces
                                        are read: test_column_names_with_stray_spaces_are_read)
 5. unknown severity strings            test_unknown_severities_are_named_and_left_unlabelled,
                                        test_no_known_severity_left_stops_in_one_line;
                                        test_index.py::test_unlabelled_cells_coordinates_without_labels_and_unknown_grades
 6. NaN coordinates, points off image   test_missing_or_non_numeric_coordinates_are_named_and_skipped,
                                        test_points_outside_the_image_are_named_and_skipped
 7. a study with no usable series       test_study_without_usable_series_is_named_and_the_rest_goes_on,
                                        test_training_with_no_readable_image_stops_in_one_line;
                                        one series missing: test_index.py::test_missing_series_loses_only_its_conditions
 8. an image of 1x1 pixels              test_one_pixel_image_is_skipped_and_never_a_neighbour
 9. non-DICOM files in a series folder  test_non_dicom_files_in_a_series_folder_are_named_and_ignored
10. untrusted checkpoints               test_hostile_weights_file_is_refused_without_running_it (load_pretrained,
                                        --weights), test_hostile_weights_refused_by_the_train_command,
                                        test_hostile_resume_checkpoint_is_refused_without_running_it (last.pt,
                                        --resume), test_hostile_best_weights_are_refused_without_running_them
                                        (load_state: prediction, locator), test_hostile_cache_arrays_are_never_unpickled
                                        (np.load of the preprocessing cache). Every torch.load, np.load and
                                        safetensors load in src/ is one of these; none allows pickles.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from dicom_factory import write_mr
from spinegrade.cli import main
from spinegrade.data.dicom import main_stack, read_series, read_slice
from spinegrade.data.folds import make_folds, write_csv_atomic
from spinegrade.data.index import build_index, format_report
from spinegrade.data.preprocess import PreprocessSettings, build_cache
from spinegrade.errors import DicomReadError, SpinegradeError

SPINAL = "spinal_canal_stenosis"
SETTINGS = PreprocessSettings("spinal", "crop", image_size=32, crop_mm=40.0)
COORDINATES = "train_label_coordinates.csv"
SERIES = "train_series_descriptions.csv"
# Settings of a training run that stops before its first epoch: what matters is how it stops.
TINY_TRAIN = ["--pretrained", "false", "--image_size", "32", "--batch_size", "8", "--num_workers", "0",
              "--num_epochs", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def baseline(synth_dataset):
    """The undamaged dataset's index, to measure what a damage costs."""
    index = build_index(synth_dataset)
    assert not index.problems
    return index


@pytest.fixture
def csv_copy(synth_dataset, tmp_path) -> Path:
    """A private copy of the CSVs, for damage that never touches an image: the image folders are
    links to the shared (read-only) ones, so copying 50 MB of DICOM is not the test's cost."""
    target = tmp_path / "data"
    target.mkdir()
    for path in synth_dataset.iterdir():
        if path.suffix == ".csv":
            shutil.copy(path, target / path.name)
        else:
            (target / path.name).symlink_to(path, target_is_directory=path.is_dir())
    return target


def _cli(capsys, *args) -> tuple[int, str, str]:
    """The command as a user runs it. The log handlers it sets up go when it returns, as they would with its
    process: left on the package logger, its console handler would write to this test's captured stderr,
    closed once the test ends, and every later record in this process would print a logging error."""
    logger = logging.getLogger("spinegrade")
    before = set(logger.handlers)
    try:
        code = main([str(a) for a in args])
    finally:
        for handler in [h for h in logger.handlers if h not in before]:
            logger.removeHandler(handler)
            handler.close()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, *named: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for name in named:
        assert name in err, (name, err)


def _assert_one_line_error_after_its_log(code: int, err: str, caplog, *named: str) -> None:
    """:func:`_assert_one_line_error` for a command that logs its progress on stderr before it stops
    (training): the lines it logged below ERROR aside, stderr is the one error line."""
    assert "Traceback" not in err, err
    logged_below_error = {line for r in caplog.records if r.name.startswith("spinegrade") and r.levelno < logging.ERROR
                          for line in r.getMessage().splitlines()}
    rest = "\n".join(line for line in err.splitlines() if line not in logged_below_error)
    _assert_one_line_error(code, rest, *named)
    assert rest.strip().startswith("spinegrade train: error: "), rest


def _cache(data_dir: Path, cache_root: Path, logged, condition: str = SPINAL):
    """The training path: samples from the CSVs alone (no image check), then the preprocessing cache; with
    the lines the build logged (``logged``: the fixture)."""
    samples = build_index(data_dir, check_images=False).usable(condition)
    before = len(logged())
    cache = build_cache(samples, SETTINGS, cache_root, workers=1)
    return samples, cache, logged()[before:]


def _victim(baseline, data_dir: Path, k: int = 0) -> tuple[Path, pd.DataFrame]:
    """The k-th study's spinal canal slice, in the copy, with the samples read on it."""
    spinal = baseline.usable(SPINAL)
    image = spinal.loc[spinal["study_id"] == baseline.study_ids[k], "image_path"].iloc[0]
    return data_dir / Path(image).relative_to(baseline.data_dir), spinal[spinal["image_path"] == image]


def _coordinate_lines(data_dir: Path, path: Path) -> list[int]:
    coords = pd.read_csv(data_dir / COORDINATES)
    study, series, instance = (int(v) for v in (path.parent.parent.name, path.parent.name, path.stem))
    hit = (coords["study_id"] == study) & (coords["series_id"] == series) & (coords["instance_number"] == instance)
    return [int(i) + 2 for i in coords.index[hit]]


# 1 ------------------------------------------------------------------------------------------------

def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x17 scrambled by a failing disk \xff" * 40)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _header_cut(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(300)


def _pixels_cut(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage", [_garbage, _empty, _header_cut, _pixels_cut])
def test_corrupt_or_truncated_dicom_is_named_and_skipped(baseline, dataset_copy, tmp_path, damage, logged):
    victim, rows = _victim(baseline, dataset_copy)
    damage(victim)
    with pytest.raises(DicomReadError, match=victim.name) as raised:
        read_slice(victim)
    assert raised.value.path == victim
    # The index, decoding pixels too (a file cut inside its pixel data has a whole header).
    index = build_index(dataset_copy, decode_pixels=True)
    problem = next(p for p in index.problems if p.kind == "unreadable_dicom")
    assert problem.file == str(victim.relative_to(dataset_copy))
    assert all(str(line) in problem.message for line in _coordinate_lines(dataset_copy, victim))
    assert len(index.usable()) == len(baseline.usable()) - len(rows)
    assert problem.file in format_report(index)
    # Training: the cache names the file and keeps every other sample.
    samples, cache, lines = _cache(dataset_copy, tmp_path / "cache", logged)
    assert len(cache) == len(samples) - len(rows)
    assert not cache.samples["image_path"].eq(str(victim)).any()
    assert any(str(victim) in line and "skipped sample" in line for line in lines)


# 2 ------------------------------------------------------------------------------------------------

def test_listed_file_absent_on_disk_is_named_and_skipped(baseline, dataset_copy, tmp_path, capsys, logged):
    victim, rows = _victim(baseline, dataset_copy)
    victim.unlink()
    index = build_index(dataset_copy)
    problem = next(p for p in index.problems if p.kind == "image_missing")
    assert problem.file == str(victim.relative_to(dataset_copy))
    lines = _coordinate_lines(dataset_copy, victim)
    assert f"{COORDINATES} lines {', '.join(map(str, lines))}" in problem.message
    assert len(index.usable()) == len(baseline.usable()) - len(rows)
    code, out, _ = _cli(capsys, "index", "--data-dir", dataset_copy)
    assert code == 0 and problem.file in out and "image_missing" in out
    samples, cache, log = _cache(dataset_copy, tmp_path / "cache", logged)
    assert len(cache) == len(samples) - len(rows)
    assert any(str(victim) in line and "file not found" in line for line in log)


# 3 ------------------------------------------------------------------------------------------------

def _drop_header(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[1:]))


@pytest.mark.parametrize("name", ["train.csv", SERIES, COORDINATES])
@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.write_bytes(b""), ": file is empty"),
    (lambda p: p.write_text("\n"), ": file is empty"),
    (_drop_header, ":1: no header line"),
])
def test_empty_or_headerless_csv_stops_in_one_line(csv_copy, capsys, name, damage, expected):
    damage(csv_copy / name)
    for command in (["index", "--data-dir", csv_copy, "--csv-only"],
                    ["folds", "--data-dir", csv_copy, "--out", csv_copy / "folds.csv"]):
        code, _, err = _cli(capsys, *command)
        _assert_one_line_error(code, err, f"{csv_copy / name}{expected}")
        assert "study_id" in err  # says what the header should be
    assert not (csv_copy / "folds.csv").exists()


# 4 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, column, wrong", [
    ("train.csv", "spinal_canal_stenosis_l4_l5", "spinal_canal_stenosis_l4l5"),
    ("train.csv", "study_id", "study"),
    (SERIES, "series_description", "Series Description"),
    (COORDINATES, "x", "X"),
    (COORDINATES, "instance_number", "instance"),
])
def test_wrong_column_name_stops_in_one_line(csv_copy, capsys, name, column, wrong):
    path = csv_copy / name
    pd.read_csv(path, dtype=str, keep_default_na=False).rename(columns={column: wrong}).to_csv(path, index=False)
    with pytest.raises(SpinegradeError, match=rf"missing column\(s\) {column}\b"):
        build_index(csv_copy, check_images=False)
    code, _, err = _cli(capsys, "index", "--data-dir", csv_copy, "--csv-only")
    _assert_one_line_error(code, err, f"{path}:1: missing column(s) {column}", repr(wrong))


def test_column_names_with_stray_spaces_are_read(csv_copy, baseline):
    path = csv_copy / COORDINATES
    text = path.read_text()
    path.write_text(text.replace("study_id,series_id", " study_id , series_id", 1))
    assert len(build_index(csv_copy).usable()) == len(baseline.usable())


# 5 ------------------------------------------------------------------------------------------------

UNKNOWN_GRADES = ["Sever", "severe", "3", "Normal", "NA"]


def test_unknown_severities_are_named_and_left_unlabelled(baseline, csv_copy, capsys):
    path = csv_copy / "train.csv"
    train = pd.read_csv(path, dtype=str, keep_default_na=False)
    columns = [c for c in train.columns if c.startswith(SPINAL)]
    cells = []
    for k, grade in enumerate(UNKNOWN_GRADES):
        row, column = k, columns[k % len(columns)]
        train.loc[row, column] = grade
        cells.append((int(train.loc[row, "study_id"]), column[len(SPINAL) + 1:], row + 2, grade))
    train.to_csv(path, index=False)
    index = build_index(csv_copy)
    unknown = [p for p in index.problems if p.kind == "unknown_label"]
    assert len(unknown) == len(UNKNOWN_GRADES)
    t = index.table.set_index(["study_id", "condition", "level"])
    for study, level, line, grade in cells:
        assert any(p.file == "train.csv" and p.line == line and repr(grade) in p.message for p in unknown), grade
        assert t.loc[(study, SPINAL, level), "severity"] == -1
        assert not t.loc[(study, SPINAL, level), "usable"]
    assert len(index.usable()) == len(baseline.usable()) - len(UNKNOWN_GRADES)
    code, out, _ = _cli(capsys, "index", "--data-dir", csv_copy, "--csv-only")
    assert code == 0 and all(f"train.csv:{line}:" in out for _, _, line, _ in cells)


def test_no_known_severity_left_stops_in_one_line(csv_copy, capsys):
    path = csv_copy / "train.csv"
    train = pd.read_csv(path, dtype=str, keep_default_na=False)
    grades = [c for c in train.columns if c != "study_id"]
    train[grades] = train[grades].replace({"Normal/Mild": "normal", "Moderate": "moderate", "Severe": "severe"})
    train.to_csv(path, index=False)
    code, _, err = _cli(capsys, "index", "--data-dir", csv_copy, "--csv-only")
    _assert_one_line_error(code, err, str(path), "no labelled cell left")


# 6 ------------------------------------------------------------------------------------------------

def _spinal_points(csv_copy: Path, as_text: bool) -> tuple[pd.DataFrame, pd.Index]:
    """The coordinates CSV (as text, to write values a number column would refuse) and its spinal rows."""
    coords = pd.read_csv(csv_copy / COORDINATES, **({"dtype": str, "keep_default_na": False} if as_text else {}))
    return coords, coords.index[coords["condition"] == "Spinal Canal Stenosis"]


def _named_after_edits(csv_copy: Path, coords: pd.DataFrame, edits: dict, kind: str):
    """Writes ``edits`` ({row: (column, value)}) into the CSV, indexes it, and checks that exactly those
    rows are named as ``kind``, by file and line; returns the index and its problems by line."""
    for i, (column, value) in edits.items():
        coords.loc[i, column] = value
    coords.to_csv(csv_copy / COORDINATES, index=False)
    index = build_index(csv_copy)
    named = {p.line: p for p in index.problems if p.kind == kind}
    assert set(named) == {i + 2 for i in edits}
    assert all(p.file == COORDINATES for p in named.values())
    return index, named


def test_missing_or_non_numeric_coordinates_are_named_and_skipped(baseline, csv_copy, capsys):
    coords, spinal = _spinal_points(csv_copy, as_text=True)
    bad = {spinal[0]: ("x", ""), spinal[1]: ("y", "NaN"), spinal[2]: ("x", "inf"), spinal[3]: ("y", "twelve")}
    index, named = _named_after_edits(csv_copy, coords, bad, "bad_coordinate")
    assert "'twelve'" in named[spinal[3] + 2].message and "'inf'" in named[spinal[2] + 2].message
    # The graded cells lose their point, so they are named again as graded without coordinates.
    assert sum(p.kind == "label_without_coordinates" for p in index.problems) == len(bad)
    assert len(index.usable()) == len(baseline.usable()) - len(bad)
    code, out, _ = _cli(capsys, "index", "--data-dir", csv_copy)
    assert code == 0 and f"{COORDINATES}:{spinal[3] + 2}:" in out


def test_points_outside_the_image_are_named_and_skipped(baseline, csv_copy, tmp_path, logged):
    coords, spinal = _spinal_points(csv_copy, as_text=False)
    first = coords.loc[spinal[0]]
    image = csv_copy / "train_images" / str(first.study_id) / str(first.series_id) / f"{first.instance_number}.dcm"
    rows, columns = read_slice(image, with_pixels=False).shape
    moved = {spinal[0]: ("x", 5000.0), spinal[1]: ("y", 1e6), spinal[2]: ("x", float(columns))}
    index, outside = _named_after_edits(csv_copy, coords, moved, "coordinate_outside_image")
    assert str(image.relative_to(csv_copy)) in outside[spinal[0] + 2].message
    assert f"{rows}x{columns}" in outside[spinal[0] + 2].message
    assert len(index.usable()) == len(baseline.usable()) - len(moved)
    # Training reads the CSVs alone: the cache must catch them, never crop an empty image.
    samples, cache, lines = _cache(csv_copy, tmp_path / "cache", logged)
    assert len(cache) == len(samples) - len(moved)
    assert sum("lies outside the image" in line for line in lines) == len(moved)
    assert all(any(f"point ({coords.loc[i, 'x']:g}, {coords.loc[i, 'y']:g})" in line for line in lines) for i in moved)
    assert cache.images.reshape(len(cache), -1).max(axis=1).min() > 0  # no blank sample kept


# 7 ------------------------------------------------------------------------------------------------

def test_study_without_usable_series_is_named_and_the_rest_goes_on(baseline, dataset_copy, tmp_path, logged):
    listed, junk = baseline.study_ids[:2]
    # Study `listed`: none of its series is listed, nor on disk.
    series = pd.read_csv(dataset_copy / SERIES)
    series[series["study_id"] != listed].to_csv(dataset_copy / SERIES, index=False)
    shutil.rmtree(dataset_copy / "train_images" / str(listed))
    # Study `junk`: its series are listed and present, but no file in them is DICOM.
    for f in (dataset_copy / "train_images" / str(junk)).rglob("*.dcm"):
        f.write_text("exported from PACS viewer: see attached")
    index = build_index(dataset_copy)
    missing = [p for p in index.problems if p.kind == "missing_series" and f"study {listed} " in p.message]
    assert len(missing) == 3 and all(p.file == SERIES for p in missing)
    unreadable = [p for p in index.problems if p.kind == "unreadable_dicom"]
    assert unreadable and all(p.file.startswith(f"train_images/{junk}/") for p in unreadable)
    assert all("not a DICOM file" in p.message for p in unreadable)
    usable = index.usable()
    assert not usable["study_id"].isin([listed, junk]).any()
    before = baseline.usable()
    assert len(usable) == int((~before["study_id"].isin([listed, junk])).sum())
    # Training, which reads only the CSVs, learns the same at the cache and goes on with the rest.
    samples, cache, lines = _cache(dataset_copy, tmp_path / "cache", logged)
    assert set(cache.samples["study_id"]) == set(samples["study_id"]) - {listed, junk}
    assert any(f"/train_images/{junk}/" in line and "skipped sample" in line for line in lines)


def test_training_with_no_readable_image_stops_in_one_line(dataset_copy, tmp_path, capsys, caplog):
    for f in (dataset_copy / "train_images").rglob("*.dcm"):
        f.write_bytes(b"")
    folds = tmp_path / "folds.csv"
    write_csv_atomic(make_folds(build_index(dataset_copy, check_images=False).labels_wide(), n_folds=2, seed=0), folds)
    code, _, err = _cli(capsys, "train", "--models", "resnet18", "--fold", "0", "--data-dir", dataset_copy,
                        "--folds", folds, "--output-dir", tmp_path / "out", *TINY_TRAIN)
    _assert_one_line_error_after_its_log(code, err, caplog)


# 8 ------------------------------------------------------------------------------------------------

def _shrink_to_one_pixel(path: Path) -> None:
    """The same slice (geometry, instance number) with a 1x1 image."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    write_mr(path, np.array([[100]]), instance=int(ds.InstanceNumber),
             position=tuple(float(v) for v in ds.ImagePositionPatient),
             orientation=tuple(float(v) for v in ds.ImageOrientationPatient),
             spacing=tuple(float(v) for v in ds.PixelSpacing), description=str(ds.SeriesDescription))


def test_one_pixel_image_is_skipped_and_never_a_neighbour(baseline, dataset_copy, tmp_path, logged):
    labelled, rows = _victim(baseline, dataset_copy, 0)
    _shrink_to_one_pixel(labelled)
    # In another study, the slice next to the labelled one becomes 1x1: its samples stay, with real neighbours.
    other, other_rows = _victim(baseline, dataset_copy, 1)
    stack = main_stack(read_series(other.parent, with_pixels=False))
    k = stack.index_of_instance(int(other.stem))
    neighbour = stack.slices[k + 1 if k + 1 < len(stack) else k - 1].path
    _shrink_to_one_pixel(neighbour)

    index = build_index(dataset_copy)
    small = {p.file: p.message for p in index.problems if p.kind == "image_too_small"}
    assert set(small) == {str(labelled.relative_to(dataset_copy)), str(neighbour.relative_to(dataset_copy))}
    assert "1x1 pixels" in small[str(labelled.relative_to(dataset_copy))]
    assert COORDINATES in small[str(labelled.relative_to(dataset_copy))]  # its labelled rows, by line
    assert "unlabelled file of" in small[str(neighbour.relative_to(dataset_copy))]  # named, though no label is on it
    assert len(index.usable()) == len(baseline.usable()) - len(rows)

    samples, cache, lines = _cache(dataset_copy, tmp_path / "cache", logged)
    assert len(cache) == len(samples) - len(rows)
    assert sum(str(labelled) in line and "skipped sample" in line and "1x1" in line for line in lines) == len(rows)
    assert any(str(neighbour) in line and "skipped slice" in line for line in lines)
    kept = np.flatnonzero(cache.samples["image_path"].eq(str(other)).to_numpy())
    assert len(kept) == len(other_rows)
    assert cache.images[kept].reshape(len(kept), cache.images.shape[1], -1).max(axis=2).min() > 0


# 9 ------------------------------------------------------------------------------------------------

def test_non_dicom_files_in_a_series_folder_are_named_and_ignored(baseline, dataset_copy, tmp_path, logged):
    victim, _ = _victim(baseline, dataset_copy)
    series_dir = victim.parent
    strays = [series_dir / "notes.txt", series_dir / "Thumbs.db"]
    strays[0].write_text("patient moved during the sagittal sequence\n")
    strays[1].write_bytes(bytes(range(256)) * 20)
    (series_dir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # hidden: not even looked at
    (series_dir.parent / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")  # beside the series folders
    index = build_index(dataset_copy, decode_pixels=True)
    named = [p for p in index.problems if p not in baseline.problems]
    assert sorted(p.file for p in named) == sorted(str(s.relative_to(dataset_copy)) for s in strays)
    assert all(p.kind == "unreadable_file" and "not a DICOM file" in p.message and "unlabelled file of" in p.message
               for p in named)
    assert len(index.usable()) == len(baseline.usable())

    errors: list[DicomReadError] = []
    stack = main_stack(read_series(series_dir, errors=errors))
    assert sorted(e.path for e in errors) == sorted(strays)
    assert all("not a DICOM file" in str(e) and str(e.path) in str(e) for e in errors)
    assert len(stack) == len(list(series_dir.glob("*.dcm")))

    samples, cache, lines = _cache(dataset_copy, tmp_path / "cache", logged)
    assert len(cache) == len(samples)
    for stray in strays:
        assert any(str(stray) in line and "not a DICOM file" in line for line in lines)
    assert not any("skipped sample" in line for line in lines)


def test_a_truncated_unlabelled_slice_of_a_labelled_series_is_named_by_the_data_report(baseline, dataset_copy):
    """Prediction may read any slice of a stack, so the report reads every file of every listed series,
    not just the labelled ones (headers only by default)."""
    victim, _ = _victim(baseline, dataset_copy)
    others = sorted(p for p in victim.parent.glob("*.dcm") if p != victim
                    and p.name not in set(baseline.table["image_path"].dropna().map(lambda q: Path(q).name)))
    unlabelled = others[0]
    _header_cut(unlabelled)
    (victim.parent / "scanner-log.txt").write_text("not an image\n")
    index = build_index(dataset_copy)
    named = {p.file: p for p in index.problems if p not in baseline.problems}
    for path in (unlabelled, victim.parent / "scanner-log.txt"):
        problem = named[str(path.relative_to(dataset_copy))]
        assert problem.kind == "unreadable_file" and f"series {victim.parent.name}" in problem.message
    report = format_report(index)
    assert str(unlabelled.relative_to(dataset_copy)) in report and "scanner-log.txt" in report
    assert len(index.usable()) == len(baseline.usable())  # nobody's sample was on it


# 10 -----------------------------------------------------------------------------------------------

class _RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile(path: Path, marker: Path, kind: str) -> Path:
    payload = {"state_dict": {"conv1.weight": torch.zeros(1)}, "hook": _RunsCode(marker)}
    if kind == "torch":  # torch.save's zip format, the usual .pth/.pt
        torch.save(payload, path)
    else:  # a bare pickle, the legacy format (and what a disguised .safetensors would hold)
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return path


def _assert_live(kind: str, tmp_path: Path) -> None:
    """The payload really runs when unpickled, so a refusal below is what keeps the marker away."""
    control = tmp_path / "control-marker"
    path = _hostile(tmp_path / "control.bin", control, kind)
    if kind == "torch":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert control.exists()


@pytest.mark.parametrize("name, kind", [("hostile.pth", "torch"), ("hostile.pt", "pickle"),
                                        ("hostile.safetensors", "pickle")])
def test_hostile_weights_file_is_refused_without_running_it(tmp_path, name, kind):
    from spinegrade.models.classifier import LevelClassifier, ModelSpec, load_pretrained

    _assert_live(kind, tmp_path)
    marker = tmp_path / "MARKER"
    weights = _hostile(tmp_path / name, marker, kind)
    model = LevelClassifier(ModelSpec("resnet18"))
    with pytest.raises(SpinegradeError, match="refused") as raised:
        load_pretrained(model, pretrained=True, weights=str(weights))
    assert str(weights) in str(raised.value) and "\n" not in str(raised.value)
    assert not marker.exists()


@pytest.fixture(scope="module")
def train_setup(synth_dataset, tmp_path_factory):
    """Folds over the shared synthetic set and an output folder whose cache the train commands share."""
    root = tmp_path_factory.mktemp("hostile-train")
    folds = root / "folds.csv"
    write_csv_atomic(make_folds(build_index(synth_dataset, check_images=False).labels_wide(), n_folds=2, seed=0), folds)
    return synth_dataset, folds, root / "out"


def test_hostile_weights_refused_by_the_train_command(train_setup, tmp_path, capsys, caplog):
    data, folds, out = train_setup
    marker = tmp_path / "MARKER"
    weights = _hostile(tmp_path / "weights.pth", marker, "torch")
    code, _, err = _cli(capsys, "train", "--models", "resnet18", "--fold", "0", "--data-dir", data, "--folds", folds,
                        "--output-dir", out, *TINY_TRAIN, "--weights", weights)
    _assert_one_line_error_after_its_log(code, err, caplog, str(weights), "refused")
    assert not marker.exists()


def test_hostile_resume_checkpoint_is_refused_without_running_it(train_setup, tmp_path, capsys, caplog):
    from spinegrade.config import load_config
    from spinegrade.layout import RunLayout
    from spinegrade.train import train_fold

    data, folds, out = train_setup
    for kind in ("torch", "pickle"):
        _assert_live(kind, tmp_path)
        marker = tmp_path / f"MARKER-{kind}"
        last = RunLayout(out).fold_dir("resnet18", "spinal", 1, existing=False) / "last.pt"  # where training looks
        last.parent.mkdir(parents=True, exist_ok=True)
        _hostile(last, marker, kind)
        # The function train.py runs, then the command a user types.
        config = load_config("resnet18", {"pretrained": False, "image_size": 32, "batch_size": 8, "num_workers": 0,
                                          "num_epochs": 1})
        with pytest.raises(SpinegradeError, match="last.pt"):
            train_fold(config, data, folds, out, 1, resume=True, device="cpu")
        code, _, err = _cli(capsys, "train", "--models", "resnet18", "--fold", "1", "--data-dir", data,
                            "--folds", folds, "--output-dir", out, *TINY_TRAIN, "--resume")
        _assert_one_line_error_after_its_log(code, err, caplog, str(last))
        assert not marker.exists()


def test_hostile_best_weights_are_refused_without_running_them(tmp_path):
    from spinegrade.models.classifier import load_state

    marker = tmp_path / "MARKER"
    best = _hostile(tmp_path / "best.safetensors", marker, "pickle")
    with pytest.raises(SpinegradeError, match="best.safetensors.*refused"):
        load_state(torch.nn.Linear(1, 1), best)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["object array", "bare pickle"])
def test_hostile_cache_arrays_are_never_unpickled(synth_dataset, tmp_path, kind):
    samples = build_index(synth_dataset, check_images=False).usable(SPINAL).head(10)
    root = tmp_path / "cache"
    build_cache(samples, SETTINGS, root, workers=1)
    marker = tmp_path / "MARKER"
    arrays = sorted(p for p in root.rglob("*") if p.suffix in (".npy", ".npz"))
    assert arrays
    for path in arrays:
        hostile = np.array([_RunsCode(marker)], dtype=object)
        if kind == "bare pickle":
            path.write_bytes(pickle.dumps(hostile))
        elif path.suffix == ".npz":
            with open(path, "wb") as f:
                np.savez(f, rows=hostile, images=hostile, problems=hostile)
        else:
            np.save(path, hostile, allow_pickle=True)
    # Whatever build_cache reads (the assembled array, or each series' part once that is gone), it refuses
    # pickled objects: it may fail or decode again, never run them.
    for attempt in range(2):
        try:
            build_cache(samples, SETTINGS, root, workers=1)
        except (SpinegradeError, ValueError, OSError):
            pass
        assert not marker.exists()
        for assembled in {p.parent for p in root.rglob("samples.csv")}:
            shutil.rmtree(assembled)
