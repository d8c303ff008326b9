"""Settings precedence: dataclass defaults < the registry's group defaults < the YAML's top level <
its ``groups:`` section < flags; configs from before condition groups; configs found in any install."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spinegrade.config import TrainConfig, load_config
from spinegrade.constants import GROUPS
from spinegrade.errors import SpinegradeError


def _yaml(tmp_path, text: str):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return path


def test_each_level_overrides_the_one_below(tmp_path):
    defaults = TrainConfig()
    assert GROUPS["foraminal"].crop_mm != defaults.crop_mm and GROUPS["foraminal"].input != defaults.input
    bare = _yaml(tmp_path, "backbone: resnet18\n")
    foraminal = load_config(str(bare), group="foraminal")
    assert (foraminal.input, foraminal.crop_mm) == (GROUPS["foraminal"].input, GROUPS["foraminal"].crop_mm)  # registry
    assert foraminal.batch_size == defaults.batch_size  # dataclass, where nothing else speaks
    top = _yaml(tmp_path, "backbone: resnet18\ncrop_mm: 50\n")
    assert load_config(str(top), group="foraminal").crop_mm == 50  # YAML top level over registry
    section = _yaml(tmp_path, "backbone: resnet18\ncrop_mm: 50\ngroups:\n  foraminal: {crop_mm: 44, image_size: 96}\n")
    assert load_config(str(section), group="foraminal").crop_mm == 44  # groups section over top level
    assert load_config(str(section), group="foraminal").image_size == 96
    assert load_config(str(section), group="spinal").crop_mm == 50  # another group's section does not apply
    flagged = load_config(str(section), {"crop_mm": 36.0, "image_size": None}, group="foraminal")
    assert flagged.crop_mm == 36 and flagged.image_size == 96  # flags over everything; None: not given
    assert flagged.group == "foraminal" and flagged.name == "mine"


def test_a_config_from_before_groups_reads_as_the_spinal_group(tmp_path):
    old = _yaml(tmp_path, "backbone: resnet18\ncondition: spinal_canal_stenosis\n")
    assert load_config(str(old)).group == "spinal"
    assert "condition" not in load_config(str(old)).to_dict()


def test_unknown_groups_are_refused_with_the_file_named(tmp_path):
    bad = _yaml(tmp_path, "backbone: resnet18\ngroups:\n  foramenal: {crop_mm: 40}\n")
    with pytest.raises(SpinegradeError, match=r"mine\.yaml: unknown group\(s\) under `groups:` foramenal"):
        load_config(str(bad))
    with pytest.raises(SpinegradeError, match="group must be one of spinal, foraminal, subarticular"):
        load_config(str(_yaml(tmp_path, "backbone: resnet18\n")), group="lateral")


def test_a_non_editable_install_finds_the_shipped_configs_and_trains(synth_dataset, tmp_path):
    """``pip install .`` (not editable) into a folder of its own: run from anywhere, the published configs
    are found inside the package, and one epoch of one fold trains."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", str(site), str(repo)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    assert (site / "spinegrade" / "configs" / "resnet18.yaml").is_file()  # a copy, not a link back to the checkout
    assert not (site / "spinegrade" / "configs").is_symlink()
    folds = tmp_path / "folds.csv"
    from spinegrade.data.folds import make_folds, write_csv_atomic
    from spinegrade.data.index import build_index

    write_csv_atomic(make_folds(build_index(synth_dataset, check_images=False).labels_wide(), n_folds=2, seed=0), folds)
    elsewhere = tmp_path / "elsewhere"  # no configs/ here: only the package's copies can answer
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    trained = subprocess.run([sys.executable, "-c", "import spinegrade, sys; print(spinegrade.__file__); "
                              "from spinegrade.cli import main; sys.exit(main())", "train", "--models", "resnet18",
                              "--fold", "0", "--data-dir", str(synth_dataset), "--folds", str(folds), "--output-dir",
                              str(tmp_path / "out"), "--num_epochs", "1", "--pretrained", "false", "--image_size", "64",
                              "--device", "cpu"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert trained.stdout.startswith(str(site))  # the installed copy ran, not the checkout
    assert (tmp_path / "out" / "trained_models" / "resnet18" / "spinal" / "fold0" / "done.json").is_file()


def test_test_time_flip_is_refused_where_a_flip_changes_the_grade_or_never_trained():
    assert GROUPS["foraminal"].test_time_flip and not GROUPS["spinal"].test_time_flip
    assert load_config("efficientnet_lite0", group="foraminal").test_time_flip  # the registry's default flows
    assert not load_config("efficientnet_lite0", {"test_time_flip": "false"}, group="foraminal").test_time_flip
    assert load_config("efficientnet_lite0", {"test_time_flip": "true"}, group="spinal").test_time_flip
    with pytest.raises(SpinegradeError, match="test_time_flip needs .*subarticular: flip_probability 0.0"):
        load_config("efficientnet_lite0", {"test_time_flip": True}, group="subarticular")  # turned crops: no flips


def test_a_whole_axial_slice_is_refused_for_the_recesses_in_one_line(tmp_path):
    """Both recesses on one whole slice: the model would get the same image for the left and the right."""
    import subprocess
    import sys

    with pytest.raises(SpinegradeError, match="could not tell left from right: use input: crop"):
        load_config("efficientnet_lite0", {"input": "full"}, group="subarticular")
    assert load_config("efficientnet_lite0", {"input": "full"}, group="foraminal").input == "full"  # a side's own slice
    result = subprocess.run([sys.executable, "-m", "spinegrade.cli", "train", "--models", "efficientnet_lite0",
                             "--conditions", "subarticular", "--input", "full", "--data_dir", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "could not tell left from right" in result.stderr
