"""Find the five disc levels on a study nobody has annotated: the slice to grade and a point per level.

The slice: sagittal series are centred on the spine, and the labelled spinal canal slice is the
mid-sagittal one, so the choice is the middle slice of the stack by position, moved by the offset
the training folds label most often. The points: a :class:`LevelLocalizer` on that slice, trained
on the labelled points of ``train_label_coordinates.csv`` fold by fold (the same folds as the
grading models), so that every training study also gets an honest out-of-fold localisation.

This is the spinal group's locator (``constants.GROUPS``: ``sagittal_levels``). Outputs, under
``OUTPUT/``: ``trained_models/localizer/spinal/fold<k>/`` (weights, ``localizer.json``,
``metrics.csv``), ``results/localizer_spinal_oof.csv`` (every held-out point, predicted and labelled,
with its error in mm) and ``results/localizer_spinal_report.json`` (slice choice accuracy, median and
90th percentile error per level).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from spinegrade.config import LocalizerConfig
from spinegrade.constants import GROUPS, LEVELS, level_title
from spinegrade.data.dicom import MIN_IMAGE_SIDE, DicomReadError, Slice, Stack, load_pixels, main_stack, read_series
from spinegrade.data.folds import read_folds, write_csv_atomic
from spinegrade.data.index import build_index
from spinegrade.data.loader import batch_loader
from spinegrade.data.preprocess import SquareView
from spinegrade.errors import SpinegradeError
from spinegrade.files import write_text_atomic
from spinegrade.fold_loop import (
    EpochSampler,
    FoldFolder,
    SeededDataset,
    autocast,
    fit,
    plain,
    seed_everything,
    select_device,
)
from spinegrade.layout import RunLayout, remember_folds
from spinegrade.logs import get_logger
from spinegrade.models.classifier import input_statistics, load_pretrained, load_state, save_state
from spinegrade.models.localizer import LevelLocalizer, LocalizerSpec, heatmap_loss, soft_argmax

log = get_logger(__name__)

GROUP = "spinal"  # the group whose points this locator places
FIELD_PERCENTILE = 95  # of the training slices' longer sides: the localiser's field (prepare_localizer_data)


def middle_index(n: int) -> int:
    return (n - 1) // 2


@dataclass
class LocatedLevels:
    """Where to grade a study: the slice (index in its stack) and (x, y) per level in its pixels."""

    slice_index: int
    points: np.ndarray  # (5, 2), pixel coordinates of the chosen slice, in LEVELS order


# --- training data ------------------------------------------------------------------------------

def localizer_samples(data_dir: Path) -> pd.DataFrame:
    """One row per training study: its spinal canal slice and the five labelled points on it."""
    table = build_index(data_dir, check_images=False).table
    spinal = table[table["condition"].isin(GROUPS[GROUP].conditions) & table["instance_number"].notna()]
    rows = []
    for study_id, group in spinal.groupby("study_id"):
        instance = int(group["instance_number"].mode().iloc[0])
        on_slice = group[group["instance_number"] == instance].set_index("level")
        series_dir = Path(on_slice["image_path"].iloc[0]).parent
        row = {"study_id": study_id, "series_dir": str(series_dir), "instance_number": instance}
        for level in LEVELS:
            row[f"{level}_x"] = on_slice.at[level, "x"] if level in on_slice.index else np.nan
            row[f"{level}_y"] = on_slice.at[level, "y"] if level in on_slice.index else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _labelled_slice(row: dict, with_pixels: bool) -> tuple[Slice, int, int] | str:
    """A study's labelled slice, its index and its stack's length; or why it cannot be used."""
    errors: list[DicomReadError] = []
    stack = main_stack(read_series(row["series_dir"], with_pixels=False, errors=errors))
    k = stack.index_of_instance(row["instance_number"]) if stack else None
    if k is None:
        return f"study {row['study_id']}: labelled slice {row['instance_number']} not readable in {row['series_dir']}"
    s = stack.slices[k]
    if min(s.shape) < MIN_IMAGE_SIDE:
        return f"study {row['study_id']}: {s.path}: image of {s.shape} pixels is too small to localise on"
    if with_pixels:
        try:
            load_pixels(s)  # only this slice of the series is decoded
        except DicomReadError as exc:
            return f"study {row['study_id']}: {exc}"
    return s, k, len(stack)


def _slice_extent_mm(row: dict) -> float | str:
    found = _labelled_slice(row, with_pixels=False)
    if isinstance(found, str):
        return found
    s = found[0]
    return max(s.shape[0] * s.pixel_spacing[0], s.shape[1] * s.pixel_spacing[1])


def _prepare_study(args) -> dict | str:
    row, size, field_mm = args
    found = _labelled_slice(row, with_pixels=True)
    if isinstance(found, str):
        return found
    s, k, stack_length = found
    view = SquareView.fitted(s.pixels, s.pixel_spacing, size, field_mm)
    return {"study_id": row["study_id"], "image": view.render(s.pixels), "slice_index": k,
            "stack_length": stack_length, "rows": s.shape[0], "cols": s.shape[1],
            "row_spacing": s.pixel_spacing[0], "col_spacing": s.pixel_spacing[1], **view.as_dict()}


def _map(function, jobs: list) -> list:
    workers = min(8, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 4:
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(function, jobs, chunksize=4))
    return [function(j) for j in jobs]


def prepare_localizer_data(samples: pd.DataFrame, size: int) -> tuple[np.ndarray, pd.DataFrame, float]:
    """Each study's labelled slice in its :class:`SquareView`, decoded once, with the points
    normalised to [0, 1] of that view; and the view's field in mm.

    The field is the 95th percentile of the labelled slices' longer sides, read from the headers in
    a first pass so that every slice is rendered at the same scale. Not the largest: one slice with
    a wrong PixelSpacing would shrink every other slice's anatomy. The few larger slices are cut at
    their edges, and a point that falls outside the field is left out of training like an
    unlabelled one."""
    rows = samples.to_dict("records")
    extents = [e for e in _map(_slice_extent_mm, rows) if not isinstance(e, str)]
    field_mm = float(np.percentile(extents, FIELD_PERCENTILE, method="lower")) if extents else None
    results = _map(_prepare_study, [(r, size, field_mm) for r in rows])
    kept, images = [], []
    for r in results:
        if isinstance(r, str):
            log.info(f"skipped: {r}")
            continue
        images.append(r.pop("image"))
        kept.append(r)
    if not kept:
        return np.zeros((0, size, size), np.uint8), pd.DataFrame(), field_mm
    meta = pd.DataFrame(kept).merge(samples, on="study_id")
    view = SquareView.columns(meta, size)
    on_image = _on_image(meta)
    for k, level in enumerate(LEVELS):
        x, y = meta[f"{level}_x"], meta[f"{level}_y"]
        outside = ~on_image[:, k] & x.notna().to_numpy() & y.notna().to_numpy()
        for r in meta[outside].itertuples():
            log.info(f"skipped point: study {r.study_id} {level_title(level)} at ({getattr(r, f'{level}_x')}, "
                f"{getattr(r, f'{level}_y')}) lies outside its {r.cols}x{r.rows} image")
        u, v = view.to_unit(x.to_numpy(), y.to_numpy())
        cut = on_image[:, k] & ~((u >= 0) & (u <= 1) & (v >= 0) & (v <= 1))
        for r in meta[cut].itertuples():
            log.info(f"skipped point: study {r.study_id} {level_title(level)} lies outside the localiser's "
                f"{field_mm:.0f} mm field (its slice is {r.rows * r.row_spacing:.0f} x {r.cols * r.col_spacing:.0f} mm)")
        unused = ~on_image[:, k] | cut
        meta[f"{level}_u"], meta[f"{level}_v"] = np.where(unused, np.nan, u), np.where(unused, np.nan, v)  # NaN: unlabelled
    return np.stack(images), meta, field_mm


class PointDataset(Dataset):
    """One labelled slice per sample: ``image`` uint8 (1, H, W) (the model normalises it), ``points``
    (levels, 2) in [0, 1] of the image, ``known`` (levels,) where a point is labelled, ``index``.
    Training samples are augmented (rotation, scale, shift, brightness); the points move with the image."""

    def __init__(self, images: np.ndarray, points: np.ndarray, indices: np.ndarray, train: bool):
        self.images, self.points, self.indices, self.train = images, points, np.asarray(indices), train
        self.transform = A.Compose(
            [A.Affine(rotate=(-10, 10), scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), p=0.8),
             A.RandomBrightnessContrast(p=0.5)],
            keypoint_params=A.KeypointParams(format="xy", remove_invisible=False)) if train else None

    def __len__(self) -> int:
        return len(self.indices)

    def set_seed(self, seed: int) -> None:
        """Seed this sample's augmentation (:class:`spinegrade.fold_loop.SeededDataset` calls it)."""
        if self.transform is not None:
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __getitem__(self, i: int) -> dict:
        k = int(self.indices[i])
        size = self.images.shape[-1]
        points = self.points[k]
        known = np.isfinite(points).all(axis=1)
        image = self.images[k]
        if self.transform is not None:
            out = self.transform(image=image, keypoints=np.where(known[:, None], points * size, 0.0))
            image = out["image"][..., 0] if out["image"].ndim == 3 else out["image"]
            points = np.asarray(out["keypoints"], dtype=np.float32).reshape(-1, 2) / size
        points = np.where(known[:, None], points, 0.0).astype(np.float32)
        return {"image": torch.from_numpy(np.ascontiguousarray(image))[None], "points": torch.from_numpy(points),
                "known": torch.from_numpy(known), "index": torch.tensor(k)}


def point_fields(num_points: int) -> dict:
    """What a :class:`PointDataset` sample carries besides its image, for the ring loader."""
    return {"points": ((num_points, 2), torch.float32), "known": ((num_points,), torch.bool), "index": ((), torch.int64)}


def _on_image(meta: pd.DataFrame) -> np.ndarray:
    """(N, 5): the level has a labelled point, and it lies on its slice."""
    x = np.stack([meta[f"{lv}_x"].to_numpy(dtype=float) for lv in LEVELS], axis=1)
    y = np.stack([meta[f"{lv}_y"].to_numpy(dtype=float) for lv in LEVELS], axis=1)
    cols, rows = meta["cols"].to_numpy()[:, None], meta["rows"].to_numpy()[:, None]
    return (x >= -0.5) & (x <= cols - 0.5) & (y >= -0.5) & (y <= rows - 0.5)  # False where NaN


def _in_pixels(pred: np.ndarray, meta: pd.DataFrame, size: int) -> np.ndarray:
    """(N, 5, 2) predictions normalised to each row's square view -> pixel coordinates of its slice."""
    x, y = SquareView.columns(meta, size, trailing_axes=1).to_pixels(pred[..., 0], pred[..., 1])
    return np.stack([x, y], axis=-1)


def _errors_mm(pred: np.ndarray, meta: pd.DataFrame, size: int) -> np.ndarray:
    """(N, 5) distance between predicted and labelled points in millimetres."""
    pixels = _in_pixels(pred, meta, size)
    true = np.stack([meta[[f"{lv}_x", f"{lv}_y"]].to_numpy(dtype=float) for lv in LEVELS], axis=1)
    true = np.where(_on_image(meta)[..., None], true, np.nan)  # points cut from the field still count
    dx = (pixels[..., 0] - true[..., 0]) * meta["col_spacing"].to_numpy()[:, None]
    dy = (pixels[..., 1] - true[..., 1]) * meta["row_spacing"].to_numpy()[:, None]
    return np.hypot(dx, dy)


def _predict(model: LevelLocalizer, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Normalised predictions (N, levels, 2) and the sample indices they belong to."""
    model.eval()
    out, indices = [], []
    with torch.inference_mode():
        for batch in loader:
            with autocast(device):
                out.append(model(batch["image"].to(device, non_blocking=True)).float().cpu().numpy())
            indices.append(batch["index"].numpy().copy())
    if not out:
        return np.zeros((0, len(LEVELS), 2)), np.zeros(0, dtype=int)
    return np.concatenate(out), np.concatenate(indices)


def localizer_step(model: LevelLocalizer, batch: dict, optimizer: torch.optim.Optimizer, schedule,
                   device: torch.device, size: int) -> tuple[torch.Tensor, int]:
    """One optimisation step on a batch of labelled slices: (L1 in pixels of the input, on the device; batch size).
    The loss is the soft-argmax's L1 plus the heatmap cross-entropy, over the labelled points only."""
    image = batch["image"].to(device, non_blocking=True)
    target = batch["points"].to(device, non_blocking=True)
    known = batch["known"].to(device, non_blocking=True)
    with autocast(device):
        logits = model.heatmaps(image)
    pred = soft_argmax(logits)
    mask = known.unsqueeze(-1).float()
    l1 = (torch.abs(pred - target) * mask).sum() / mask.sum().clamp_min(1) * size
    loss = l1 + heatmap_loss(logits, target, known)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    return l1.detach(), len(image)


def _identity(config: LocalizerConfig, field_mm: float) -> dict:
    """The settings that make a localiser fold's result what it is (not the worker count)."""
    return plain({**{k: v for k, v in config.to_dict().items() if k != "num_workers"}, "field_mm": field_mm})


def train_localizer_fold(config: LocalizerConfig, images: np.ndarray, meta: pd.DataFrame, field_mm: float,
                         fold: int, output_dir: Path, device: torch.device, resume: bool = False,
                         force: bool = False) -> np.ndarray:
    """Train on the other folds through the shared fold loop (resume, ``done.json``, AMP on a GPU,
    the ring loader); return the best epoch's held-out predictions (normalised, in ``meta``'s order
    of the fold's rows), which the fold folder keeps in ``heldout.csv``."""
    out = RunLayout(output_dir).localizer_dir(GROUP, existing=False) / f"fold{fold}"
    folder = FoldFolder(out, _identity(config, field_mm), f"{GROUP} localiser fold {fold}")
    train_idx = np.flatnonzero(meta["fold"].to_numpy() != fold)
    val_idx = np.flatnonzero(meta["fold"].to_numpy() == fold)
    info, resume = folder.finished(force, resume)
    if info is not None and (out / "heldout.csv").is_file():
        return _read_heldout(out / "heldout.csv", meta.iloc[val_idx])
    seed_everything(config.seed)
    model = LevelLocalizer(LocalizerSpec(config.backbone))
    log.info(load_pretrained(model, config.pretrained, config.weights))
    mean, std = input_statistics(model.backbone)
    model.to(device)
    points = np.stack([meta[[f"{lv}_u", f"{lv}_v"]].to_numpy() for lv in LEVELS], axis=1).astype(np.float32)
    train_set = SeededDataset(PointDataset(images, points, train_idx, train=True), config.seed + fold)
    val_set = PointDataset(images, points, val_idx, train=False)
    sampler = EpochSampler(len(train_set), config.seed + fold, shuffle=True)
    loader_args = dict(image_shape=(1, config.image_size, config.image_size), workers=max(0, int(config.num_workers)),
                       pin_memory=device.type == "cuda", seed=config.seed, fields=point_fields(len(LEVELS)))
    train_loader = batch_loader(train_set, config.batch_size, sampler, drop_last=len(train_set) > config.batch_size,
                                **loader_args)
    val_loader = batch_loader(val_set, config.batch_size * 2, list(range(len(val_set))), **loader_args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, pct_start=0.15,
                                                   total_steps=max(1, config.num_epochs * len(train_loader)))
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "localizer.json", json.dumps({**LocalizerSpec(config.backbone).to_dict(), **config.to_dict(),
                                                          "mean": list(mean), "std": list(std), "field_mm": field_mm,
                                                          "fold": fold}, indent=1))
    latest: dict = {}

    def one_epoch(epoch: int) -> tuple[dict, float]:
        started = time.perf_counter()
        model.train()
        sampler.set_epoch(epoch)
        total, seen = None, 0
        for batch in train_loader:
            l1, n = localizer_step(model, batch, optimizer, schedule, device, config.image_size)
            total = l1 * n if total is None else total + l1 * n  # on the device: no wait per step
            seen += n
        pred, order = _predict(model, val_loader, device)
        latest["pred"] = pred[np.argsort(order)]  # val_set's order
        errors = _errors_mm(latest["pred"], meta.iloc[val_idx], config.image_size)
        finite = np.isfinite(errors).any()
        median = float(np.nanmedian(errors)) if finite else math.inf
        row = {"train_l1_pixels": float(total) / max(seen, 1) if seen else math.nan, "val_median_mm": median,
               "val_p90_mm": float(np.nanpercentile(errors, 90)) if finite else math.inf,
               "seconds": time.perf_counter() - started}
        return row, median if math.isfinite(row["train_l1_pixels"]) else math.nan

    def on_best(epoch: int) -> None:
        save_state(model, out / "best.safetensors")
        _write_heldout(out / "heldout.csv", latest["pred"], meta.iloc[val_idx])

    def describe(row: dict) -> str:
        return (f"{GROUP} localiser fold {fold}: train L1 {row['train_l1_pixels']:.2f} px, held-out median "
                f"{row['val_median_mm']:.2f} mm, 90th percentile {row['val_p90_mm']:.2f} mm")

    progress = fit(folder, config.num_epochs, config.seed, model, optimizer, one_epoch, on_best, describe, device,
                   schedule=schedule, resume=resume)
    folder.finish(progress, epochs=config.num_epochs)
    return _read_heldout(out / "heldout.csv", meta.iloc[val_idx])


def _write_heldout(path: Path, pred: np.ndarray, rows: pd.DataFrame) -> None:
    frame = pd.DataFrame([{"study_id": s, "level": lv, "u": pred[i, k, 0], "v": pred[i, k, 1]}
                          for i, s in enumerate(rows["study_id"]) for k, lv in enumerate(LEVELS)])
    write_csv_atomic(frame, path)


def _read_heldout(path: Path, rows: pd.DataFrame) -> np.ndarray:
    """A fold's held-out predictions (N, levels, 2) in ``rows``' order."""
    table = pd.read_csv(path).set_index(["study_id", "level"])
    keys = [(s, lv) for s in rows["study_id"] for lv in LEVELS]
    missing = [k for k in keys if k not in table.index]
    if missing:
        raise SpinegradeError(f"{path}: no held-out prediction for study {missing[0][0]} ({len(missing)} missing); "
                              "train this fold again with --force")
    return table.loc[keys, ["u", "v"]].to_numpy(dtype=np.float64).reshape(len(rows), len(LEVELS), 2)


def train_localizer(config: LocalizerConfig, data_dir: str | Path, folds_path: str | Path, output_dir: str | Path,
                    device: str | None = None, resume: bool = False, force: bool = False) -> dict:
    """Train the localiser on every fold and write its out-of-fold report. A finished fold with the
    same settings is read back, not trained again; ``resume`` continues an unfinished one."""
    output_dir = Path(output_dir)
    layout = RunLayout(output_dir)
    remember_folds(layout, Path(folds_path))
    samples = localizer_samples(Path(data_dir))
    folds = read_folds(folds_path)
    samples = samples.merge(folds, on="study_id")
    if samples.empty:
        raise SpinegradeError(f"{data_dir}: no study with spinal canal points to train the localiser on")
    images, meta, field_mm = prepare_localizer_data(samples, config.image_size)
    if meta.empty:
        raise SpinegradeError(f"{data_dir}: none of the {len(samples)} labelled spinal canal slices could be read")
    device_ = select_device(device)
    predictions = np.full((len(meta), len(LEVELS), 2), np.nan)
    for fold in sorted(meta["fold"].unique()):
        held = meta["fold"].to_numpy() == fold
        predictions[held] = train_localizer_fold(config, images, meta, field_mm, int(fold), output_dir, device_,
                                                 resume=resume, force=force)
    offsets = meta["slice_index"] - meta["stack_length"].map(middle_index)
    offset = int(offsets.mode().iloc[0])
    # Out-of-fold slice choice uses the offset of the training folds only.
    chosen = np.zeros(len(meta), dtype=int)
    per_fold = {}
    for fold in meta["fold"].unique():
        held = meta["fold"].to_numpy() == fold
        per_fold[int(fold)] = int(offsets[~held].mode().iloc[0]) if (~held).any() else offset
        chosen[held] = np.clip(meta["stack_length"][held].map(middle_index) + per_fold[int(fold)], 0,
                               meta["stack_length"][held] - 1)
    # Written last: its presence marks a finished localiser.
    write_text_atomic(layout.localizer_dir(GROUP, existing=False) / "slice_choice.json", json.dumps({
        "offset_from_middle": offset, "offset_from_middle_per_fold": per_fold,
        "offset_counts": {int(k): int(v) for k, v in offsets.value_counts().sort_index().items()}}, indent=1))
    return write_localizer_report(meta, predictions, chosen, config.image_size, output_dir)


def write_localizer_report(meta: pd.DataFrame, predictions: np.ndarray, chosen: np.ndarray, size: int,
                           output_dir: Path) -> dict:
    errors = _errors_mm(predictions, meta, size)
    pixels = _in_pixels(predictions, meta, size)
    rows = []
    for i, r in enumerate(meta.itertuples()):
        for k, level in enumerate(LEVELS):
            rows.append({"study_id": r.study_id, "level": level, "fold": r.fold,
                         "x": pixels[i, k, 0], "y": pixels[i, k, 1],
                         "x_label": getattr(r, f"{level}_x"), "y_label": getattr(r, f"{level}_y"),
                         "error_mm": errors[i, k], "slice_chosen": chosen[i], "slice_labelled": r.slice_index})
    results = RunLayout(output_dir).results
    results.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(pd.DataFrame(rows), results / f"localizer_{GROUP}_oof.csv")
    within_one = float((np.abs(chosen - meta["slice_index"].to_numpy()) <= 1).mean())
    exact = float((chosen == meta["slice_index"].to_numpy()).mean())
    report = {"studies": len(meta), "slice_within_one": within_one, "slice_exact": exact, "per_level": {}}
    for k, level in enumerate(LEVELS):
        e = errors[:, k][np.isfinite(errors[:, k])]
        report["per_level"][level] = {"median_mm": float(np.median(e)) if len(e) else None,
                                      "p90_mm": float(np.percentile(e, 90)) if len(e) else None, "points": int(len(e))}
    finite = errors[np.isfinite(errors)]
    report["all_levels"] = {"median_mm": float(np.median(finite)), "p90_mm": float(np.percentile(finite, 90))}
    write_text_atomic(results / f"localizer_{GROUP}_report.json", json.dumps(report, indent=1))
    log.info(f"localizer out-of-fold over {len(meta)} studies: slice within one of the labelled {within_one:.1%} "
        f"(exact {exact:.1%}); point error median {report['all_levels']['median_mm']:.2f} mm, "
        f"90th percentile {report['all_levels']['p90_mm']:.2f} mm")
    for level, v in report["per_level"].items():
        if v["points"]:
            log.info(f"  {level_title(level)}: median {v['median_mm']:.2f} mm, 90th percentile {v['p90_mm']:.2f} mm ({v['points']} points)")
    return report


# --- inference ----------------------------------------------------------------------------------

class LocalizerEnsemble:
    """Every fold's localiser, averaged: the same models whatever study comes."""

    def __init__(self, root: str | Path, device=None, folds: list[int] | None = None):
        """``root``: the locator's folder (``RunLayout.localizer_dir``); ``folds`` restricts the ensemble
        to those fold models (for out-of-fold use)."""
        root = Path(root)
        folds_found = sorted(p.parent for p in root.glob("fold*/best.safetensors"))
        folds = [f for f in folds_found if folds is None or int(f.name.removeprefix("fold")) in folds]
        if not folds:
            raise SpinegradeError(f"{root}: no trained localiser (run `spinegrade train-localizer` / `make train-localizer`)")
        self.device = select_device(device)
        self.models, self.size, fields = [], None, set()
        for folder in folds:
            spec = json.loads((folder / "localizer.json").read_text())
            model = LevelLocalizer(LocalizerSpec(spec["backbone"], spec.get("channels", 64),
                                                 feature_levels=spec.get("feature_levels", 3)))
            load_state(model, folder / "best.safetensors")
            self.models.append(model.to(self.device).eval())
            self.size = int(spec["image_size"])
            fields.add(spec.get("field_mm"))  # absent: a localiser that saw each slice squashed
        if len(fields) > 1:
            raise SpinegradeError(f"{root}: fold localisers were trained on different fields ({sorted(map(str, fields))} mm); "
                                  "train the localiser again")
        self.field_mm = fields.pop()
        choice = root / "slice_choice.json"
        if not choice.is_file():
            raise SpinegradeError(f"{root}: the localiser's training did not finish (no slice_choice.json)")
        info = json.loads(choice.read_text())
        self.offset = info["offset_from_middle"]
        if folds is not None and len(folds) == 1:  # out of fold: the offset those training folds gave
            self.offset = info.get("offset_from_middle_per_fold", {}).get(str(folds[0]), self.offset)

    def choose_slice(self, stack: Stack) -> int:
        return int(np.clip(middle_index(len(stack)) + self.offset, 0, len(stack) - 1))

    def locate(self, stack: Stack) -> LocatedLevels:
        k = self.choose_slice(stack)
        s = stack.slices[k]
        pixels = load_pixels(s)  # only this slice is decoded
        view = (SquareView.fitted(pixels, s.pixel_spacing, self.size, self.field_mm) if self.field_mm
                else SquareView.squashed(pixels.shape, self.size))
        tensor = torch.from_numpy(np.ascontiguousarray(view.render(pixels)))[None, None]  # uint8: the model normalises
        with torch.inference_mode(), autocast(self.device):
            normalised = np.mean([m(tensor.to(self.device)).float().cpu().numpy()[0] for m in self.models], axis=0)
        points = np.stack(view.to_pixels(normalised[:, 0], normalised[:, 1]), axis=1)
        return LocatedLevels(k, points)
