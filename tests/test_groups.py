"""Condition groups through blend and evaluation: each group blended on its own rows, a backbone
without a group left out of that group only, a row per (backbone, group), the full competition score,
and a run that refuses folds other than the ones it was trained on."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from spinegrade.blend import load_blends, run_blend
from spinegrade.cli import trained_groups
from spinegrade.constants import GROUPS, LEVELS, PROBABILITY_COLUMNS, SEVERITIES, row_id
from spinegrade.data.folds import write_csv_atomic
from spinegrade.errors import SpinegradeError
from spinegrade.evaluate import run_evaluation
from spinegrade.layout import RunLayout, run_folds

STUDIES = 40


def _write_oof(layout: RunLayout, name: str, group: str, signal: float, seed: int) -> None:
    """OOF rows of every condition of ``group`` for 40 studies over 4 folds; labels fixed by the
    study (the same for every backbone), probabilities as informative as ``signal``."""
    labels_rng, rng = np.random.default_rng(1), np.random.default_rng(seed)
    rows = []
    for study in range(STUDIES):
        for condition in GROUPS[group].conditions:
            for level in LEVELS:
                label = labels_rng.choice(3, p=[0.7, 0.2, 0.1])
                logits = rng.normal(0, 1, 3)
                logits[label] += signal
                p = np.exp(logits) / np.exp(logits).sum()
                rows.append({"row_id": row_id(1000 + study, condition, level), **dict(zip(PROBABILITY_COLUMNS, p)),
                             "label": SEVERITIES[label], "fold": study % 4})
    frame = pd.DataFrame(rows)
    for fold, part in frame.groupby("fold"):
        write_csv_atomic(part, layout.oof_file(name, group, int(fold), existing=False))


@pytest.fixture
def run(tmp_path):
    layout = RunLayout(tmp_path)
    write_csv_atomic(pd.DataFrame({"study_id": 1000 + np.arange(STUDIES), "fold": np.arange(STUDIES) % 4}), layout.folds)
    _write_oof(layout, "alpha", "spinal", 2.0, seed=2)
    _write_oof(layout, "beta", "spinal", 0.5, seed=3)
    _write_oof(layout, "beta", "foraminal", 2.0, seed=4)  # beta alone grades the foraminal group
    return layout


def test_each_group_is_blended_on_its_own_rows(run):
    reports = run_blend(run.root)  # no --folds: the run's own copy
    assert list(reports) == ["spinal", "foraminal"]
    assert sorted(reports["spinal"].blend.backbones) == ["alpha", "beta"]
    assert reports["foraminal"].blend.backbones == ["beta"]  # alpha has no foraminal rows: left out there only
    assert reports["spinal"].rows == STUDIES * 5 and reports["foraminal"].rows == STUDIES * 10
    saved = json.loads(run.blend_json.read_text())
    assert set(saved["groups"]) == {"spinal", "foraminal"}
    assert {g: b.backbones for g, b in load_blends(run.root).items()} == \
        {"spinal": reports["spinal"].blend.backbones, "foraminal": ["beta"]}
    assert len(list((run.oof / "blend" / "foraminal").glob("fold*.csv"))) == 4
    weights = dict(zip(reports["spinal"].blend.backbones, reports["spinal"].blend.weights))
    assert weights["alpha"] > weights["beta"]  # the informative one


def test_evaluation_has_a_row_per_backbone_and_group_and_the_full_score(run):
    run_blend(run.root)
    summary = run_evaluation(run.root)
    pairs = set(zip(summary["name"], summary["group"]))
    assert pairs == {("alpha", "spinal"), ("beta", "spinal"), ("blend", "spinal"), ("class_prior", "spinal"),
                     ("beta", "foraminal"), ("blend", "foraminal"), ("class_prior", "foraminal")}
    foraminal = summary[summary["group"] == "foraminal"].set_index("name")
    assert foraminal["spinal"].isna().all() and foraminal["foraminal"].notna().all()
    assert foraminal.loc["beta", "score"] < foraminal.loc["class_prior", "score"]
    competition = pd.read_csv(run.results / "competition.csv").set_index("name")
    assert competition.loc["beta", "groups"] == "spinal foraminal"
    beta = competition.loc["beta"]
    assert beta["score"] == pytest.approx(np.mean([beta["spinal"], beta["foraminal"], beta["any_severe_spinal"]]))
    assert competition.loc["alpha", "groups"] == "spinal" and np.isnan(competition.loc["alpha", "foraminal"])
    assert (run.results / "beta_foraminal_oof_metrics.json").is_file()
    page = run.report.read_text()
    assert "foraminal: left_neural_foraminal_narrowing, right_neural_foraminal_narrowing on Sagittal T1" in page


def test_a_run_refuses_folds_it_was_not_trained_on(run, tmp_path):
    assert run_folds(run, None) == run.folds
    other = tmp_path / "other.csv"
    write_csv_atomic(pd.DataFrame({"study_id": 1000 + np.arange(STUDIES), "fold": (np.arange(STUDIES) + 1) % 4}), other)
    with pytest.raises(SpinegradeError, match=r"other\.csv: differs from the folds this run's models were trained on"):
        run_blend(run.root, other)
    same = tmp_path / "same.csv"
    pd.read_csv(run.folds).sample(frac=1, random_state=0).to_csv(same, index=False)  # same folds, other order
    assert run_folds(run, same) == same


def test_conditions_default_to_the_groups_with_a_locator():
    assert trained_groups(None) == [g for g, spec in GROUPS.items() if spec.locator]
    assert trained_groups(["subarticular", "spinal"]) == ["spinal", "subarticular"]
    with pytest.raises(SpinegradeError, match="unknown condition group"):
        trained_groups(["foramina"])
