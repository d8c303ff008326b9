"""An output asked for whose package is not installed (W&B curves, evidence maps, structured reports):
one line naming the package, before any work is done, and no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCKED = """
import sys
class Block:
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == {module!r}:
            raise ImportError("No module named " + repr(name))
sys.meta_path.insert(0, Block())
from spinegrade.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("module, package, command", [
    ("wandb", "wandb", ["train", "--models", "efficientnet_lite0", "--wandb"]),
    ("wandb", "wandb", ["train-localizer", "--wandb"]),
    ("pytorch_grad_cam", "grad-cam", ["predict", "STUDY"]),
    ("highdicom", "highdicom", ["predict", "--split", "test", "--sr"]),
])
def test_an_output_without_its_package_is_one_line_naming_it(synth_dataset, tmp_path, module, package, command):
    study = next((synth_dataset / "test_images").iterdir())
    out = tmp_path / "run"
    argv = [str(study) if c == "STUDY" else c for c in command] + ["--output-dir", str(out)]
    if command[0] != "predict" or "--split" in command:
        argv += ["--data-dir", str(synth_dataset)]
    if command[0] == "train":
        argv += ["--folds", str(tmp_path / "folds.csv")]
    done = subprocess.run([sys.executable, "-c", BLOCKED.format(module=module, argv=argv)], capture_output=True,
                          text=True, timeout=300)
    said = [line for line in (done.stdout + done.stderr).splitlines() if "error" in line]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(said) == 1 and f"the {package} package: pip install {package}" in said[0], said
    # nothing was done first: no model trained, no prediction, no study page beside the study
    assert not (out / "trained_models").exists() and not (out / "predictions").exists()
    assert not (study.parent / f"{study.name}-spinegrade").exists()
