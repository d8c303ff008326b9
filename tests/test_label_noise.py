"""The suspect-label list finds the generator's wrong labels, read by a model that never saw them."""

from __future__ import annotations

import numpy as np
import pandas as pd

from spinegrade import oracle
from spinegrade.constants import CONDITIONS, LEVELS, PROBABILITY_COLUMNS, SEVERITIES
from spinegrade.data.grade_model import TARGETS
from spinegrade.data.synthetic import SynthSettings, grade_records
from spinegrade.label_noise import disagreement, recall_of


def test_the_top_of_the_list_holds_most_wrong_grades():
    """The oracle (a reader of each image's narrowing, out of fold) stands in for a trained model: the
    labels it disagrees with most, in the metric's terms, are the wrong ones far beyond chance."""
    rows, wrong = [], []
    for study_id, grades in grade_records(SynthSettings(studies=800, test_studies=0, seed=4)):
        for t, target in enumerate(TARGETS):
            condition, level = target[: -len(LEVELS[0]) - 1], target[-len(LEVELS[0]):]
            rows.append((study_id, condition, level, float(grades.image_narrowing[t]), int(grades.labels[t])))
            if grades.wrong[t]:
                wrong.append((study_id, condition, level, grades.wrong[t], SEVERITIES[grades.drawn[t]],
                              SEVERITIES[grades.labels[t]]))
    frame = pd.DataFrame(rows, columns=["study_id", "condition", "level", "image_narrowing", "severity"])
    studies = frame["study_id"].unique()
    folds = pd.DataFrame({"study_id": studies, "fold": np.arange(len(studies)) % 4})
    ranked = disagreement(oracle.oracle_oof(frame, folds))
    assert set(ranked["condition"]) == set(CONDITIONS) and (ranked[list(PROBABILITY_COLUMNS)].sum(axis=1) - 1).abs().max() < 1e-6
    assert ranked["disagreement"].is_monotonic_decreasing
    found = recall_of(ranked.reset_index(drop=True),
                      pd.DataFrame(wrong, columns=["study_id", "condition", "level", "kind", "drawn_grade", "label"]))
    assert found["grade, two steps"]["recall"] > 0.8, found
    assert found["all"]["recall"] > 4 * found["random_recall"], found
    for kind in ("grade, one step", "side", "level"):
        assert found[kind]["recall"] > 2 * found["random_recall"], found
