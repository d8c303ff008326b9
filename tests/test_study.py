"""The Study unit: a competition split and a scanner folder read as the same study, graded the same."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import torch

from spinegrade.blend import blends_for
from spinegrade.constants import PROBABILITY_COLUMNS, SAGITTAL_T2, SERIES_DESCRIPTIONS
from spinegrade.predict import grade_split
from spinegrade.study import SCANNER_STUDY_ID, scanner_study, split_studies


def test_a_split_study_and_its_files_off_a_scanner_are_graded_alike(trained_run, tmp_path):
    data, out = trained_run["data"], trained_run["out"]
    listed = split_studies(data, "test")
    assert [s.study_id for s in listed] == sorted(pd.read_csv(data / "test_series_descriptions.csv")["study_id"].unique())
    from_split = listed[0]
    scanner = tmp_path / "incoming"  # the same files, renamed and nested as a scanner might leave them
    for i, f in enumerate(sorted((data / "test_images" / str(from_split.study_id)).rglob("*.dcm"))):
        target = scanner / f"dir{i % 2}" / f"IMG{i:05d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    from_scanner, notes = scanner_study(scanner)
    assert from_scanner.study_id == SCANNER_STUDY_ID and not notes
    for kind in SERIES_DESCRIPTIONS:  # the same series of each kind, file for file
        split_files = sorted(len(list(Path(s.key).iterdir())) for s in from_split.of_kind(kind))
        assert sorted(len(s.files) for s in from_scanner.of_kind(kind)) == split_files, kind
    assert from_scanner.of_kind(SAGITTAL_T2)[0].found_by == "description"

    blends = blends_for(out, None)
    cpu = torch.device("cpu")
    by_split = grade_split([from_split], out, blends, cpu).grades
    by_scanner = grade_split([from_scanner], out, blends, cpu).grades
    assert set(by_split["group"]) == {"spinal", "foraminal", "subarticular"} and len(by_split) == len(by_scanner)
    key = ["group", "backbone", "condition", "level"]
    a, b = by_split.sort_values(key).reset_index(drop=True), by_scanner.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key], b[key])
    assert (a[list(PROBABILITY_COLUMNS)] - b[list(PROBABILITY_COLUMNS)]).abs().to_numpy().max() < 1e-6


def test_a_model_that_outputs_nan_grades_nothing_and_its_targets_get_the_prior(trained_run):
    from spinegrade.locators import locate_split
    from spinegrade.predict import grade_studies, load_fold_models
    from spinegrade.submit import submission_frame, training_priors

    cpu = torch.device("cpu")
    located = locate_split(trained_run["data"], "test", trained_run["out"], "spinal", cpu)[:1]
    models = load_fold_models(trained_run["out"], "efficientnet_lite0", "spinal", cpu)
    assert len(grade_studies(located, models, cpu)) == 5  # the five levels, as trained
    with torch.no_grad():
        for m in models:
            next(m.model.head.parameters()).fill_(float("nan"))
    graded = grade_studies(located, models, cpu)
    assert graded.empty and graded["study_id"].dtype == "int64"
    prior = submission_frame([located[0].study_id], graded.assign(group="spinal", backbone="efficientnet_lite0"),
                             blends_for(trained_run["out"], ["efficientnet_lite0"]),
                             training_priors(trained_run["data"], trained_run["out"]))
    baseline = submission_frame([located[0].study_id], graded.iloc[:0].assign(group="spinal", backbone="x"), {},
                                training_priors(trained_run["data"], trained_run["out"]))
    pd.testing.assert_frame_equal(prior, baseline)
