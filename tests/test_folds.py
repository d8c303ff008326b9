"""Patient-grouped stratified folds: disjoint, stable, balanced."""

from __future__ import annotations

import numpy as np
import pandas as pd

from spinegrade.cli import main
from spinegrade.data.folds import make_folds, read_folds
from spinegrade.data.index import build_index


def test_folds_cli_on_synthetic_data(synth_dataset, tmp_path):
    out = tmp_path / "folds.csv"
    assert main(["folds", "--data-dir", str(synth_dataset), "--n-folds", "4", "--out", str(out)]) == 0
    folds = read_folds(out)
    train = pd.read_csv(synth_dataset / "train.csv")
    assert sorted(folds["study_id"]) == sorted(train["study_id"])  # every study exactly once
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3]
    assert folds.groupby("fold").size().between(3, 5).all()
    again = tmp_path / "again.csv"
    main(["folds", "--data-dir", str(synth_dataset), "--n-folds", "4", "--out", str(again)])
    assert out.read_bytes() == again.read_bytes()


def test_real_labels_folds_are_balanced(real_metadata):
    labels = build_index(real_metadata, check_images=False).labels_wide()
    folds = make_folds(labels, n_folds=5, seed=42)
    assert folds["study_id"].is_unique and len(folds) == 1975
    sizes = folds.groupby("fold").size()
    assert sizes.max() - sizes.min() <= 0.05 * sizes.mean()  # iterative stratification trades size for balance
    merged = folds.set_index("study_id").join(labels)
    overall = (labels.to_numpy() == 2).mean()
    for _, group in merged.groupby("fold"):
        severe = (group.drop(columns="fold").to_numpy() == 2).mean()
        assert abs(severe - overall) < 0.006
        spinal = group[[c for c in labels.columns if c.startswith("spinal")]].to_numpy()
        assert abs((spinal == 2).mean() - (labels.filter(like="spinal").to_numpy() == 2).mean()) < 0.01
    assert np.array_equal(folds, make_folds(labels, n_folds=5, seed=42))
