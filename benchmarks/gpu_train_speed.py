"""Training images/s of each backbone on this GPU, fed by the real loader against tensors already on the GPU.

For each config (default: the method's six at their own settings, batch 32, bf16, channels-last,
backbone frozen but for its last 32 tensors), it times windows of --steps optimisation steps through
the trainer's own step and tally, interleaved --repeats times: with batches from the real data path
(memory-mapped cache, albumentations, workers, pinned memory, non-blocking copies), with one batch
already on the device, and the loader alone (no model) for its own capacity. The ratio fed/resident
(median of the per-repeat ratios) is the share of the GPU's speed that the data path lets through
(goal: at least 0.9). Each loader in --loaders is measured on the same model: ``ring``, the loader
the trainer uses (batches cross from the workers through shared slots, ``spinegrade.data.loader``),
and ``dataloader``, PyTorch's DataLoader; both with this script's --workers and a prefetch of 4 batches
per worker (the trainer: --num_workers, 2). Their order alternates from one backbone to the next. Random weights (no download); peak GPU memory per
backbone shows it fits. The last line is JSON.

    python benchmarks/gpu_train_speed.py [--configs vit swin ...] [--steps 30] [--workers 8] [--loaders ring]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from common import add_data_arguments, benchmark_data, report
from spinegrade.config import load_config
from spinegrade.constants import GROUPS
from spinegrade.data.dataset import LevelDataset, build_transform, init_worker
from spinegrade.data.index import build_index
from spinegrade.data.loader import batch_loader
from spinegrade.data.preprocess import PreprocessSettings, build_cache
from spinegrade.models.classifier import LevelClassifier, ModelSpec, apply_freezing, freeze_norm_statistics
from spinegrade.device import select_device
from spinegrade.engine import compiled
from spinegrade.train import EpochSampler, EpochTally, SeededDataset, train_step

METHOD = ("vit", "swin", "beit", "efficientnet", "resnet152", "convnext")
LOADERS = ("ring", "dataloader")


def make_loader(kind: str, dataset, sampler, config, workers: int, prefetch: int, device: torch.device):
    """The trainer's loader (``ring``), or PyTorch's DataLoader with the same settings."""
    if kind == "ring":
        return batch_loader(dataset, config.batch_size, sampler, image_shape=(1, config.image_size, config.image_size),
                            workers=workers, pin_memory=device.type == "cuda", drop_last=True, prefetch=prefetch)
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=prefetch if workers else None, worker_init_fn=init_worker)


class Epochs(Sampler[int]):
    """Consecutive epochs of the trainer's sampler as one: a real epoch is hundreds of batches, the
    benchmark's data set a few, and a measurement that crossed epoch boundaries would time the loader's
    restarts rather than its steady state."""

    def __init__(self, sampler: EpochSampler, epochs: int):
        self.sampler, self.epochs = sampler, epochs

    def __iter__(self):
        for epoch in range(self.epochs):
            self.sampler.set_epoch(epoch)
            yield from self.sampler

    def __len__(self) -> int:
        return len(self.sampler) * self.epochs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_window(net, batches, steps: int, criterion, optimizer, device) -> float:
    """Images per second over ``steps`` of the trainer's steps (step and tally), batches from ``batches``."""
    sync(device)
    started = time.perf_counter()
    images, tally = 0, EpochTally()
    for _ in range(steps):
        batch = next(batches)
        tally.add(*train_step(net, batch, criterion, optimizer, device), batch["index"])
        images += len(batch["target"])
    tally.totals()
    sync(device)
    return images / (time.perf_counter() - started)


def loading_window(batches, steps: int, queued: int) -> float:
    """Images per second the loader makes with no model to feed: the queue it filled meanwhile is
    emptied first, so the window times production, not batches already made."""
    for _ in range(queued):
        next(batches)
    started = time.perf_counter()
    images = sum(len(next(batches)["target"]) for _ in range(steps))
    return images / (time.perf_counter() - started)


def measure(net, batches, resident: dict, warmup: int, queued: int, steps: int, repeats: int, criterion, optimizer,
            device) -> dict[str, list[float]]:
    """Per repeat, in turn: the model fed by the loader, the loader alone, the model on a batch already
    on the device. Interleaving puts each pair under the same conditions of a shared machine (the
    ratio is taken per repeat). The loader's window follows the loader-alone window, which leaves the
    prefetch queue empty, so it never times batches made while the model ran on resident data."""
    for _ in range(warmup):
        train_step(net, next(batches), criterion, optimizer, device)
    figures: dict[str, list[float]] = {"fed": [], "alone": [], "resident": []}
    on_device = iter(lambda: resident, None)
    for _ in range(repeats):
        figures["resident"].append(training_window(net, on_device, steps, criterion, optimizer, device))
        figures["alone"].append(loading_window(batches, steps, queued))
        figures["fed"].append(training_window(net, batches, steps, criterion, optimizer, device))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, studies=40)
    parser.add_argument("--configs", nargs="+", default=list(METHOD))
    parser.add_argument("--steps", type=int, default=30, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per feed (medians are quoted)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--device", default=None)
    parser.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS),
                        help="the trainer's ring of shared slots and/or PyTorch's DataLoader as it stands")
    parser.add_argument("--compile", default="off", help="off, on, or a torch.compile backend")
    parser.add_argument("--model-size", type=int, default=None, help="override every config's image size")
    parser.add_argument("--batch-size", type=int, default=None, help="override every config's batch size")
    args = parser.parse_args()
    device = select_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = benchmark_data(args, Path(tmp))
        usable = build_index(data_dir, check_images=False).usable()
        table = usable[usable["condition"].isin(GROUPS[load_config(args.configs[0]).group].conditions)]
        for name in args.configs:
            overrides = {"pretrained": False, "image_size": args.model_size, "batch_size": args.batch_size}
            config = load_config(name, {k: v for k, v in overrides.items() if v is not None})
            cache = build_cache(table.reset_index(drop=True), PreprocessSettings.from_config(config),
                                Path(tmp) / "cache")
            levels, targets = cache.samples["level_index"].to_numpy(), cache.samples["severity"].to_numpy()
            dataset = SeededDataset(LevelDataset(cache.images, levels, targets, build_transform(True),
                                                 image_size=config.image_size), config.seed)
            prefetch = 4
            warmup = args.workers * prefetch + 3
            queued = args.workers * prefetch
            batches_needed = warmup + 1 + args.repeats * (queued + 2 * args.steps)
            epochs = math.ceil(batches_needed * config.batch_size / len(dataset)) + 1
            sampler = Epochs(EpochSampler(len(dataset), config.seed, shuffle=True), epochs)
            model = LevelClassifier(ModelSpec(config.backbone, config.level_embeddings, tuple(config.hidden_sizes),
                                              config.dropout)).to(device)
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
                torch.cuda.reset_peak_memory_stats()
            apply_freezing(model, config.freeze_backbone, config.unfreeze_last_n)
            model.train()
            freeze_norm_statistics(model)
            net = compiled(model, args.compile)
            criterion = nn.CrossEntropyLoss()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
            for kind in (args.loaders if len(rows) // len(args.loaders) % 2 == 0 else args.loaders[::-1]):
                loader = make_loader(kind, dataset, sampler, config, args.workers, prefetch, device)
                batches = iter(loader)
                resident_batch = {k: v if k == "index" else v.to(device) for k, v in next(batches).items()}
                got = measure(net, batches, resident_batch, warmup, queued, args.steps, args.repeats, criterion,
                              optimizer, device)
                ratio = statistics.median(f / r for f, r in zip(got["fed"], got["resident"]))
                fed, resident, alone = (statistics.median(got[k]) for k in ("fed", "resident", "alone"))
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                rows.append({"config": name, "backbone": config.backbone, "loader": kind,
                             "image_size": config.image_size, "batch_size": config.batch_size,
                             "loader_images_per_s": fed, "resident_images_per_s": resident, "ratio": ratio,
                             "loader_alone_images_per_s": alone, "peak_gib": peak})
                print(f"{name:13s} {kind:10s} fed {fed:7.1f} img/s  on-device {resident:7.1f} img/s  "
                      f"ratio {ratio:.2f}  loader alone {alone:7.1f} img/s  peak {peak:.1f} GiB", flush=True)
                del batches, loader
            del model, net, optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report({"benchmark": "gpu_train_speed", "steps": args.steps, "repeats": args.repeats, "workers": args.workers,
            "compile": args.compile, "rows": rows,
            "min_ratio": {kind: min(r["ratio"] for r in rows if r["loader"] == kind) for kind in args.loaders}})


if __name__ == "__main__":
    main()
