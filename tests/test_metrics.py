"""The competition metric against hand-computed values, and against the real labels' reference figures."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from spinegrade.data.index import build_index
from spinegrade.metrics import any_severe_log_loss, competition_score, weighted_log_loss, weighted_prior


def test_weights_and_row_normalisation():
    labels = np.array([1, 0])
    probs = np.array([[1.0, 2.0, 1.0], [0.5, 0.25, 0.25]])  # the first row sums to 4: normalised first
    # Both rows put 0.5 on their true grade: the weighted mean is ln 2 whatever the weights.
    assert weighted_log_loss(labels, probs) == pytest.approx(math.log(2))
    probs = np.array([[0.25, 0.5, 0.25], [0.25, 0.5, 0.25]])
    expected = (2 * -math.log(0.5) + 1 * -math.log(0.25)) / 3
    assert weighted_log_loss(labels, probs) == pytest.approx(expected)


def test_any_severe_spinal_by_hand():
    study = np.array([1, 1, 2, 2])
    labels = np.array([0, 2, 0, 1])
    probs = np.array([[0.9, 0.0, 0.1], [0.3, 0.3, 0.4], [0.8, 0.0, 0.2], [0.5, 0.2, 0.3]])
    # Study 1: severe present, p = 0.4, weight 4. Study 2: none, p = 0.3, weight 2 (a moderate row).
    expected = (4 * -math.log(0.4) + 2 * -math.log(0.7)) / 6
    assert any_severe_log_loss(study, labels, probs) == pytest.approx(expected)


def test_unlabelled_rows_not_scored_and_inputs_untouched():
    frame = pd.DataFrame({
        "study_id": [1, 1, 1], "condition": ["spinal_canal_stenosis"] * 3, "severity": [0, -1, 2],
        "normal_mild": [0.5, 0.0, 0.2], "moderate": [0.25, 0.0, 0.3], "severe": [0.25, 1.0, 0.5],
    })
    before = frame.copy()
    scores = competition_score(frame)
    pd.testing.assert_frame_equal(frame, before)
    assert set(scores) == {"spinal", "any_severe_spinal", "score"}  # a spinal-only frame: its terms only
    assert scores["spinal"] == pytest.approx((1 * -math.log(0.5) + 4 * -math.log(0.5)) / 5)
    assert scores["any_severe_spinal"] == pytest.approx(-math.log(0.5))
    assert scores["score"] == pytest.approx((scores["spinal"] + scores["any_severe_spinal"]) / 2)


def test_weighted_prior_is_the_best_constant():
    labels = np.array([0] * 80 + [1] * 15 + [2] * 5)
    prior = weighted_prior(labels, pseudo_count=0)
    np.testing.assert_allclose(prior, np.array([80, 30, 20]) / 130)
    best = weighted_log_loss(labels, np.tile(prior, (100, 1)))
    for other in ([0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.6, 0.25, 0.15]):
        assert weighted_log_loss(labels, np.tile(other, (100, 1))) > best


def test_reference_figures_on_the_real_labels(real_metadata):
    table = build_index(real_metadata, check_images=False).table
    uniform = table.assign(normal_mild=1 / 3, moderate=1 / 3, severe=1 / 3)
    assert competition_score(uniform)["score"] == pytest.approx(0.999, abs=0.0005)
    prior = table.copy()
    for _, rows in table.groupby(["condition", "level"]):
        prior.loc[rows.index, ["normal_mild", "moderate", "severe"]] = weighted_prior(rows["severity"].to_numpy())
    assert competition_score(prior)["score"] == pytest.approx(0.790, abs=0.0005)
