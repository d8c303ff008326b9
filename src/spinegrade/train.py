"""Train one backbone on one fold: train on the other folds for a fixed number of epochs and write the
last epoch's held-out predictions (out-of-fold: the held-out fold chose nothing). The epoch that
scored best on the held-out fold (competition loss) is recorded beside it as an optimistic figure;
``epoch_choice: held_out_best`` keeps that epoch instead, as earlier versions did.

One model per (backbone, condition group): the samples are the labelled levels of the group's
conditions (``constants.GROUPS``), on the series the group is read on. What a fold leaves in
``OUTPUT/trained_models/<name>/<group>/fold<k>/`` (:class:`spinegrade.layout.RunLayout`) describes itself:
``config.yaml`` (resolved settings), ``model.json`` (construction arguments, input size and
normalisation, label names, fold), ``best.safetensors`` (weights of the best epoch),
``last.pt`` (model, optimiser and progress for ``--resume``; tensors only, loaded with
``weights_only=True``), ``metrics.csv`` (one row per epoch) and ``done.json`` once finished.
The out-of-fold predictions go to ``OUTPUT/oof/<name>/<group>/fold<k>.csv``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from spinegrade.config import FORMER_DEFAULTS, RUN_ONLY, TrainConfig, save_config
from spinegrade.constants import GROUPS, PROBABILITY_COLUMNS, SEVERITIES, SEVERITY_WEIGHTS, row_id
from spinegrade.data.dataset import Jitter, LevelDataset, build_transform, mirrored_targets
from spinegrade.data.folds import read_folds, write_csv_atomic
from spinegrade.data.index import build_index, group_label_rows
from spinegrade.data.loader import batch_loader
from spinegrade.data.preprocess import PREPROCESS_VERSION, PreprocessSettings, build_cache
from spinegrade.device import autocast, select_device
from spinegrade.distributed import SINGLE, World, start, stop, world_from_environment
from spinegrade.engine import compiled, fold_seed, make_schedule, optimise, predict, train_one_epoch
from spinegrade.errors import SpinegradeError
from spinegrade.files import write_text_atomic
from spinegrade.fold_loop import EpochSampler, FoldFolder, SeededDataset, fit, labels_digest, plain, seed_everything
from spinegrade.label_noise import dropped_labels
from spinegrade.layout import RunLayout, remember_folds
from spinegrade.logs import get_logger
from spinegrade.metrics import class_prior, competition_score, prior_table
from spinegrade.models.classifier import (
    LevelClassifier,
    ModelSpec,
    apply_freezing,
    freeze_norm_statistics,
    grade_probabilities,
    input_statistics,
    load_pretrained,
    save_state,
)


log = get_logger(__name__)


@dataclass
class FoldResult:
    name: str
    group: str
    fold: int
    best_epoch: int
    best_score: float
    prior_score: float
    oof_path: Path
    kept_epoch: int = -1  # whose held-out predictions the OOF file holds (best_*: the held-out best, optimistic)
    kept_score: float = float("nan")
    skipped: bool = False


def class_weights(targets: np.ndarray, mode: str) -> torch.Tensor:
    if mode == "competition":
        return torch.tensor(SEVERITY_WEIGHTS, dtype=torch.float32)
    if mode == "none":
        return torch.ones(3)
    counts = np.array([(targets == k).sum() for k in range(3)], dtype=np.float64)
    weights = len(targets) / (3 * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def load_samples(config: TrainConfig, data_dir: Path, folds_path: Path, say=log.info) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Usable samples of the config's condition group with their fold (what is skipped is counted in
    the log), and the whole index table (every condition: the flip rule needs the other side's grade)."""
    index = build_index(data_dir, check_images=False)
    rows = index.table[index.table["condition"].isin(GROUPS[config.group].conditions)]
    unlabelled = int((rows["severity"] < 0).sum())
    no_point = int(((rows["severity"] >= 0) & rows["instance_number"].isna()).sum())
    samples = rows[rows["usable"]]
    folds = read_folds(folds_path)
    merged = samples.merge(folds, on="study_id", how="left")
    not_in_folds = merged["fold"].isna()
    if not_in_folds.any():
        log.warning(f"{merged.loc[not_in_folds, 'study_id'].nunique()} studies are not in {folds_path}; skipped")
    merged = merged[~not_in_folds].astype({"fold": int})
    say(f"{config.group}: {len(merged)} samples from {merged['study_id'].nunique()} studies "
        f"(skipped: {unlabelled} unlabelled levels, {no_point} labelled levels without a point)")
    if merged.empty:
        raise SpinegradeError(f"no usable {config.group} samples ({', '.join(GROUPS[config.group].conditions)}) in {data_dir}")
    return merged, index.table


def predict_probabilities(model: nn.Module, loader: DataLoader, device: torch.device,
                          world: World = SINGLE, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (with ``flip``, averaged over the horizontal mirror) and the sample indices
    they belong to (under DDP, gathered from every process's shard, each sample once, in index order)."""
    def step(batch: dict) -> tuple[torch.Tensor, np.ndarray]:
        image = batch["image"].to(device, non_blocking=True)
        with autocast(device):  # probabilities stay on the device: no wait per batch
            probs = grade_probabilities(model, image, batch["level"].to(device, non_blocking=True), flip)
        return probs, batch["index"].numpy().copy()  # not a view: it would hold the batch's pinned block

    outputs = predict(model, loader, step)
    probs, indices = [p for p, _ in outputs], [i for _, i in outputs]
    shards = world.gather((torch.cat(probs).cpu().numpy(), np.concatenate(indices)))
    probs_all, indices_all = np.concatenate([p for p, _ in shards]), np.concatenate([i for _, i in shards])
    indices_all, first = np.unique(indices_all, return_index=True)  # padding repeats a few samples
    return probs_all[first], indices_all


def _score(samples: pd.DataFrame, probs: np.ndarray) -> dict[str, float]:
    frame = samples[["study_id", "condition", "severity"]].reset_index(drop=True).copy()
    frame[list(PROBABILITY_COLUMNS)] = probs
    return competition_score(frame)


def train_fold(config: TrainConfig, data_dir: str | Path, folds_path: str | Path, output_dir: str | Path,
               fold: int, resume: bool = False, force: bool = False, device: str | None = None,
               world: World = SINGLE) -> FoldResult:
    """Train one fold of one backbone on the config's condition group. Under DDP (``world``) every
    process calls this; only rank 0 writes and logs."""
    data_dir, folds_path, output_dir = Path(data_dir), Path(folds_path), Path(output_dir)
    layout = RunLayout(output_dir)
    main = world.is_main
    say = log.info if main else _quiet
    name, group = config.name, config.group
    out = layout.fold_dir(name, group, fold, existing=False)
    oof_file = layout.oof_file(name, group, fold, existing=False)
    record = input_record(labels_digest(*group_label_rows(data_dir, GROUPS[group].conditions), read_folds(folds_path)))
    folder = FoldFolder(out, {**_identity(config), **record}, f"{name} {group} fold {fold}",
                        defaults={**_identity(TrainConfig()), **FORMER_DEFAULTS}, required=tuple(record))
    info, resume = folder.finished(force, resume, say)
    if info is not None:
        return FoldResult(name, group, fold, info["best_epoch"], info["best_score"], info["prior_score"],
                          oof_file, info.get("kept_epoch", info["best_epoch"]), info.get("kept_score", info["best_score"]),
                          skipped=True)
    world.barrier()  # every process has read done.json before it goes
    samples, labels = load_samples(config, data_dir, folds_path, say)
    if main:
        remember_folds(layout, folds_path)
        write_csv_atomic(prior_table(labels), layout.priors)  # for targets no model covers, and kernels
    if fold not in set(samples["fold"]):
        raise SpinegradeError(f"fold {fold} not in {folds_path} (folds: {sorted(set(samples['fold']))})")
    settings = PreprocessSettings.from_config(config)
    if main:  # one process decodes; the others open what it built
        cache = build_cache(samples, settings, layout.cache)
    world.barrier()
    if not main:
        cache = build_cache(samples, settings, layout.cache)
    table = cache.samples
    train_idx = np.flatnonzero(table["fold"].to_numpy() != fold)
    val_idx = np.flatnonzero(table["fold"].to_numpy() == fold)
    if config.suspect_labels:  # left out of the training folds only: the held-out fold is scored on every label
        drop = dropped_labels(config.suspect_labels, config.suspect_share)
        keys = list(zip(table["study_id"].astype(int), table["condition"], table["level"]))
        suspect = np.array([keys[i] in drop for i in train_idx], dtype=bool)
        train_idx = train_idx[~suspect]
        say(f"{name} {group} fold {fold}: {int(suspect.sum())} suspect training labels left out (the top "
            f"{config.suspect_share:.0%} of {config.suspect_labels})")
    targets = table["severity"].to_numpy()
    say(f"{name} {group} fold {fold}: {len(train_idx)} training samples, {len(val_idx)} held out")
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise SpinegradeError(f"{name} {group} fold {fold}: {len(train_idx)} training and {len(val_idx)} held-out "
                              "samples have a readable image; the skipped files are listed above")

    device_ = select_device(device, world.local_rank if world.enabled else None)
    seed_everything(config.seed)
    spec = ModelSpec(config.backbone, config.level_embeddings, tuple(config.hidden_sizes), config.dropout,
                     slices=config.slices)
    model = LevelClassifier(spec)
    say(load_pretrained(model, config.pretrained, config.weights))
    trainable, frozen = apply_freezing(model, config.freeze_backbone, config.unfreeze_last_n)
    say(f"parameters: {trainable:,} trainable, {frozen:,} frozen (freeze_backbone={config.freeze_backbone}, "
        f"unfreeze_last_n={config.unfreeze_last_n} backbone tensors)")
    mean, std = input_statistics(model.backbone, spec.input_channels)
    # channels-last on every device: oneDNN's CPU convolutions and cuDNN's both run faster in it
    model = model.to(device_).to(memory_format=torch.channels_last)
    net = model  # what training calls; validation and checkpoints use the model itself
    if world.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device_.index] if device_.type == "cuda" else None,
                                                        gradient_as_bucket_view=True)
    net = compiled(net, config.compile)
    batch_size = max(1, config.batch_size // world.world_size)  # per process: the global batch stays batch_size
    if config.batch_size % world.world_size:
        say(f"warning: batch_size {config.batch_size} is not a multiple of {world.world_size} processes; "
            f"the global batch is {batch_size * world.world_size}")
    if world.enabled:
        say(f"DDP: {world.world_size} processes, {batch_size} samples each per step ({device_.type})")

    weights = class_weights(targets[train_idx], config.class_weights)
    say(f"class weights ({config.class_weights}): " + ", ".join(f"{s} {w:.3f}" for s, w in zip(SEVERITIES, weights.tolist())))
    criterion = nn.CrossEntropyLoss(weight=weights.to(device_))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)

    levels = table["level_index"].to_numpy()
    flipped = mirrored_targets(table, labels, config.input)
    jitter = Jitter(point_sd=config.point_jitter_mm / (config.crop_mm / config.image_size) if config.input == "crop" else 0.0,
                    slice_probability=config.neighbour_slice_probability)
    seed = fold_seed(config.seed, fold, config.fold_seeds)
    train_set = SeededDataset(LevelDataset(cache.images, levels, targets, build_transform(
        True, config.flip_probability, config.rotation_degrees), train_idx, flipped,
        image_size=config.image_size, jitter=jitter, slices=config.slices), seed)
    val_set = LevelDataset(cache.images, levels, targets, build_transform(False), val_idx, image_size=config.image_size,
                           slices=config.slices)
    train_sampler = EpochSampler(len(train_set), seed, shuffle=True, world=world)
    workers = max(0, int(config.num_workers))
    loader_args = dict(image_shape=(config.slices, config.image_size, config.image_size), workers=workers,
                       pin_memory=device_.type == "cuda", seed=config.seed)
    train_loader = batch_loader(train_set, batch_size, train_sampler, drop_last=len(train_sampler) > batch_size,
                                **loader_args)
    val_loader = batch_loader(val_set, batch_size * 2, world.shard(list(range(len(val_set)))), **loader_args)
    schedule = make_schedule(config.lr_schedule, optimizer, config.learning_rate, config.num_epochs * len(train_loader))

    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        write_text_atomic(out / "model.json", json.dumps({
            **spec.to_dict(), "input": config.input, "image_size": config.image_size, "crop_mm": config.crop_mm,
            "turn_by_side": settings.turn_by_side, "test_time_flip": config.test_time_flip, "mean": list(mean), "std": list(std), "labels": list(SEVERITIES), "group": group,
            "conditions": list(GROUPS[group].conditions), "fold": fold, "name": name, **record}, indent=1))

    val_rows = table.iloc[val_idx].reset_index(drop=True)
    prior_score = _score(val_rows, class_prior(table.iloc[train_idx], val_rows))["score"]
    held_out: dict = {}  # the latest epoch's held-out rows and probabilities, for on_best

    def one_epoch(epoch: int) -> tuple[dict, float]:
        started = time.perf_counter()
        train_loss, train_accuracy, train_competition = train_epoch(
            net, model, train_loader, train_sampler, criterion, optimizer, device_, epoch, config, table, world, main,
            schedule)
        held, probs, scores, val_loss = evaluate_epoch(model, val_loader, device_, table, weights, world,
                                                       flip=config.test_time_flip)
        held_out.update(held=held, probs=probs)
        row = {"train_loss": train_loss, "train_accuracy": train_accuracy, "train_competition": train_competition,
               "val_loss": val_loss, "val_accuracy": float((probs.argmax(1) == held["severity"].to_numpy()).mean()),
               **{f"val_{term}": v for term, v in scores.items() if term != "score"},  # the group's terms
               "val_competition": scores["score"], "seconds": time.perf_counter() - started}
        return row, scores["score"] if np.isfinite(train_loss) else float("nan")

    def on_best(epoch: int) -> None:
        save_state(model, out / "best.safetensors")
        write_oof(held_out["held"], held_out["probs"], oof_file, fold)

    def describe(row: dict) -> str:
        return (f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f} | held-out loss "
                f"{row['val_loss']:.4f} acc {row['val_accuracy']:.3f} competition {row['val_competition']:.4f} | "
                f"{row['seconds']:.1f}s")

    progress = fit(folder, config.num_epochs, config.seed, model, optimizer, one_epoch, on_best, describe, device_,
                   schedule=schedule, resume=resume, world=world, say=say,
                   wandb_run={"name": f"{name}-{group}-fold{fold}", "group": f"{name}-{group}", "config": config.to_dict()}
                   if config.wandb else None, epoch_choice=config.epoch_choice)
    best_epoch, best_score = progress.best_epoch, progress.best_score
    if main:
        folder.finish(progress, prior_score=prior_score, epochs=config.num_epochs)
    world.barrier()  # no process moves to the next fold before this one is marked finished
    say(f"{name} {group} fold {fold}: kept epoch {progress.kept_epoch + 1} ({config.epoch_choice}), held-out "
        f"competition loss {progress.kept_score:.4f} (weight-scaled class prior {prior_score:.4f}; the held-out "
        f"best, epoch {best_epoch + 1}, {best_score:.4f}, is optimistic)")
    return FoldResult(name, group, fold, best_epoch, best_score, prior_score, oof_file, progress.kept_epoch,
                      progress.kept_score)


def train_epoch(net: nn.Module, model: nn.Module, loader, sampler: EpochSampler, criterion: nn.Module,
                optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, config: TrainConfig,
                table: pd.DataFrame, world: World = SINGLE, show: bool = True,
                schedule=None) -> tuple[float, float, float]:
    """One pass over the training folds (the engine's, with the grading step): (mean loss, accuracy,
    competition loss of the batches trained on, augmented as they were), each over every process's shard."""
    sampler.set_epoch(epoch)
    tally = EpochTally()
    train_one_epoch(model, _progress(loader, f"epoch {epoch + 1}/{config.num_epochs}", show), optimizer,
                    lambda batch: grade_step(net, batch, criterion, device), schedule,
                    keep=lambda batch, loss, kept: tally.add(loss, *kept, batch["index"]), prepare=freeze_norm_statistics)
    total_loss, correct, seen, train_probs, train_seen = tally.totals()
    total_loss, correct, seen = (sum(v) for v in zip(*world.gather((total_loss, correct, seen))))
    trained = world.gather((train_probs, train_seen))
    train_probs, train_seen = [p for ps, _ in trained for p in ps], [i for _, ix in trained for i in ix]
    competition = (_score(table.iloc[np.concatenate(train_seen)], np.concatenate(train_probs))["score"]
                   if train_seen else float("nan"))
    return total_loss / max(seen, 1), correct / max(seen, 1), competition


def evaluate_epoch(model: nn.Module, loader, device: torch.device, table: pd.DataFrame, weights: torch.Tensor,
                   world: World = SINGLE, flip: bool = False) -> tuple[pd.DataFrame, np.ndarray, dict[str, float], float]:
    """The held-out fold after an epoch, graded as prediction will (``flip``: with the mirror too):
    (its rows, probabilities, competition terms, weighted cross-entropy)."""
    probs, idx = predict_probabilities(model, loader, device, world, flip)
    held = table.iloc[idx].reset_index(drop=True)
    loss = float(nn.functional.cross_entropy(torch.log(torch.tensor(probs).clamp_min(1e-15)),
                                             torch.tensor(held["severity"].to_numpy()), weight=weights))
    return held, probs, _score(held, probs), loss


def train_folds(configs: list[TrainConfig], folds: list[int], data_dir: Path, folds_path: Path, output_dir: Path,
                resume: bool = False, force: bool = False, device: str | None = None) -> None:
    """Every (config, fold) in turn, in this process's place of the DDP world (a single process when
    there is none): what ``spinegrade train`` runs, once per process."""
    world = world_from_environment()
    start(world, select_device(device).type)
    try:
        for config in configs:
            for fold in folds:
                train_fold(config, data_dir, folds_path, output_dir, int(fold), resume=resume, force=force,
                           device=device, world=world)
    finally:
        stop(world)


def finished_folds(output_dir: Path, configs: list[TrainConfig], folds: list[int]) -> list[dict]:
    """What done.json says of each finished (name, group, fold): the summary after a run, whoever ran it."""
    layout = RunLayout(output_dir)
    rows = []
    for config in configs:
        for fold in folds:
            done = layout.fold_dir(config.name, config.group, int(fold)) / "done.json"
            if done.is_file():
                rows.append({"name": config.name, "group": config.group, "fold": int(fold), **json.loads(done.read_text())})
    return rows


def input_record(labels_digest: str) -> dict:
    """What a grading fold records of its inputs, in its identity and its ``model.json``: the version of
    the images this code makes (prediction refuses a model of another) and a digest of its labels."""
    return {"preprocess_version": PREPROCESS_VERSION, "labels_digest": labels_digest}


def _identity(config: TrainConfig) -> dict:
    """The settings that make a fold's result what it is (worker count and compilation do not); with a
    suspect-label list, which labels it leaves out (the list's file may be rewritten by a new evaluation)."""
    identity = plain({k: v for k, v in config.to_dict().items() if k not in RUN_ONLY})
    if config.suspect_labels:
        dropped = sorted(f"{s}_{c}_{lv}" for s, c, lv in dropped_labels(config.suspect_labels, config.suspect_share))
        identity["suspect_digest"] = hashlib.sha256("\n".join(dropped).encode()).hexdigest()[:16]
    return identity


def write_oof(samples: pd.DataFrame, probs: np.ndarray, path: Path, fold: int) -> None:
    frame = pd.DataFrame({
        "row_id": [row_id(s, c, lv) for s, c, lv in zip(samples["study_id"], samples["condition"], samples["level"])],
        **{col: probs[:, k] for k, col in enumerate(PROBABILITY_COLUMNS)},
        "label": [SEVERITIES[k] for k in samples["severity"]],
        "fold": fold,
    })
    write_csv_atomic(frame, path)


class EpochTally:
    """A training epoch's running loss, accuracy and probabilities, kept where the model runs: reading
    them back after every step would make the host wait for the GPU each step, so that it could never
    queue the next one. They come to the host once, at the end of the epoch."""

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | None = None
        self.correct: torch.Tensor | None = None
        self.seen = 0
        self.probabilities: list[torch.Tensor] = []
        self.indices: list[np.ndarray] = []

    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> None:
        logits = logits.detach()
        batch_loss = loss.detach().float() * len(target)
        batch_correct = (logits.argmax(1) == target).sum()
        self.loss_sum = batch_loss if self.loss_sum is None else self.loss_sum + batch_loss
        self.correct = batch_correct if self.correct is None else self.correct + batch_correct
        self.seen += len(target)
        self.probabilities.append(torch.softmax(logits.float(), dim=1))
        self.indices.append(index.numpy().copy())  # not a view: it would hold the batch's pinned block

    def totals(self) -> tuple[float, int, int, list[np.ndarray], list[np.ndarray]]:
        """(loss sum, correct, seen, [probabilities], [sample indices]); the lists are empty for an empty epoch."""
        if not self.seen:
            return 0.0, 0, 0, [], []
        probabilities = torch.cat(self.probabilities).cpu().numpy()
        return float(self.loss_sum), int(self.correct), self.seen, [probabilities], [np.concatenate(self.indices)]


def grade_step(net: nn.Module, batch: dict, criterion: nn.Module,
               device: torch.device) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The grading model's training step, for the engine: (loss, (logits, target)). On a GPU: non-blocking
    copies of uint8 images from pinned memory, normalised and made channels-last on the GPU, bf16
    autocast (loss in float32)."""
    image = batch["image"].to(device, non_blocking=True)
    level = batch["level"].to(device, non_blocking=True)
    target = batch["target"].to(device, non_blocking=True)
    with autocast(device):
        logits = net(image, level)
        loss = criterion(logits.float(), target)
    return loss, (logits, target)


def train_step(net: nn.Module, batch: dict, criterion: nn.Module, optimizer: torch.optim.Optimizer,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One whole optimisation step outside an epoch (the speed benchmarks): (loss, logits, target)."""
    loss, (logits, target) = grade_step(net, batch, criterion, device)
    optimise(loss, optimizer)
    return loss, logits, target


def _quiet(*_args) -> None:
    pass


def _progress(iterable, description: str, show: bool = True):
    """A progress bar on a terminal, silence in logs and tests."""
    if show and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=description, leave=False)
    return iterable
