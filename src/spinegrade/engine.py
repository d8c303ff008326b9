"""One engine for every model spinegrade trains, the grading models (``train.py``) and the slice
locators (``slice_locator_training.py``): one epoch of training, one pass of prediction, the learning
rate's schedule, the fold's seed and compilation. A model kind brings only its *step*: how a batch
becomes a loss (training) or outputs (prediction). Everything else that differs between the two kinds
is a setting of their configs (``config.TrainConfig``, ``config.LocatorConfig``), so it is visible:

- ``lr_schedule`` (``config.LR_SCHEDULES``): "constant" (the graders' default: the published method's AdamW at a fixed rate) or
  "onecycle" (the slice locators' default: warm up over the first 15 % of steps, then anneal);
- ``fold_seeds``: whether each fold draws its sample order and augmentation from ``seed + fold`` (the
  slice locators' default) or from ``seed`` (the graders');
- ``compile``: ``torch.compile`` of the training forward, for both (speed only, not a fold's identity).

Data-parallel training (DDP) is the graders' alone: ``train.py`` shards and gathers around this engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from spinegrade.config import LR_SCHEDULES
from spinegrade.errors import SpinegradeError
from spinegrade.logs import get_logger

log = get_logger(__name__)

ONECYCLE_WARMUP = 0.15  # share of the steps spent warming up


def fold_seed(seed: int, fold: int, fold_seeds: bool) -> int:
    """The seed of a fold's sample order and augmentation (``fold_seeds``: one stream per fold)."""
    return seed + fold if fold_seeds else seed


def make_schedule(name: str, optimizer: torch.optim.Optimizer, learning_rate: float, total_steps: int):
    """The learning-rate schedule ``name`` over ``total_steps`` optimiser steps (None: a constant rate)."""
    if name == "constant":
        return None
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, pct_start=ONECYCLE_WARMUP,
                                                   total_steps=max(1, total_steps))
    raise SpinegradeError(f"lr_schedule {name!r}: use one of {', '.join(LR_SCHEDULES)}")


def compiled(net: Callable, mode: str) -> Callable:
    """``torch.compile`` of a module or a method when asked: the first steps are slower (compilation),
    the rest faster on a GPU."""
    mode = str(mode).lower()
    if mode in ("off", "false", "no", "0", "none", ""):
        return net
    backend = "inductor" if mode in ("on", "true", "yes", "1") else mode
    from torch._dynamo import list_backends

    if backend not in list_backends(exclude_tags=()):
        raise SpinegradeError(f"--compile {mode}: unknown backend; use off, on, or one of {', '.join(list_backends())}")
    log.info(f"torch.compile with the {backend} backend (the first steps include compilation)")
    return torch.compile(net, backend=backend)


def train_one_epoch(model: nn.Module, batches: Iterable[dict], optimizer: torch.optim.Optimizer,
                    step: Callable[[dict], tuple[torch.Tensor, Any]], schedule=None,
                    keep: Callable[[dict, torch.Tensor, Any], None] | None = None,
                    prepare: Callable[[nn.Module], None] | None = None) -> None:
    """One pass over ``batches`` (the caller sets its sampler's epoch): ``step(batch)`` runs the forward
    pass and returns (loss, what the epoch keeps of it); the engine zeroes the gradients, steps back,
    updates the weights and the schedule, then hands the batch to ``keep`` (running sums stay on the
    device: reading them back every step would make the host wait for the GPU). ``prepare(model)``
    after ``model.train()``: what a model kind changes there (frozen normalisation statistics)."""
    model.train()
    if prepare is not None:
        prepare(model)
    for batch in batches:
        loss, kept = step(batch)
        optimise(loss, optimizer, schedule)
        if keep is not None:
            keep(batch, loss, kept)


def optimise(loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule=None) -> None:
    """One optimiser step on ``loss`` (and one step of the schedule, if any)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if schedule is not None:
        schedule.step()


def predict(model: nn.Module, batches: Iterable[dict], step: Callable[[dict], Any]) -> list:
    """``step(batch)`` on every batch in evaluation and inference mode: the outputs, in order."""
    model.eval()
    with torch.inference_mode():
        return [step(batch) for batch in batches]
