"""Localise, then grade, on studies with no coordinates: a split, a broken study, one folder off a scanner."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinegrade.constants import LEVELS, PROBABILITY_COLUMNS, SEVERITY_INDEX, parse_row_id
from spinegrade.errors import SpinegradeError
from spinegrade.metrics import competition_score
from spinegrade.predict import check_submission, predict_split, predict_study


def test_localiser_puts_points_within_a_few_millimetres(trained_run):
    report = trained_run["localizer_report"]
    assert report["slice_within_one"] >= 0.9
    # 20 training studies per fold and a few seconds of training: a disc is about 9 mm high and a
    # point dropped anywhere on the slice would be some 60 mm off.
    assert report["all_levels"]["median_mm"] < 6.5
    saved = json.loads((trained_run["out"] / "results" / "localizer_spinal_report.json").read_text())
    assert saved["studies"] == report["studies"] == 30 and saved["all_levels"] == report["all_levels"]
    oof = pd.read_csv(trained_run["out"] / "results" / "localizer_spinal_oof.csv")
    assert len(oof) == 30 * 5 and set(oof["level"]) == set(LEVELS)
    assert (oof["error_mm"] < 10).mean() > 0.7


def _score_against_answers(submission: pd.DataFrame, answers) -> dict:
    truth = pd.read_csv(answers / "test.csv").melt(id_vars="study_id", var_name="column", value_name="label")
    parsed = [parse_row_id(r) for r in submission["row_id"]]
    frame = submission.assign(study_id=[p[0] for p in parsed], condition=[p[1] for p in parsed],
                              level=[p[2] for p in parsed])
    frame["column"] = frame["condition"] + "_" + frame["level"]
    frame = frame.merge(truth, on=["study_id", "column"])
    frame["severity"] = frame["label"].map(SEVERITY_INDEX).fillna(-1).astype(int)
    return competition_score(frame)  # every group's term (independent of predict.score_submission)


def test_test_split_submission_is_complete_valid_and_beats_the_prior(trained_run, tmp_path, logged):
    out_file = tmp_path / "submission.csv"
    per_backbone, submission = predict_split(trained_run["data"], "test", trained_run["out"], out=out_file,
                                             backbones=["efficientnet_lite0"])
    lines = logged()
    written = pd.read_csv(out_file)
    sample = pd.read_csv(trained_run["data"] / "sample_submission.csv")
    assert list(written["row_id"]) == list(sample["row_id"])
    probs = written[list(PROBABILITY_COLUMNS)].to_numpy()
    assert (probs >= 0).all() and (probs <= 1).all() and np.allclose(probs.sum(axis=1), 1, atol=1e-6)
    # Spinal (5 levels) and foraminal (5 levels x 2 sides) rows of the 5 test studies come from the model.
    assert set(per_backbone["backbone"]) == {"efficientnet_lite0"} and len(per_backbone) == 5 * 5 + 5 * 10
    assert any(line.startswith("subarticular: no model grades it") and "prior" in line for line in lines), lines
    model = _score_against_answers(written, trained_run["answers"])
    prior = _score_against_answers(written.assign(
        **{c: v for c, v in zip(PROBABILITY_COLUMNS, np.array(_prior_rows(trained_run, written)).T)}), trained_run["answers"])
    assert model["spinal"] < prior["spinal"] and model["foraminal"] < prior["foraminal"], (model, prior)


def _prior_rows(trained_run, submission):
    from spinegrade.predict import training_priors

    priors = training_priors(trained_run["data"], trained_run["out"]).set_index(["condition", "level"])
    return [priors.loc[(c, lv), list(PROBABILITY_COLUMNS)].to_numpy(dtype=float)
            for _, c, lv in (parse_row_id(r) for r in submission["row_id"])]


def test_a_study_with_a_missing_or_corrupt_sagittal_series_gets_prior_rows(trained_run, tmp_path, logged):
    data = tmp_path / "data"
    shutil.copytree(trained_run["data"], data)
    series = pd.read_csv(data / "test_series_descriptions.csv")
    sag = series[series["series_description"] == "Sagittal T2/STIR"]
    broken, removed = sag.iloc[0], sag.iloc[1]
    for f in (data / "test_images" / str(broken.study_id) / str(broken.series_id)).iterdir():
        f.write_bytes(b"garbage")
    series.drop(index=removed.name).to_csv(data / "test_series_descriptions.csv", index=False)
    _, submission = predict_split(data, "test", trained_run["out"], out=tmp_path / "s.csv")
    lines = logged()
    assert len(submission) == 5 * 25
    for study in (broken.study_id, removed.study_id):
        assert any(f"study {study}" in line and "spinal rows get the training prior" in line for line in lines), lines
        rows = submission[submission["row_id"].str.startswith(f"{study}_spinal")]
        prior = np.array(_prior_rows(trained_run, rows))
        np.testing.assert_allclose(rows[list(PROBABILITY_COLUMNS)].to_numpy(), prior)


def test_one_study_folder_with_arbitrary_names_and_nesting(trained_run, tmp_path):
    series = pd.read_csv(trained_run["data"] / "test_series_descriptions.csv")
    study = series["study_id"].iloc[0]
    scanner = tmp_path / "incoming"
    for i, f in enumerate(sorted((trained_run["data"] / "test_images" / str(study)).rglob("*.dcm"))):
        target = scanner / f"dir{i % 3}" / "deeper" / f"IMG{i:05d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    (scanner / "README.txt").write_text("not a DICOM file")
    result = predict_study(scanner, trained_run["out"], out_dir=tmp_path / "result")
    assert [lv["level"] for lv in result["levels"]] == ["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"]
    saved = json.loads((tmp_path / "result" / "grades.json").read_text())
    assert saved["series"] == "Sagittal T2/STIR" and all(abs(sum(lv[c] for c in PROBABILITY_COLUMNS) - 1) < 1e-5
                                                           for lv in saved["levels"])
    assert (tmp_path / "result" / "graded_slice.png").stat().st_size > 10000
    with pytest.raises(SpinegradeError, match="no Sagittal T2/STIR series"):
        predict_study(tmp_path / "result", trained_run["out"])


def test_submission_check_refuses_bad_files(trained_run):
    sample = pd.read_csv(trained_run["data"] / "sample_submission.csv")
    good = sample.copy()
    check_submission(good, sample)
    first = good["row_id"].iloc[0]
    cases = {  # each bad file and what the refusal must say about it
        "1 missing": good.iloc[1:],
        "1 extra": pd.concat([good, good.iloc[:1].assign(row_id="1_spinal_canal_stenosis_l1_l2")]),
        f"row {first}: probabilities must be finite": good.assign(severe=[np.nan] + [1 / 3] * (len(good) - 1)),
        f"row {first}: probabilities must be finite, non-negative": good.assign(
            normal_mild=[-0.1] + [1 / 3] * (len(good) - 1)),
        "duplicate row": pd.concat([good, good.iloc[:1]]),
    }
    for expected, frame in cases.items():
        with pytest.raises(SpinegradeError, match=re.escape(expected)):
            check_submission(frame.reset_index(drop=True), sample)


def test_blend_then_submit_end_to_end(trained_run, tmp_path):
    from spinegrade.blend import run_blend
    from spinegrade.predict import prior_submission, score_submission
    from spinegrade.submit import submit

    out = _own_copy(trained_run["out"], tmp_path)  # this test writes a blend and submissions
    reports = run_blend(out, trained_run["folds"])
    assert list(reports) == ["spinal", "foraminal"]  # the groups the run trained
    assert set(reports["spinal"].blend.backbones) == {"efficientnet_lite0", "efficientnet_lite0_wide"}
    assert reports["foraminal"].blend.backbones == ["efficientnet_lite0"]  # the one backbone that has it
    path = submit(trained_run["data"], out, description="two lite0")
    assert path.name.startswith("submission-") and path.name.endswith("-two-lite0.csv")
    final = out / "submissions" / "submission.csv"
    assert final.read_bytes() == path.read_bytes()
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert list(manifest["groups"]) == ["spinal", "foraminal"] and manifest["rows"] == 5 * 25
    for group in ("spinal", "foraminal"):
        entry = manifest["groups"][group]
        used = [n for n, w in entry["weights"].items() if w > 0]
        assert entry["backbones"] == used and all(len(entry["folds"][n]) == 3 for n in used)
        assert "blend_nested" in entry["oof_loss"]
    submission = pd.read_csv(final)
    model = score_submission(submission, trained_run["answers"] / "test.csv")
    prior = score_submission(prior_submission(submission["row_id"], trained_run["data"], out),
                             trained_run["answers"] / "test.csv")
    assert model["spinal"] < prior["spinal"] and model["foraminal"] < prior["foraminal"]
    assert model["subarticular"] == pytest.approx(prior["subarticular"])  # no model grades it yet


def _own_copy(run: Path, tmp_path: Path) -> Path:
    """A copy of the shared trained run for a test that writes into it (resumable state and cache left out)."""
    target = tmp_path / "run"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("last.pt", "cache"))
    return target


def test_rows_follow_the_listed_test_studies_when_the_sample_lists_others(trained_run, tmp_path, logged):
    from spinegrade.predict import write_submission

    sample = pd.read_csv(trained_run["data"] / "sample_submission.csv")
    one_study = sample[sample["row_id"].str.startswith(sample["row_id"].iloc[0].split("_")[0] + "_")]
    write_submission(sample, tmp_path / "s.csv", one_study)
    assert len(pd.read_csv(tmp_path / "s.csv")) == len(sample)  # nothing dropped
    assert any("sample_submission.csv lists 25 rows" in line for line in logged())
