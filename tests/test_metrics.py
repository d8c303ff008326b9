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


def _random_frame(seed: int) -> "pd.DataFrame":
    """Rows of every condition for 12 studies, random grades (some unlabelled) and probabilities."""
    import numpy as np
    import pandas as pd

    from spinegrade.constants import CONDITIONS, LEVELS

    rng = np.random.default_rng(seed)
    rows = [(s, c, lv) for s in range(100, 112) for c in CONDITIONS for lv in LEVELS]
    frame = pd.DataFrame(rows, columns=["study_id", "condition", "level"]).sample(frac=1, random_state=seed)
    frame["severity"] = rng.choice([-1, 0, 0, 0, 1, 2], size=len(frame))
    p = rng.dirichlet([1, 1, 1], size=len(frame))
    frame[["normal_mild", "moderate", "severe"]] = p
    return frame.reset_index(drop=True)


def test_fixed_rows_score_is_the_metric_on_every_group_and_any_severe():
    from spinegrade.constants import GROUPS
    from spinegrade.metrics import FixedRowsScore, competition_score

    frame = _random_frame(0)
    probs = frame[["normal_mild", "moderate", "severe"]].to_numpy()
    scores = competition_score(frame)
    assert set(scores) == {*GROUPS, "any_severe_spinal", "score"}
    assert abs(FixedRowsScore(frame)(probs) - scores["score"]) < 1e-12
    for group, spec in GROUPS.items():  # each group alone, and any_severe_spinal with the spinal rows
        rows = frame[frame["condition"].isin(spec.conditions)].reset_index(drop=True)
        p = rows[["normal_mild", "moderate", "severe"]].to_numpy()
        alone = competition_score(rows)
        assert abs(FixedRowsScore(rows)(p) - alone["score"]) < 1e-12
        if spec.any_severe_term:
            assert abs(alone["score"] - (alone[group] + alone[spec.any_severe_term]) / 2) < 1e-12
    other = _random_frame(1)[["normal_mild", "moderate", "severe"]].to_numpy() * 3  # unnormalised rows too
    frame2 = frame.copy()
    frame2[["normal_mild", "moderate", "severe"]] = other
    assert abs(FixedRowsScore(frame)(other) - competition_score(frame2)["score"]) < 1e-12


def test_study_bootstrap_brackets_the_figure_and_narrows_with_more_studies():
    from spinegrade.metrics import study_bootstrap

    rng = np.random.default_rng(0)

    def frame(studies: int) -> pd.DataFrame:
        rows = []
        for s in range(studies):
            for level in range(5):
                y = int(rng.choice(3, p=[0.8, 0.12, 0.08]))
                p = np.full(3, 0.15)
                p[y] += 0.55 if rng.random() < 0.7 else 0.0
                rows.append({"study_id": s, "condition": "spinal_canal_stenosis", "severity": y,
                             **dict(zip(("normal_mild", "moderate", "severe"), p / p.sum()))})
        return pd.DataFrame(rows)

    small, large = frame(20), frame(400)
    for data in (small, large):
        point, interval = competition_score(data), study_bootstrap(data, resamples=300)
        assert all(interval[t][0] <= point[t] <= interval[t][1] for t in point), (point, interval)
    width = {n: study_bootstrap(d, resamples=300)["spinal"] for n, d in (("small", small), ("large", large))}
    assert width["large"][1] - width["large"][0] < 0.5 * (width["small"][1] - width["small"][0])
