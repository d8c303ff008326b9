"""Data-parallel training: two real processes (gloo, CPU) against one, sharding, and the SLURM scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from spinegrade.distributed import World
from spinegrade.layout import RunLayout
from spinegrade.train import EpochSampler

ROOT = Path(__file__).resolve().parents[1]


def fold_dir(out, name, fold):
    return RunLayout(out).fold_dir(name, "spinal", fold)

# No batch norm (ConvNeXt uses LayerNorm), no dropout, unweighted loss: then two processes with 8
# samples each must take exactly the steps one process takes with 16, so any sharding, gathering or
# gradient-averaging mistake shows as a difference.
EXACT = """name: ddp_check
backbone: convnext_atto
pretrained: false
input: crop
image_size: 64
batch_size: 16
num_epochs: 2
learning_rate: 0.001
dropout: 0.0
class_weights: none
num_workers: 0
"""


def test_shards_are_disjoint_cover_everything_and_equal_in_length():
    n = 103
    shards = [list(EpochSampler(n, seed=1, shuffle=True, world=World(r, 4)).__iter__()) for r in range(4)]
    assert len({len(s) for s in shards}) == 1 == len({len(EpochSampler(n, 1, True, World(r, 4))) for r in range(4)})
    together = [i for s in shards for i in s]
    assert set(together) == set(EpochSampler(n, seed=1, shuffle=True).__iter__())
    assert len(together) - len(set(together)) == 4 * 26 - n  # only the padding repeats
    # A step of the world is a step of one process: shard k of each batch of 4 is rank k's sample.
    single = list(EpochSampler(n, seed=1, shuffle=True).__iter__())
    assert [shards[r][0] for r in range(4)] == single[:4]


def _train(data, folds, out, *extra):
    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / "ddp_check.yaml"
    config.write_text(EXACT)
    command = [sys.executable, "-m", "spinegrade.cli", "train", "--models", str(config), "--fold", "1", "--data-dir",
               str(data), "--folds", str(folds), "--output-dir", str(out), "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_with_two_processes_matches_one_process(trained_run, tmp_path):
    data, folds = trained_run["data"], trained_run["folds"]
    _train(data, folds, tmp_path / "one" / "out")
    two = _train(data, folds, tmp_path / "two" / "out", "--devices", "2", "--strategy", "ddp")
    # The command logs on stderr.
    assert "DDP: 2 processes, 8 samples each per step (cpu)" in two.stderr
    assert two.stderr.count("ddp_check spinal fold 1: kept epoch") == 1  # rank 0 alone logs
    a = pd.read_csv(fold_dir(tmp_path / "one" / "out", "ddp_check", 1) / "metrics.csv")
    b = pd.read_csv(fold_dir(tmp_path / "two" / "out", "ddp_check", 1) / "metrics.csv")
    cols = ["train_loss", "val_loss", "val_accuracy", "val_competition"]
    pd.testing.assert_frame_equal(a[cols], b[cols], atol=2e-3, rtol=1e-3)
    oof_a = pd.read_csv(tmp_path / "one" / "out" / "oof" / "ddp_check" / "spinal" / "fold1.csv")
    oof_b = pd.read_csv(tmp_path / "two" / "out" / "oof" / "ddp_check" / "spinal" / "fold1.csv")
    assert list(oof_a["row_id"]) == list(oof_b["row_id"])  # every held-out sample once, gathered from both shards


def _main(args: list[str]) -> int:
    """The command in this process; the log handlers it sets up go when it returns, as with its own process
    (its console handler writes to this test's captured stderr, closed once the test ends)."""
    import logging

    from spinegrade.cli import main

    logger = logging.getLogger("spinegrade")
    before = set(logger.handlers)
    try:
        return main(args)
    finally:
        for handler in [h for h in logger.handlers if h not in before]:
            logger.removeHandler(handler)
            handler.close()


def test_several_machines_need_a_launcher(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --output-dir, where the command's log file goes
    code = _main(["train", "--models", "efficientnet_lite0", "--fold", "0", "--data-dir", str(trained_run["data"]),
                  "--folds", str(trained_run["folds"]), "--output-dir", str(tmp_path), "--num_nodes", "2", "--devices", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "torchrun or srun" in err[0]
    assert _main(["train", "--models", "efficientnet_lite0", "--strategy", "fsdp"]) == 2


@pytest.mark.parametrize("script", sorted((ROOT / "scripts" / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_slurm_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_slurm_array_maps_each_task_to_one_backbone_and_fold():
    seen = set()
    for task in range(12):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "BACKBONES": "vit swin beit", "N_FOLDS": "4",
               "DRY_RUN": "1"}
        result = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "train_array.sbatch")], env=env,
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        line = result.stdout.strip().splitlines()[-1]
        assert "spinegrade train --models" in line and "--resume" in line
        words = line.split()
        seen.add((words[words.index("--models") + 1], words[words.index("--fold") + 1]))
    assert seen == {(b, str(f)) for b in ("vit", "swin", "beit") for f in range(4)}
