"""One fold's training loop, written once for every model spinegrade trains: the grading models
(``train.py``) and the slice locators (``slice_locator_training.py``).

What a fold folder holds and how it lives is the same for both: ``last.pt`` after every epoch
(model, optimiser, learning-rate schedule and progress; tensors and plain values only, loaded with
``weights_only=True``), ``metrics.csv`` (one row per epoch), the kept epoch's weights
(``best.safetensors``, written by the caller's ``on_best``: the last epoch by default, see :func:`fit`),
and ``done.json`` once finished. A
fold killed at any instant resumes with ``resume=True`` where it stopped and ends where an
uninterrupted run ends: the epoch's sample order comes from (seed, epoch) (:class:`EpochSampler`),
each sample's augmentation from (seed, epoch, sample) (:class:`SeededDataset`) and dropout from
(seed, epoch), so nothing depends on what ran before in the process. A finished fold with the same
settings is never trained again.

What differs between models is one epoch (a function of the epoch number that trains, evaluates
and returns the epoch's metrics row and its score, lower is better) and what the kept epoch
leaves (``on_best``).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Sampler

from spinegrade.config import EPOCH_CHOICES
from spinegrade.data.folds import write_csv_atomic
from spinegrade.distributed import SINGLE, World
from spinegrade.errors import SpinegradeError
from spinegrade.files import write_text_atomic
from spinegrade.logs import get_logger

log = get_logger(__name__)


class EpochSampler(Sampler[int]):
    """Shuffles with a permutation drawn from (seed, epoch), so an epoch is the same whether it runs
    first or after a ``--resume``; it hands the dataset ``epoch * n + index`` so that augmentation
    can be seeded per (epoch, sample) whatever worker draws it. Under DDP each process takes its
    shard of the same permutation, so the processes together see exactly a single process's epoch."""

    def __init__(self, n: int, seed: int, shuffle: bool, world: World = SINGLE):
        self.n, self.seed, self.shuffle, self.epoch, self.world = n, seed, shuffle, 0, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n) if self.shuffle else np.arange(self.n)
        return iter(self.world.shard((self.epoch * self.n + order).tolist()))

    def __len__(self) -> int:
        return len(self.world.shard(list(range(self.n))))


class SeededDataset(torch.utils.data.Dataset):
    """Decodes the sampler's ``epoch * n + i`` and seeds the augmentation from (seed, epoch, sample).
    ``dataset`` has a ``set_seed(seed)`` that seeds every random draw of its next sample."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, encoded: int) -> dict:
        epoch, i = divmod(int(encoded), len(self.dataset))
        self.dataset.set_seed(hash((self.seed, epoch, i)) % (2**31))
        return self.dataset[i]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A training checkpoint, read with ``weights_only``: tensors and plain values only, so a crafted
    file can never run code here; anything else is refused with its path."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise SpinegradeError(f"{path}: not a plain training checkpoint, refused ({type(exc).__name__}); "
                              "delete it, or use --force to start this fold over") from None


def continues(saved: dict | None, wanted: dict) -> bool:
    """Whether a run saved with ``saved`` settings may be continued as one with ``wanted``: the same
    settings, or the same with more epochs (fewer would mix a longer run's weights into a shorter one)."""
    saved = dict(saved or {})
    # A one-cycle schedule is laid over the whole run: a longer run anneals differently from the first step.
    if saved.get("num_epochs", math.inf) <= wanted["num_epochs"] and saved.get("lr_schedule") != "onecycle":
        saved["num_epochs"] = wanted["num_epochs"]
    return saved == wanted


def labels_digest(*tables: pd.DataFrame) -> str:
    """A short digest of what a fold learns from (its labels, points and folds: the tables' rows, in
    any order), part of its identity: a corrected label file trains the folds it touches again."""
    digest = hashlib.sha256()
    for table in tables:
        digest.update(table.astype(str).sort_values(list(table.columns)).to_csv(index=False).encode())
    return digest.hexdigest()[:16]


def plain(settings: dict) -> dict:
    """Settings as JSON would give them back (tuples as lists), so saved and wanted compare equal."""
    return json.loads(json.dumps(settings))


@dataclass
class FoldProgress:
    """Where a fold stands: the next epoch to run, the epoch kept so far (``kept_*``: whose weights and
    held-out predictions the fold leaves), the held-out best so far (``best_*``: an optimistic figure,
    chosen on the fold it scores), one metrics row per epoch run."""

    start_epoch: int = 0
    best_score: float = math.inf
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)
    kept_score: float = math.inf
    kept_epoch: int = -1


@dataclass
class FoldFolder:
    """A fold's folder and the settings (``identity``) that make its result what it is."""

    out: Path
    identity: dict
    label: str  # how messages name the fold: "lite0 spinal fold 0"
    # Each setting's default: a fold saved before a setting existed trained with its default, so it reads
    # as saved with it (a run finished before ``slices`` existed is still finished, not retrained).
    defaults: dict = field(default_factory=dict)
    # Settings with no default (the inputs' version, the labels' digest): a fold saved without them is
    # refused, never retrained without a word (on real data a fold is GPU-hours).
    required: tuple[str, ...] = ()

    def saved_settings(self, saved: dict | None) -> dict:
        """``saved`` with the settings added since it was written filled in with their defaults."""
        return {**{k: v for k, v in self.defaults.items() if k in self.identity}, **(saved or {})}

    @property
    def done(self) -> Path:
        return self.out / "done.json"

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    def finished(self, force: bool, resume: bool, say=log.info) -> tuple[dict | None, bool]:
        """(what done.json says, when the fold is finished with these settings and not forced;
        whether to resume). A fold finished with other settings is continued only to train it
        longer; other settings start over."""
        if force or not self.done.is_file():
            return None, resume and not force
        info = json.loads(self.done.read_text())
        saved = self.saved_settings(info.get("config"))
        missing = [k for k in self.required if k not in saved]
        if missing:
            raise SpinegradeError(f"{self.out}: {self.label} was saved before {' and '.join(missing)} were recorded, so "
                                  "this code cannot tell what it was trained on; train it again with --force")
        if saved == self.identity:
            say(f"{self.label}: already trained (best epoch {info['best_epoch'] + 1}, "
                f"loss {info['best_score']:.4f}); use --force to retrain")
            return info, resume
        changed = sorted(k for k in self.identity.keys() | saved.keys() if saved.get(k) != self.identity.get(k))
        say(f"{self.label}: trained before with other settings ({', '.join(changed)}); training again")
        return None, resume and continues(saved, self.identity)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule, device: torch.device,
                say=log.info) -> FoldProgress:
        """The progress ``last.pt`` holds, loaded into the model, optimiser and schedule."""
        if not self.last.is_file():
            say(f"no checkpoint in {self.out}; starting from the first epoch")
            return FoldProgress()
        state = load_checkpoint(self.last, device)
        saved = self.saved_settings(state.get("config"))
        if not continues(saved, self.identity):
            changed = sorted(k for k in self.identity.keys() | saved.keys() if saved.get(k) != self.identity.get(k))
            raise SpinegradeError(f"{self.last}: saved by a run with other settings ({', '.join(changed)}); resume with "
                                  "the same settings, or use --force to start this fold over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if schedule is not None and state.get("schedule") is not None:
            schedule.load_state_dict(state["schedule"])
        start = int(state["epoch"]) + 1
        history = []
        if (self.out / "metrics.csv").is_file():
            history = pd.read_csv(self.out / "metrics.csv").query("epoch < @start").to_dict("records")
        progress = FoldProgress(start, float(state["best_score"]), int(state["best_epoch"]), history,
                                float(state.get("kept_score", state["best_score"])),
                                int(state.get("kept_epoch", state["best_epoch"])))
        say(f"resumed after epoch {start - 1} (best so far: epoch {progress.best_epoch}, loss {progress.best_score:.4f})")
        return progress

    def save(self, progress: FoldProgress, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             schedule) -> None:
        write_csv_atomic(pd.DataFrame(progress.history), self.out / "metrics.csv")
        state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "schedule": schedule.state_dict() if schedule is not None else None,
                 "best_score": progress.best_score, "best_epoch": progress.best_epoch,
                 "kept_score": progress.kept_score, "kept_epoch": progress.kept_epoch, "config": self.identity}
        tmp = self.last.with_name(f".{self.last.name}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.last)

    def finish(self, progress: FoldProgress, **extra) -> None:
        """Written last: its presence marks a finished fold."""
        write_text_atomic(self.done, json.dumps({"kept_epoch": progress.kept_epoch, "kept_score": progress.kept_score,
                                                 "best_epoch": progress.best_epoch, "best_score": progress.best_score,
                                                 **extra, "config": self.identity}, indent=1))


def fit(folder: FoldFolder, num_epochs: int, seed: int, model: nn.Module, optimizer: torch.optim.Optimizer,
        one_epoch: Callable[[int], tuple[dict, float]], on_best: Callable[[int], None], describe: Callable[[dict], str],
        device: torch.device, schedule=None, resume: bool = False, world: World = SINGLE, say=log.info,
        wandb_run: dict | None = None, epoch_choice: str = "last") -> FoldProgress:
    """Epochs from where the fold stands to ``num_epochs``. ``one_epoch(epoch)`` trains and evaluates
    and returns (metrics row, held-out score); ``on_best(epoch)`` keeps what the kept epoch leaves
    (called on the main process only); ``describe(row)`` is the epoch's log line; ``wandb_run`` (name,
    group, config), when given, also sends the curves to Weights & Biases. Only the main process writes.

    ``epoch_choice`` (``EPOCH_CHOICES``): which epoch the fold keeps. ``last``, a fixed schedule: the
    held-out fold chooses nothing, so its score is an out-of-fold estimate. ``held_out_best``: the epoch
    that scores best on the held-out fold, whose score is then optimistic (chosen on the rows it
    scores). Either way the held-out best is tracked and recorded beside the kept epoch."""
    if epoch_choice not in EPOCH_CHOICES:
        raise SpinegradeError(f"epoch_choice must be one of {', '.join(EPOCH_CHOICES)}, got {epoch_choice!r}")
    main = world.is_main
    if main:
        folder.done.unlink(missing_ok=True)  # from here on the fold is unfinished until a new done.json lands
        folder.out.mkdir(parents=True, exist_ok=True)
    progress = folder.restore(model, optimizer, schedule, device, say) if resume else FoldProgress()
    curves = FoldCurves(folder.out, progress.start_epoch, wandb_run) if main else None
    finished = False
    try:
        for epoch in range(progress.start_epoch, num_epochs):
            torch.manual_seed(seed * 1000 + epoch)  # dropout and the like: the same stream on a resumed run
            row, score = one_epoch(epoch)
            row = {"epoch": epoch, **row, "learning_rate": optimizer.param_groups[0]["lr"]}  # at the epoch's end
            progress.history.append(row)
            if not math.isfinite(score):
                raise SpinegradeError(f"{folder.label}: training diverged at epoch {epoch + 1} (held-out score "
                                      f"{score}); lower --learning_rate")
            improved = score < progress.best_score
            if improved:
                progress.best_score, progress.best_epoch = score, epoch
            kept = improved if epoch_choice == "held_out_best" else True
            if kept:
                progress.kept_score, progress.kept_epoch = score, epoch
            if main:
                # the curves first: a kill before the checkpoint repeats this epoch, and the resumed run purges it
                curves.add(epoch, row)
                if kept:
                    on_best(epoch)
                folder.save(progress, epoch, model, optimizer, schedule)
            say(f"epoch {epoch + 1}/{num_epochs}: {describe(row)}{' (held-out best)' if improved else ''}")
        finished = True
    finally:
        if curves is not None:
            curves.close(failed=not finished)  # a W&B run stopped by an error or a kill shows as failed
    if progress.kept_epoch < 0:
        raise SpinegradeError(f"{folder.label}: no epoch was run (num_epochs={num_epochs})")
    return progress


class FoldCurves:
    """The fold's epochs as TensorBoard scalars, beside ``metrics.csv`` in the fold's folder (every
    numeric column, ``train_loss`` as ``train/loss``), so that ``tensorboard --logdir OUTPUT/trained_models``
    compares backbones, groups and folds. A fold started over drops its old curves; a resumed one
    purges the epochs it runs again (``purge_step``), so a killed epoch never shows twice.

    With ``wandb_run`` (name, group, config), the same scalars also go to a Weights & Biases run (its
    files under the fold's ``wandb/``; ``WANDB_PROJECT``, default "spinegrade"; ``WANDB_MODE=offline``
    keeps them local for ``wandb sync``). Online, a resumed fold continues its W&B run (its id is kept in
    the fold's ``wandb-run-id``), where an epoch killed before its checkpoint keeps the values first
    sent: W&B does not rewrite a run's history. Offline, W&B cannot resume a run: each resumed stretch is
    its own offline folder under the same id, synced separately."""

    def __init__(self, out: Path, start_epoch: int, wandb_run: dict | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SpinegradeError("training curves need the tensorboard package: pip install tensorboard") from None
        if start_epoch == 0:  # a fold started over: no curve, and no W&B run, of its earlier training goes on
            for old in out.glob("events.out.tfevents.*"):
                old.unlink()
            (out / WANDB_RUN_ID).unlink(missing_ok=True)
        self.writer = SummaryWriter(str(out), purge_step=start_epoch or None)
        try:
            self.wandb = start_wandb_run(out, start_epoch, **wandb_run) if wandb_run else None
        except BaseException:
            self.writer.close()
            raise

    @staticmethod
    def tag(column: str) -> str:
        split, _, rest = column.partition("_")
        return f"{split}/{rest}" if split in ("train", "val") and rest else column

    def add(self, epoch: int, row: dict) -> None:
        scalars = {self.tag(column): float(value) for column, value in row.items()
                   if column != "epoch" and isinstance(value, numbers.Real) and not isinstance(value, bool)}
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=epoch)

    def close(self, failed: bool = False) -> None:
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)


WANDB_RUN_ID = "wandb-run-id"  # in a fold's folder: the W&B run its resumed epochs continue


def require_wandb():
    """The wandb module, or a one-line error naming the package (asked for with ``--wandb``)."""
    try:
        import wandb
    except ImportError:
        raise SpinegradeError("--wandb needs the wandb package: pip install wandb (or leave out --wandb; "
                              "TensorBoard curves are always written)") from None
    return wandb


def start_wandb_run(out: Path, start_epoch: int, name: str, group: str, config: dict):
    """A W&B run for one fold: a new one for a fold started from its first epoch, else the fold's
    earlier run continued (its id in ``out/wandb-run-id``)."""
    wandb = require_wandb()
    id_file = out / WANDB_RUN_ID
    run_id = id_file.read_text().strip() if start_epoch > 0 and id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    try:
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "spinegrade"), name=name, group=group,
                         config=config, dir=str(out), id=run_id, resume="allow")
        # a resumed run takes the server's saved config over the one passed: a fold resumed with more
        # epochs must show the settings it now trains with
        run.config.update(config, allow_val_change=True)
        return run
    except Exception as exc:  # not logged in, no network in online mode, a bad setting: the user's to fix
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpinegradeError(f"{name}: W&B could not start a run ({detail}); run `wandb login`, or set "
                              "WANDB_MODE=offline to keep the run local") from None
