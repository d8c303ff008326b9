"""Blend weights tuned on OOF loss, the nested estimate, and the submission built from them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from spinegrade.blend import _loss, combine, run_blend
from spinegrade.constants import LEVELS, PROBABILITY_COLUMNS, SEVERITIES, row_id
from spinegrade.data.folds import write_csv_atomic
from spinegrade.layout import RunLayout
from spinegrade.metrics import FixedRowsScore
from spinegrade.oof import read_oof


def _write_oof(root, name, labels, probs, folds):
    for fold in np.unique(folds):
        rows = []
        for i in np.flatnonzero(folds == fold):
            study, k = divmod(i, 5)
            rows.append({"row_id": row_id(1000 + study, "spinal_canal_stenosis", LEVELS[k]),
                         **dict(zip(PROBABILITY_COLUMNS, probs[i])), "label": SEVERITIES[labels[i]], "fold": int(fold)})
        write_csv_atomic(pd.DataFrame(rows), root / "oof" / name / "spinal" / f"fold{fold}.csv")


def _blend(root, **kwargs):
    """The spinal report: the only group these OOF trees hold."""
    reports = run_blend(root, root / "folds.csv", **kwargs)
    assert list(reports) == ["spinal"] and reports["spinal"].group == "spinal"
    return reports["spinal"]


def _model(rng, labels, signal):
    logits = rng.normal(0, 1, (len(labels), 3))
    logits[np.arange(len(labels)), labels] += signal
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


@pytest.fixture
def oof_root(tmp_path):
    rng = np.random.default_rng(0)
    studies = 60
    labels = rng.choice(3, size=studies * 5, p=[0.7, 0.2, 0.1])
    folds = np.repeat(np.arange(studies) % 4, 5)
    write_csv_atomic(pd.DataFrame({"study_id": 1000 + np.arange(studies), "fold": np.arange(studies) % 4}),
                     tmp_path / "folds.csv")
    return tmp_path, rng, labels, folds


def test_informative_model_takes_the_weight_and_noise_is_named(oof_root):
    root, rng, labels, folds = oof_root
    _write_oof(root, "informative", labels, _model(rng, labels, 2.5), folds)
    _write_oof(root, "noise", labels, _model(rng, labels, 0.0), folds)
    report = _blend(root, calibration="none")  # the weights alone (a temperature can sharpen a little noise back in)
    weights = dict(zip(report.blend.backbones, report.blend.weights))
    assert weights["informative"] > 0.97 and report.near_zero == ["noise"]
    saved = json.loads((root / "oof" / "blend.json").read_text())
    assert list(saved["groups"]) == ["spinal"] and saved["folds"] == [0, 1, 2, 3]
    assert saved["groups"]["spinal"]["near_zero_weight"] == ["noise"]
    assert saved["groups"]["spinal"]["mode"] in ("probability", "log")
    assert len(read_oof(RunLayout(root), "blend", "spinal")) == len(labels)  # the blend's OOF, for the evaluation and report


def test_two_equally_good_independent_models_blend_better_than_either(oof_root):
    root, rng, labels, folds = oof_root
    _write_oof(root, "a", labels, _model(rng, labels, 1.5), folds)
    _write_oof(root, "b", labels, _model(rng, labels, 1.5), folds)
    report = _blend(root, calibration="temperature")
    assert report.in_sample < min(report.backbone_losses.values())
    assert report.nested < min(report.backbone_losses.values())
    assert all(0.25 < w < 0.75 for w in report.blend.weights)


def test_nested_estimate_never_below_in_sample(oof_root):
    root, rng, labels, folds = oof_root
    for name, signal in (("a", 1.0), ("b", 0.8), ("c", 0.5)):
        _write_oof(root, name, labels, _model(rng, labels, signal), folds)
    report = _blend(root)
    assert report.nested >= report.in_sample - 1e-9
    chosen = f"{report.blend.mode}, {report.blend.calibration}"
    assert len(report.candidates) == 6  # two modes, three calibrations
    assert report.candidates[chosen]["held_out"] == min(c["held_out"] for c in report.candidates.values())
    assert report.candidates[chosen]["held_out"] >= report.in_sample - 1e-9


def test_fast_loss_equals_the_metric_and_mixing_modes():
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"study_id": np.repeat(np.arange(20), 5), "condition": "spinal_canal_stenosis",
                          "severity": rng.choice([-1, 0, 1, 2], size=100, p=[0.05, 0.7, 0.15, 0.1])})
    probs = rng.dirichlet([1, 1, 1], size=100)
    assert FixedRowsScore(frame)(probs) == pytest.approx(_loss(frame, probs), rel=1e-9)
    a, b = rng.dirichlet([1, 1, 1], size=10), rng.dirichlet([1, 1, 1], size=10)
    np.testing.assert_allclose(combine([a, b], np.array([1.0, 0.0]), "probability"), a)
    np.testing.assert_allclose(combine([a, b], np.array([1.0, 0.0]), "log"), a, rtol=1e-6)
    geometric = np.sqrt(a * b) / np.sqrt(a * b).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(combine([a, b], np.array([0.5, 0.5]), "log"), geometric, rtol=1e-6)


def test_calibration_fitted_nested_mends_a_model_that_shies_from_severe(oof_root):
    """A model whose Severe probabilities are a third of what they should be: the full calibration (a
    scale per grade, the study-level Severe factor), fitted on other folds, lowers the nested loss, and
    the saved blend carries what it learned (the Severe scale well above one)."""
    root, rng, labels, folds = oof_root
    shy = _model(rng, labels, 2.0)
    shy[:, 2] /= 3
    shy /= shy.sum(axis=1, keepdims=True)
    _write_oof(root, "shy", labels, shy, folds)
    plain, full = _blend(root, calibration="none"), _blend(root, calibration="full")
    assert full.nested < plain.nested - 0.02, (full.nested, plain.nested)
    saved = json.loads((root / "oof" / "blend.json").read_text())["groups"]["spinal"]
    assert saved["calibration"] == "full" and saved["class_scale"][2] > 1.5 * saved["class_scale"][0]
    assert set(saved["nested_blends"]) == {"0", "1", "2", "3"}
    # the default chooses for itself, each fold without its rows: here a calibration pays on unseen folds
    auto = _blend(root)
    assert auto.blend.calibration != "none" and auto.nested < plain.nested - 0.02, (auto.nested, plain.nested)
    saved = json.loads((root / "oof" / "blend.json").read_text())["groups"]["spinal"]
    chosen = [b["calibration"] for b in saved["nested_blends"].values()]
    assert saved["calibration_asked"] == "auto" and chosen.count("none") <= 1, chosen


def test_auto_calibration_leaves_alone_a_model_already_calibrated(oof_root):
    """Labels drawn from known probabilities, and the model saying what minimises the metric's weighted
    loss (those probabilities times 1:2:4, renormalised): nothing to mend, so a fitted calibration can
    only follow noise; the default's nested loss is no worse than the full calibration's."""
    root, rng, _, folds = oof_root
    truth = rng.dirichlet([2, 1, 0.6], size=len(folds))
    labels = np.array([rng.choice(3, p=p) for p in truth])
    probs = truth * [1, 2, 4]
    _write_oof(root, "calibrated", labels, probs / probs.sum(axis=1, keepdims=True), folds)
    full, auto = _blend(root, calibration="full"), _blend(root)
    assert auto.nested <= full.nested + 1e-9


def test_the_severe_factor_moves_only_each_studys_highest_severe_row():
    from spinegrade.blend import boost_highest_severe

    p = np.array([[0.7, 0.2, 0.1], [0.5, 0.2, 0.3], [0.8, 0.1, 0.1], [0.6, 0.1, 0.3]])
    studies = np.array([1, 1, 2, 2])
    out = boost_highest_severe(p, studies, 1.5)
    np.testing.assert_allclose(out[[0, 2]], p[[0, 2]])  # not the study's highest Severe: untouched
    np.testing.assert_allclose(out[[1, 3], 2], [0.45, 0.45])
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    np.testing.assert_allclose(out[1, :2] / out[1, :2].sum(), p[1, :2] / p[1, :2].sum())  # the rest keeps its shape
