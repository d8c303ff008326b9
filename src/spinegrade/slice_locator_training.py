"""Training the slice locators (``slice_locator.py`` reads what this writes): one per sagittal or axial
group, fold by fold through the shared fold loop.

Training reads every labelled slice of the group (each level on its own slice) and, as negatives,
the slices one to three away from a labelled one.
Trained fold by fold on the same folds as the grading models, so every training study is also located
out of fold. Outputs, under ``OUTPUT/trained_models/localizer/<group>/``: ``fold<k>/`` (weights,
``localizer.json``, ``metrics.csv``) and ``slice_choice.json`` (the middle slice's offset per fold, the
presence threshold; written last, it marks the locator finished); the out-of-fold report is
``locators.report_locator``'s.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from spinegrade.config import FORMER_DEFAULTS, RUN_ONLY, LocatorConfig
from spinegrade.constants import GROUPS, CONDITION_SPECS, level_title
from spinegrade.data.dicom import MIN_IMAGE_SIDE, DicomReadError, Stack, load_pixels, main_stack, read_series
from spinegrade.data.folds import read_folds
from spinegrade.data.index import build_index
from spinegrade.data.loader import batch_loader
from spinegrade.data.preprocess import (
    LOCATOR_INPUT_VERSION,
    SquareView,
    anatomical_position,
    canonical_turn,
    neighbour_indices,
    turn,
    turn_point,
    turned_spacing,
)
from spinegrade.device import autocast, select_device
from spinegrade.engine import compiled, fold_seed, make_schedule, predict, train_one_epoch
from spinegrade.errors import SpinegradeError
from spinegrade.files import write_text_atomic
from spinegrade.fold_loop import EpochSampler, FoldFolder, SeededDataset, fit, labels_digest, plain, seed_everything
from spinegrade.layout import RunLayout, remember_folds
from spinegrade.logs import get_logger
from spinegrade.models.classifier import input_statistics, load_pretrained, save_state
from spinegrade.models.slice_locator_net import SliceLocatorNet, SliceLocatorSpec, heatmap_loss, presence_loss, presence_logits, soft_argmax
from spinegrade.offsets import find_instance
from spinegrade.slice_locator import (
    CONTEXT,
    MARKER,
    middle_index,
    point_names,
    reads_axial,
)

log = get_logger(__name__)

FIELD_PERCENTILE = 95  # of the training slices' longer sides: the locator's field (prepare_slice_data)
NEGATIVE_GAPS = (1, 2, 3)  # negatives: slices this many away from a labelled slice
NEGATIVE_SHARE = 0.5  # of training draws, a negative in place of the labelled slice


# --- training data ------------------------------------------------------------------------------

def slice_targets(data_dir: Path, group: str) -> pd.DataFrame:
    """Every labelled point of ``group``: study_id, series_dir, condition, level, instance_number, x, y."""
    table = build_index(data_dir, check_images=False).table
    rows = table[table["condition"].isin(GROUPS[group].conditions) & table["instance_number"].notna()
                 & table["image_path"].notna()]
    return pd.DataFrame({"study_id": rows["study_id"].to_numpy(),
                         "series_dir": [str(Path(p).parent) for p in rows["image_path"]],
                         "condition": rows["condition"].to_numpy(), "level": rows["level"].to_numpy(),
                         "instance_number": rows["instance_number"].astype(int).to_numpy(),
                         "x": rows["x"].to_numpy(dtype=float), "y": rows["y"].to_numpy(dtype=float)})


def _series_stacks(series_dir: str, every_stack: bool) -> list[Stack]:
    """A series' stacks (headers only): every one where a series may hold several (axial blocks at
    different angles), else its main stack."""
    stacks = read_series(series_dir, with_pixels=False, errors=[])
    return stacks if every_stack else [s for s in [main_stack(stacks)] if s is not None]


def _labelled_extents(job: tuple) -> list[float] | str:
    """The longer side in mm of each labelled slice of one series (headers only), or why it cannot be read."""
    study_id, series_dir, points, axial = job
    stacks = _series_stacks(series_dir, axial)
    if not stacks:
        return f"study {study_id}: no readable slice in {series_dir}"
    out = []
    for instance in {p[2] for p in points}:
        found = find_instance(stacks, instance)
        if found is not None:
            s = stacks[found[0]].slices[found[1]]
            out.append(max(s.shape[0] * s.pixel_spacing[0], s.shape[1] * s.pixel_spacing[1]))
    return out


def _prepare_series(job: tuple) -> dict | str:
    """One labelled series: its labelled slices and their negatives, each rendered in its square view
    (turned to one orientation where the group reads axial slices), with the labelled points (pixels
    of the slice as rendered) and the presence targets per heatmap (``point_names``)."""
    study_id, series_dir, points, axial, names, size, field_mm = job
    stacks = _series_stacks(series_dir, axial)
    if not stacks:
        return f"study {study_id}: no readable slice in {series_dir}"
    by_stack: dict[int, list[tuple]] = {}
    skipped = []
    for condition, level, instance, x, y in points:
        found = find_instance(stacks, instance)
        if found is None:
            skipped.append(f"study {study_id}: labelled slice {instance} not readable in {series_dir}")
            continue
        name = CONDITION_SPECS[condition].side if axial else level
        by_stack.setdefault(found[0], []).append((name, found[1], x, y))
    slices = []
    for n, labelled_points in sorted(by_stack.items()):
        slices += _render_stack(study_id, series_dir, n, stacks[n], labelled_points, names, axial, size, field_mm,
                                skipped)
    return {"slices": slices, "skipped": skipped}


def _render_stack(study_id: int, series_dir: str, stack_number: int, stack: Stack, labelled_points: list[tuple],
                  names: tuple[str, ...], axial: bool, size: int, field_mm: float | None, skipped: list[str]) -> list[dict]:
    """The labelled slices of one stack, their negatives and the neighbours they are read with."""
    labelled: dict[str, set[int]] = {}  # heatmap -> labelled slice indices (two sides: two slices)
    on_slice: dict[int, dict[str, tuple[float, float]]] = {}
    for name, k, x, y in labelled_points:
        labelled.setdefault(name, set()).add(k)
        on_slice.setdefault(k, {}).setdefault(name, (x, y))
    samples = set(on_slice)
    for k in on_slice:
        samples |= {k + sign * gap for gap in NEGATIVE_GAPS for sign in (-1, 1) if 0 <= k + sign * gap < len(stack)}
    rendered = samples | {k + d for k in samples for d in range(-CONTEXT, CONTEXT + 1) if 0 <= k + d < len(stack)}
    slices = []
    for k in sorted(rendered):
        s = stack.slices[k]
        if min(s.shape) < MIN_IMAGE_SIDE:
            skipped.append(f"study {study_id}: {s.path}: image of {s.shape} pixels is too small to locate on")
            continue
        try:
            pixels = load_pixels(s)
        except DicomReadError as exc:
            skipped.append(f"study {study_id}: {exc}")
            continue
        how = canonical_turn(s)
        pixels = turn(pixels, *how)
        spacing = turned_spacing(s.pixel_spacing, how)
        view = SquareView.fitted(pixels, spacing, size, field_mm)
        presence = [np.nan if name not in labelled or k not in samples else float(k in labelled[name])
                    for name in names]
        points = {name: turn_point(x, y, how, s.shape) for name, (x, y) in on_slice.get(k, {}).items()}
        before, _, after = neighbour_indices(stack, k, CONTEXT)
        # the slice's shape, spacing and points are the turned image's
        slices.append({"image": view.render(pixels), "study_id": study_id, "series_dir": series_dir, "stack": stack_number,
                       "before": before, "after": after, "slice_index": k, "stack_length": len(stack),
                       "anatomical_position": anatomical_position(stack, k),
                       "instance_number": s.instance_number, "rows": pixels.shape[0], "cols": pixels.shape[1],
                       "row_spacing": spacing[0], "col_spacing": spacing[1], "labelled": k in on_slice, "sample": k in samples,
                       "points": points, "presence": presence, **view.as_dict()})
        s.pixels = None
    return slices


def _map(function, jobs: list) -> list:
    workers = min(8, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 4:
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(function, jobs, chunksize=4))
    return [function(j) for j in jobs]


@dataclass
class SliceData:
    """A group's training slices, decoded once: ``images`` (N, size, size) uint8; ``meta`` one row per
    slice; ``points`` (N, 5, 2) in [0, 1] of the square view where the slice is a level's labelled
    slice (NaN elsewhere); ``presence`` (N, 5) 1 / 0 / NaN (left out); ``anchors``: the labelled
    slices; ``negatives[i]``: the slices around ``anchors[i]``; ``neighbours`` (N, 2): the rows of each
    slice's neighbours in its stack (itself at the stack's ends), its other input channels, in
    anatomical order (``preprocess.neighbour_indices``)."""

    images: np.ndarray
    meta: pd.DataFrame
    points: np.ndarray
    presence: np.ndarray
    anchors: np.ndarray
    negatives: list[np.ndarray]
    field_mm: float | None
    neighbours: np.ndarray | None = None
    labels_digest: str = ""  # of the points and folds it was made from (``labels_digest``)

    def inputs(self, k: int) -> np.ndarray:
        """(H, W, 3) uint8: slice ``k`` between its neighbours."""
        before, after = self.neighbours[k]
        return np.stack([self.images[before], self.images[k], self.images[after]], axis=-1)


def prepare_slice_data(targets: pd.DataFrame, size: int, group: str = "spinal") -> SliceData:
    """Each labelled series' labelled slices and negatives in their :class:`SquareView`, decoded once
    (``targets``: ``slice_targets(data_dir, group)``).

    The field is the 95th percentile of the labelled slices' longer sides, read from the headers in a
    first pass so that every slice is rendered at the same scale. Not the largest: one slice with a
    wrong PixelSpacing would shrink every other slice's anatomy. The few larger slices are cut at
    their edges, and a point that falls outside the field is left out like an unlabelled one."""
    axial, names = reads_axial(group), point_names(group)
    jobs = [(study, series, [tuple(r) for r in part[["condition", "level", "instance_number", "x", "y"]].itertuples(
                 index=False, name=None)], axial)
            for (study, series), part in targets.groupby(["study_id", "series_dir"], sort=True)]
    extents = [e for found in _map(_labelled_extents, jobs) if not isinstance(found, str) for e in found]
    field_mm = float(np.percentile(extents, FIELD_PERCENTILE, method="lower")) if extents else None
    slices = []
    for result in _map(_prepare_series, [(*job, names, size, field_mm) for job in jobs]):
        if isinstance(result, str):
            log.info(f"skipped: {result}")
            continue
        for line in result["skipped"]:
            log.info(f"skipped: {line}")
        slices.extend(result["slices"])
    empty = SliceData(np.zeros((0, size, size), np.uint8), pd.DataFrame(), np.zeros((0, len(names), 2)),
                      np.zeros((0, len(names))), np.zeros(0, int), [], field_mm)
    if not slices:
        return empty
    images = np.stack([s.pop("image") for s in slices])
    points = np.full((len(slices), len(names), 2), np.nan)
    presence = np.array([s.pop("presence") for s in slices], dtype=float)
    labelled_points = [s.pop("points") for s in slices]
    meta = pd.DataFrame(slices)
    for i, (r, on_slice) in enumerate(zip(meta.itertuples(), labelled_points)):
        view = SquareView.columns(meta.iloc[[i]], size)
        for k, name in enumerate(names):
            if name not in on_slice:
                continue
            x, y = on_slice[name]
            title = name if axial else level_title(name)
            if not (-0.5 <= x <= r.cols - 0.5 and -0.5 <= y <= r.rows - 0.5):
                log.info(f"skipped point: study {r.study_id} {title} at ({x}, {y}) lies outside its "
                         f"{r.cols}x{r.rows} image")
                continue
            u, v = (float(np.squeeze(c)) for c in view.to_unit(np.array([x]), np.array([y])))
            if not (0 <= u <= 1 and 0 <= v <= 1):
                log.info(f"skipped point: study {r.study_id} {title} lies outside the locator's "
                         f"{field_mm:.0f} mm field (its slice is {r.rows * r.row_spacing:.0f} x "
                         f"{r.cols * r.col_spacing:.0f} mm)")
                continue
            points[i, k] = (u, v)
    anchors = np.flatnonzero(meta["labelled"].to_numpy())
    row_of = {(r.series_dir, r.stack, r.slice_index): i for i, r in enumerate(meta.itertuples())}
    neighbours = np.array([[row_of.get((r.series_dir, r.stack, r.before), i), row_of.get((r.series_dir, r.stack, r.after), i)]
                           for i, r in enumerate(meta.itertuples())], dtype=int)
    sample = meta["sample"].to_numpy()
    negatives = []
    for a in anchors:
        around = [row_of.get((meta.at[a, "series_dir"], meta.at[a, "stack"], meta.at[a, "slice_index"] + sign * gap))
                  for gap in NEGATIVE_GAPS for sign in (-1, 1)]
        negatives.append(np.array([j for j in around if j is not None and sample[j]], dtype=int))
    return SliceData(images, meta, points, presence, anchors, negatives, field_mm, neighbours)


class SliceDataset(Dataset):
    """One draw per labelled slice (``anchors``): in training, a negative around it instead, now and
    then. ``image`` uint8 (1, H, W) (the model normalises it), ``points`` (levels, 2) in [0, 1],
    ``known`` where a point is labelled, ``presence`` and ``presence_known`` per level, ``index``.
    Training draws are augmented (rotation, scale, shift, brightness); the points move with the image.
    ``anchors`` None: every slice once, in order, unaugmented (held-out evaluation). The image is the
    slice between its neighbours, three channels, augmented as one image."""

    def __init__(self, data: SliceData, anchors: np.ndarray | None, train: bool):
        self.data, self.train = data, train
        self.anchors = np.asarray(anchors) if anchors is not None else None
        self.rng = np.random.default_rng(0)
        self.transform = A.Compose(
            [A.Affine(rotate=(-10, 10), scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), p=0.8),
             A.RandomBrightnessContrast(p=0.5)],
            keypoint_params=A.KeypointParams(format="xy", remove_invisible=False)) if train else None

    def __len__(self) -> int:
        return len(self.anchors) if self.anchors is not None else len(self.data.meta)

    def set_seed(self, seed: int) -> None:
        """Seed this sample's draws (:class:`spinegrade.fold_loop.SeededDataset` calls it)."""
        self.rng = np.random.default_rng(seed)
        if self.transform is not None:
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __getitem__(self, i: int) -> dict:
        if self.anchors is None:
            k = int(i)
        else:
            a = int(self.anchors[i])
            k = int(self.data.anchors[a])
            negatives = self.data.negatives[a]
            if self.train and len(negatives) and self.rng.random() < NEGATIVE_SHARE:
                k = int(self.rng.choice(negatives))
        size = self.data.images.shape[-1]
        points = self.data.points[k]
        known = np.isfinite(points).all(axis=1)
        image = self.data.inputs(k)
        if self.transform is not None:
            out = self.transform(image=image, keypoints=np.where(known[:, None], points * size, 0.0))
            image = out["image"]
            points = np.asarray(out["keypoints"], dtype=np.float32).reshape(-1, 2) / size
        points = np.where(known[:, None], points, 0.0).astype(np.float32)
        presence = self.data.presence[k]
        presence_known = np.isfinite(presence)
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), "points": torch.from_numpy(points),
                "known": torch.from_numpy(known), "presence": torch.from_numpy(np.nan_to_num(presence).astype(np.float32)),
                "presence_known": torch.from_numpy(presence_known), "index": torch.tensor(k)}


def slice_fields(num_points: int) -> dict:
    """What a :class:`SliceDataset` sample carries besides its image, for the ring loader."""
    return {"points": ((num_points, 2), torch.float32), "known": ((num_points,), torch.bool),
            "presence": ((num_points,), torch.float32), "presence_known": ((num_points,), torch.bool),
            "index": ((), torch.int64)}


def _errors_mm(pred: np.ndarray, data: SliceData, rows: np.ndarray, size: int) -> np.ndarray:
    """(len(rows), 5) distance in mm between predicted (normalised) and labelled points, NaN where unlabelled."""
    meta = data.meta.iloc[rows]
    view = SquareView.columns(meta, size, trailing_axes=1)
    px, py = view.to_pixels(pred[..., 0], pred[..., 1])
    tx, ty = view.to_pixels(data.points[rows][..., 0], data.points[rows][..., 1])
    dx = (px - tx) * meta["col_spacing"].to_numpy()[:, None]
    dy = (py - ty) * meta["row_spacing"].to_numpy()[:, None]
    return np.hypot(dx, dy)


def slice_locator_step(heatmaps: Callable[[torch.Tensor], torch.Tensor], batch: dict, device: torch.device,
                       size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss on a batch of slices (soft-argmax L1 in input pixels and heatmap cross-entropy over the
    labelled points, presence cross-entropy over the levels whose presence is known); also the L1 and
    the heatmap logits, for the log and the held-out figures. ``heatmaps``: the model's
    ``SliceLocatorNet.heatmaps``, or its compiled form."""
    image = batch["image"].to(device, non_blocking=True)
    target = batch["points"].to(device, non_blocking=True)
    known = batch["known"].to(device, non_blocking=True)
    with autocast(device):
        logits = heatmaps(image)
    pred = soft_argmax(logits)
    mask = known.unsqueeze(-1).float()
    l1 = (torch.abs(pred - target) * mask).sum() / mask.sum().clamp_min(1) * size
    loss = l1 + heatmap_loss(logits, target, known) + presence_loss(
        logits, batch["presence"].to(device, non_blocking=True), batch["presence_known"].to(device, non_blocking=True))
    return loss, l1, logits


def _identity(config: LocatorConfig, data: SliceData, group: str) -> dict:
    """The settings that make a locator fold's result what it is (worker count and compilation do not):
    with the version of the inputs this code makes and a digest of the points and folds it learns
    from, so that a changed input or a corrected label trains it again."""
    return plain({**{k: v for k, v in config.to_dict().items() if k not in RUN_ONLY}, "field_mm": data.field_mm,
                  "group": group, "presence": True, "negative_gaps": list(NEGATIVE_GAPS), "slices": 2 * CONTEXT + 1,
                  **input_record(data.labels_digest)})


def input_record(labels_digest: str) -> dict:
    """What a locator records of its inputs, in its identity and its ``localizer.json``."""
    return {"locator_input_version": LOCATOR_INPUT_VERSION, "labels_digest": labels_digest}


def train_slice_locator_fold(config: LocatorConfig, data: SliceData, fold: int, output_dir: Path, device: torch.device,
                         group: str = "spinal", resume: bool = False, force: bool = False) -> None:
    """Train one fold on the other folds' slices through the shared fold loop (resume, ``done.json``,
    AMP on a GPU, the ring loader). The fold keeps its last epoch (``epoch_choice``), so its out-of-fold
    report chooses nothing on the studies it scores; the held-out loss (on the held-out studies' labelled
    slices and their nearest neighbours) is recorded each epoch, its best as an optimistic figure."""
    out = RunLayout(output_dir).locator_dir(group, existing=False) / f"fold{fold}"
    folder = FoldFolder(out, _identity(config, data, group), f"{group} locator fold {fold}",
                        defaults=plain({**LocatorConfig().to_dict(), **FORMER_DEFAULTS}),
                        required=tuple(input_record("")))
    folds = data.meta["fold"].to_numpy()
    train_anchors = np.flatnonzero(folds[data.anchors] != fold)
    # held out: the labelled slices and their nearest neighbours (the hardest negatives), a third of the samples
    near = data.meta["labelled"].to_numpy().copy()
    for a, negatives in zip(data.anchors, data.negatives):
        near[[j for j in negatives if abs(data.meta.at[j, "slice_index"] - data.meta.at[a, "slice_index"]) == 1]] = True
    val_rows = np.flatnonzero((folds == fold) & near)
    info, resume = folder.finished(force, resume)
    if info is not None:
        return
    seed_everything(config.seed)
    spec = SliceLocatorSpec(config.backbone, num_points=len(point_names(group)))
    model = SliceLocatorNet(spec)
    log.info(load_pretrained(model, config.pretrained, config.weights))
    mean, std = input_statistics(model.backbone)
    # channels-last trains faster on a CPU (oneDNN) and a GPU alike; prediction reads the weights either way
    model = model.to(device).to(memory_format=torch.channels_last)
    seed = fold_seed(config.seed, fold, config.fold_seeds)
    train_set = SeededDataset(SliceDataset(data, train_anchors, train=True), seed)
    val_set = SliceDataset(data, None, train=False)
    sampler = EpochSampler(len(train_set), seed, shuffle=True)
    loader_args = dict(image_shape=(2 * CONTEXT + 1, config.image_size, config.image_size),
                       workers=max(0, int(config.num_workers)), pin_memory=device.type == "cuda", seed=config.seed,
                       fields=slice_fields(spec.num_points))
    train_loader = batch_loader(train_set, config.batch_size, sampler, drop_last=len(train_set) > config.batch_size,
                                **loader_args)
    val_loader = batch_loader(val_set, config.batch_size * 2, [int(i) for i in val_rows], **loader_args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = make_schedule(config.lr_schedule, optimizer, config.learning_rate, config.num_epochs * len(train_loader))
    heatmaps = compiled(model.heatmaps, config.compile)  # what training calls; evaluation uses the model itself
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "localizer.json", json.dumps({**spec.to_dict(), **config.to_dict(), "mean": list(mean),
                                                          "std": list(std), "field_mm": data.field_mm, "fold": fold,
                                                          "group": group, "presence": True,
                                                          "slices": 2 * CONTEXT + 1, **input_record(data.labels_digest)},
                                                         indent=1))

    def held_out(batch: dict) -> tuple:
        loss, _, logits = slice_locator_step(model.heatmaps, batch, device, config.image_size)
        known = batch["presence_known"].numpy()
        said = (presence_logits(logits).float().cpu().numpy() > 0) == (batch["presence"].numpy() > 0.5)
        return (float(loss), len(batch["image"]), soft_argmax(logits).float().cpu().numpy(),
                batch["index"].numpy().copy(), int((said & known).sum()), int(known.sum()))

    def evaluate() -> dict:
        outputs = predict(model, val_loader, held_out)
        losses = [(o[0], o[1]) for o in outputs]
        preds, rows = [o[2] for o in outputs], [o[3] for o in outputs]
        correct, counted = sum(o[4] for o in outputs), sum(o[5] for o in outputs)
        if not rows:
            return {"val_loss": math.inf, "val_median_mm": math.inf, "val_presence_accuracy": math.nan}
        errors = _errors_mm(np.concatenate(preds), data, np.concatenate(rows), config.image_size)
        finite = errors[np.isfinite(errors)]
        return {"val_loss": sum(l * n for l, n in losses) / sum(n for _, n in losses),
                "val_median_mm": float(np.median(finite)) if len(finite) else math.inf,
                "val_p90_mm": float(np.percentile(finite, 90)) if len(finite) else math.inf,
                "val_presence_accuracy": correct / counted if counted else math.nan}

    def step(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        loss, l1, _ = slice_locator_step(heatmaps, batch, device, config.image_size)
        return loss, l1

    def one_epoch(epoch: int) -> tuple[dict, float]:
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        tally = {"l1": None, "seen": 0}

        def keep(batch: dict, loss: torch.Tensor, l1: torch.Tensor) -> None:
            n = len(batch["image"])
            tally["l1"] = l1.detach() * n if tally["l1"] is None else tally["l1"] + l1.detach() * n  # on the device
            tally["seen"] += n

        train_one_epoch(model, train_loader, optimizer, step, schedule, keep)
        total, seen = tally["l1"], tally["seen"]
        row = {"train_l1_pixels": float(total) / max(seen, 1) if seen else math.nan, **evaluate(),
               "seconds": time.perf_counter() - started}
        return row, row["val_loss"] if math.isfinite(row["train_l1_pixels"]) else math.nan

    def on_best(epoch: int) -> None:
        save_state(model, out / "best.safetensors")

    def describe(row: dict) -> str:
        return (f"{group} locator fold {fold}: train L1 {row['train_l1_pixels']:.2f} px, held-out loss "
                f"{row['val_loss']:.3f}, point median {row['val_median_mm']:.2f} mm, presence right "
                f"{row['val_presence_accuracy']:.1%}")

    progress = fit(folder, config.num_epochs, config.seed, model, optimizer, one_epoch, on_best, describe, device,
                   schedule=schedule, resume=resume,
                   wandb_run={"name": f"locator-{group}-fold{fold}", "group": f"locator-{group}", "config": config.to_dict()}
                   if config.wandb else None, epoch_choice=config.epoch_choice)
    folder.finish(progress, epochs=config.num_epochs)


def middle_offsets(data: SliceData, folds: list[int]) -> dict:
    """The labelled slices' most common offset from their stack's middle, counted the anatomical way: of
    all studies, and of the other folds' for each fold (what an out-of-fold run may know)."""
    labelled = data.meta.iloc[data.anchors]
    offsets = labelled["anatomical_position"] - labelled["stack_length"].map(middle_index)
    per_fold = {str(f): int(offsets[labelled["fold"] != f].mode().iloc[0]) if (labelled["fold"] != f).any()
                else int(offsets.mode().iloc[0]) for f in folds}
    return {"offset_from_middle": int(offsets.mode().iloc[0]), "offset_from_middle_per_fold": per_fold,
            "offset_counts": {int(k): int(v) for k, v in offsets.value_counts().sort_index().items()}}


def train_slice_locator(config: LocatorConfig, data_dir: str | Path, folds_path: str | Path, output_dir: str | Path,
                    device: str | None = None, resume: bool = False, force: bool = False, group: str = "spinal") -> dict:
    """Train the group's slice locator on every fold; return what ``slice_choice.json`` will hold
    (without the threshold, which the out-of-fold report chooses: ``locators.report_locator``). A
    finished fold with the same settings is kept; ``resume`` continues an unfinished one."""
    output_dir = Path(output_dir)
    layout = RunLayout(output_dir)
    remember_folds(layout, Path(folds_path))
    targets = slice_targets(Path(data_dir), group).merge(read_folds(folds_path), on="study_id")
    if targets.empty:
        raise SpinegradeError(f"{data_dir}: no study with labelled {group} points ({GROUPS[group].series_kind}) to train "
                              "its locator on")
    data = prepare_slice_data(targets, config.image_size, group)
    data.labels_digest = labels_digest(targets.assign(series=[Path(d).name for d in targets["series_dir"]])[
        ["study_id", "series", "condition", "level", "instance_number", "x", "y", "fold"]])
    if data.meta.empty:
        raise SpinegradeError(f"{data_dir}: none of the labelled {group} slices could be read")
    data.meta = data.meta.merge(targets.drop_duplicates("study_id")[["study_id", "fold"]], on="study_id", how="left")
    log.info(f"{group} locator: {len(data.anchors)} labelled slices and {len(data.meta) - len(data.anchors)} "
             f"negatives from {data.meta['study_id'].nunique()} studies")
    device_ = select_device(device)
    folds = sorted(int(f) for f in data.meta["fold"].unique())
    for fold in folds:
        train_slice_locator_fold(config, data, fold, output_dir, device_, group=group, resume=resume, force=force)
    # the middle slice's offset is the spinal window's start and fallback; the foramina start from their offsets
    return middle_offsets(data, folds) if GROUPS[group].locator == "sagittal_levels" else {}


def write_slice_choice(output_dir: Path, group: str, choice: dict) -> None:
    """Written last: its presence marks the group's slice locator finished."""
    write_text_atomic(RunLayout(output_dir).locator_dir(group, existing=False) / MARKER, json.dumps(choice, indent=1))
