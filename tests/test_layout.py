"""The run layout: every stage's paths from one object, and runs written before condition groups
(tests/fixtures/run-v0.1, made by that version) still predict the same submission and build a kernel."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinegrade.data.synthetic import SynthSettings, write_dataset
from spinegrade.layout import RunLayout

LEGACY = Path(__file__).parent / "fixtures" / "run-v0.1"


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """A copy of the old run beside synthetic data of the seed it was trained on (spines straight and
    centred, as the generator drew them then; the grades are today's draws: see the fixture's README)."""
    root = tmp_path_factory.mktemp("legacy")
    write_dataset(root / "data", SynthSettings(studies=8, test_studies=2, seed=3, image_size=(64, 80), straight=True))
    shutil.copytree(LEGACY, root / "run")
    return root


def test_layout_reads_an_old_run_as_the_spinal_group(legacy):
    layout = RunLayout(legacy / "run")
    assert layout.backbones() == ["tiny"]
    assert layout.groups_of("tiny") == ["spinal"]
    assert layout.model_dir("tiny", "spinal") == layout.trained_models / "tiny"  # the old place
    assert layout.model_dir("tiny", "spinal", existing=False) == layout.trained_models / "tiny" / "spinal"
    assert layout.model_dir("tiny", "foraminal") == layout.trained_models / "tiny" / "foraminal"  # nothing there
    assert layout.locator_dir("spinal") == layout.trained_models / "localizer"
    assert [p.name for p in layout.finished_fold_dirs("tiny", "spinal")] == ["fold0", "fold1"]


def test_an_old_run_predicts_the_submission_it_predicted_then(legacy, tmp_path):
    from spinegrade.blend import load_blends
    from spinegrade.submit import predict_split

    assert list(load_blends(legacy / "run")) == ["spinal"]  # blend.json without `groups`
    predict_split(legacy / "data", "test", legacy / "run", out=tmp_path / "s.csv", predictions_dir=tmp_path)
    submission = pd.read_csv(tmp_path / "s.csv")  # as written: in sample_submission.csv's order
    expected = pd.read_csv(LEGACY / "expected_test_submission.csv")
    assert list(submission["row_id"]) == list(expected["row_id"])
    # 5e-5: prediction now makes its crops as training's cache does, through the point's patient-space
    # position (a round trip of ~1e-13 pixels, which can move OpenCV's fixed-point interpolation by a step),
    # and the generator's foramina and recesses sit where the real labels put them, which touches a few
    # pixels at the rim of the canal slice's crop.
    np.testing.assert_allclose(submission.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:].to_numpy(), atol=5e-5)
    spinal = submission["row_id"].str.contains("spinal_canal")
    assert spinal.sum() == 10  # 2 studies x 5 levels came from the old models, not the prior


def test_an_old_run_builds_a_kernel_in_todays_layout(legacy, tmp_path):
    from spinegrade.kernel.build import build_kernel

    build = build_kernel(legacy / "run", tmp_path / "kernels", username="tester", offline=True)
    models = RunLayout(build.models_dir)
    assert sorted(p.name for p in models.finished_fold_dirs("tiny", "spinal")) == ["fold0", "fold1"]
    assert (models.trained_models / "tiny" / "spinal" / "fold0" / "best.safetensors").is_file()
    assert (models.trained_models / "localizer" / "spinal" / "slice_choice.json").is_file()
