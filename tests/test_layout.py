"""The run layout: every stage's paths from one object; a run written before condition groups
(tests/fixtures/run-v0.1, made by that version) is still read in its layout, and its models, which say
nothing of the inputs they were fed, are refused by prediction and by the kernel's build."""

from __future__ import annotations

import shutil
from pathlib import Path

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


def test_an_old_run_is_refused_by_prediction_naming_its_fold_and_why(legacy, tmp_path):
    """Its models say nothing of the inputs they were fed (saved before ``preprocess_version`` and
    ``locator_input_version`` were recorded), and this code turns and orders slices otherwise: refused
    in one line, never graded without a word."""
    import subprocess
    import sys

    from spinegrade.blend import load_blends

    assert list(load_blends(legacy / "run")) == ["spinal"]  # blend.json without `groups` is still read
    result = subprocess.run([sys.executable, "-m", "spinegrade.cli", "predict", "--data-dir", str(legacy / "data"),
                             "--split", "test", "--output-dir", str(legacy / "run"), "--out", str(tmp_path / "s.csv")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "saved before its inputs' version" in result.stderr and "train it again" in result.stderr
    assert "fold0" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s.csv").exists()


def test_an_old_run_builds_no_kernel(legacy, tmp_path):
    from spinegrade.errors import SpinegradeError
    from spinegrade.kernel.build import build_kernel

    with pytest.raises(SpinegradeError, match=r"tiny.fold0: saved before its inputs' version \(preprocess_version\)"):
        build_kernel(legacy / "run", tmp_path / "kernels", username="tester", offline=True)
