"""Is training limited by the model alone? Loader, model and epoch throughput on this machine.

On the same samples (spinal canal levels of --data-dir, or of a synthetic set with the real data's image
sizes; whole slices at --model-size, the published input):

* loader: samples/s of spinegrade's data path (memory-mapped cache, albumentations flip + rotation +
  normalisation, the training Dataset and DataLoader), one process unless --workers;
* published: samples/s of the published method's data path, which decodes the DICOM file with pydicom
  and applies PIL/torchvision transforms for every sample of every epoch (same loader settings);
* compute: samples/s of the model's forward + backward + optimiser step on a batch already in memory;
* epoch: wall time of a real training epoch (loader feeding the model through the trainer's own step)
  over the compute-only time for the same samples. 1.00 means the data path costs nothing.

Medians over --repeats; ratios are taken within one run. The last line is JSON.

    python benchmarks/loader_speed.py [--data-dir D] [--backbone resnet18] [--model-size 224] [--samples 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from common import add_data_arguments, benchmark_data, report
from spinegrade.config import TrainConfig
from spinegrade.constants import GROUPS
from spinegrade.data.dataset import LevelDataset, build_transform, init_worker
from spinegrade.data.index import build_index
from spinegrade.data.preprocess import PreprocessSettings, build_cache
from spinegrade.models.classifier import LevelClassifier, ModelSpec, apply_freezing, input_statistics
from spinegrade.train import EpochSampler, SeededDataset, train_step

GROUP = TrainConfig().group  # what the models grade
SPINAL = GROUPS[GROUP].conditions[0]  # its condition


class PublishedDataset(Dataset):
    """The published data path: every sample read and decoded from DICOM, then PIL transforms."""

    def __init__(self, paths: list[str], levels: np.ndarray, targets: np.ndarray, size: int, mean, std):
        self.paths, self.levels, self.targets = paths, levels, targets
        self.transform = transforms.Compose([
            transforms.Resize((size, size)), transforms.RandomHorizontalFlip(), transforms.RandomRotation(15),
            transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        pixels = pydicom.dcmread(self.paths[i]).pixel_array.astype(np.float32)
        pixels = (pixels - pixels.min()) / max(float(pixels.max() - pixels.min()), 1e-6) * 255
        image = Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
        return {"image": self.transform(image), "level": torch.tensor(self.levels[i]),
                "target": torch.tensor(self.targets[i]), "index": torch.tensor(i)}


def drain(loader: DataLoader) -> float:
    """Seconds to draw every batch of one epoch."""
    started = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, studies=52)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--model-size", dest="image_size", type=int, default=224, help="model input, pixels")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for both data paths")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = LevelClassifier(ModelSpec(args.backbone))
    apply_freezing(model, True, 32)
    mean, std = input_statistics(model.backbone)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = benchmark_data(args, Path(tmp))
        samples = build_index(data_dir, check_images=False).usable(SPINAL).head(args.samples).reset_index(drop=True)
        settings = PreprocessSettings(GROUP, "full", args.image_size, 48.0)
        started = time.perf_counter()
        cache = build_cache(samples, settings, Path(tmp) / "cache")
        cache_seconds = time.perf_counter() - started
        table = cache.samples
        n = len(table)
        levels, targets = table["level_index"].to_numpy(), table["severity"].to_numpy()
        ours = SeededDataset(LevelDataset(cache.images, levels, targets, build_transform(True)), seed=0)
        sampler = EpochSampler(n, seed=0, shuffle=True)
        loader = DataLoader(ours, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                            persistent_workers=args.workers > 0, worker_init_fn=init_worker)
        published = DataLoader(PublishedDataset(list(table["image_path"]), levels, targets, args.image_size, mean, std),
                               batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
        criterion = nn.CrossEntropyLoss()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        device = torch.device("cpu")
        batch = next(iter(loader))
        model.train()
        train_step(model, batch, criterion, optimizer, device)  # warm-up
        loader_s, published_s, compute_s, epoch_s = [], [], [], []
        steps = -(-n // args.batch_size)
        for repeat in range(args.repeats):
            sampler.set_epoch(repeat)
            loader_s.append(n / drain(loader))
            published_s.append(n / drain(published))
            started = time.perf_counter()
            for _ in range(steps):
                train_step(model, batch, criterion, optimizer, device)
            compute_s.append(steps * len(batch["target"]) / (time.perf_counter() - started))
            started = time.perf_counter()
            for b in loader:
                train_step(model, b, criterion, optimizer, device)
            epoch_s.append(time.perf_counter() - started)
    loader_rate, published_rate = statistics.median(loader_s), statistics.median(published_s)
    compute_rate, epoch = statistics.median(compute_s), statistics.median(epoch_s)
    ratio = epoch / (n / compute_rate)
    print(f"{n} samples, {args.backbone} at {args.image_size}, batch {args.batch_size}, {args.workers} workers, "
          f"{torch.get_num_threads()} torch threads; medians of {args.repeats}")
    print(f"loader (spinegrade)     {loader_rate:8.1f} samples/s")
    print(f"loader (published path) {published_rate:8.1f} samples/s   spinegrade is {loader_rate / published_rate:.1f}x faster")
    print(f"model compute only      {compute_rate:8.1f} samples/s   loader / compute {loader_rate / compute_rate:.1f}")
    print(f"epoch wall / compute    {ratio:8.3f}   (1.00: the data path costs nothing)")
    print(f"cache build             {cache_seconds:8.1f} s once for {n} samples")
    report({"benchmark": "loader_speed", "samples": n, "backbone": args.backbone, "image_size": args.image_size,
            "data": str(args.data_dir or f"synthetic, {args.studies} studies, {args.synth_size[0]}-{args.synth_size[1]} px"),
            "workers": args.workers, "repeats": args.repeats, "loader_samples_per_s": loader_rate,
            "published_samples_per_s": published_rate, "speedup_over_published": loader_rate / published_rate,
            "compute_samples_per_s": compute_rate, "epoch_over_compute": ratio, "cache_seconds": cache_seconds})


if __name__ == "__main__":
    main()
