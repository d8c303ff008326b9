"""The Kaggle kernel's budget with the published ensemble: every backbone x every fold x every group.

With six backbones, five folds and three condition groups the kernel runs 90 classifiers (plus the
locators) on every test study: 25 crops or slices a study (5 spinal levels, 10 foramina, 10 lateral
recesses), each through 30 fold models of its group. This script measures, for each published
config at its own input size:

- the CPU seconds per image of one forward pass (median of ``--repeats`` batches of ``--batch``,
  on this machine's cores), with the weights random (no download: speed does not depend on them);
- the FLOPs per image (``torch.utils.flop_counter``: two per multiply-add), from which the time on a GPU is
  *projected* at an assumed sustained rate (``--gpu-tflops``, default 8 TFLOP/s: about an eighth of a
  Kaggle T4's half-precision peak; no GPU was at hand to measure it);
- the size of the weights in the models dataset (safetensors, float32).

It then projects the kernel's time per 1,000 studies on Kaggle's CPU (``--kaggle-cpu-cores``, the
measured per-core rate scaled to that many cores) and GPU, adds the reading and locating time
measured by ``predict_speed.py`` (``benchmarks/results/predict_speed.json``, when present), and
says how many folds per model fit the competition's 9-hour limit: the cut
``spinegrade kernel --folds-per-model K`` applies. Left out, and small beside the forward passes of
the large backbones: making each image (once per backbone's preprocessing) and loading the 90 models once.

    python benchmarks/kernel_budget.py                 # the six published configs
    python benchmarks/kernel_budget.py --configs resnet18 --image-size 64 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, report  # noqa: E402

from spinegrade.config import load_config  # noqa: E402
from spinegrade.constants import GROUPS, LEVELS  # noqa: E402
from spinegrade.models.classifier import LevelClassifier, ModelSpec  # noqa: E402

PUBLISHED = ["vit", "swin", "beit", "efficientnet", "resnet152", "convnext"]
KAGGLE_HOURS = 9.0
# Images a study sends through each fold model of a group: a level per point, both sides where there are two.
IMAGES_PER_STUDY = {g: len(LEVELS) * len(spec.conditions) for g, spec in GROUPS.items()}


def measure(name: str, image_size: int | None, batch: int, repeats: int) -> dict:
    config = load_config(name, {"pretrained": False})
    size = image_size or config.image_size
    model = LevelClassifier(ModelSpec(config.backbone, config.level_embeddings, tuple(config.hidden_sizes),
                                      config.dropout)).eval()
    images = torch.randint(0, 255, (batch, 1, size, size), dtype=torch.uint8)
    levels = torch.arange(batch) % len(LEVELS)
    with torch.inference_mode():
        model(images[:1], levels[:1])  # warm-up
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(images, levels)
            seconds.append((time.perf_counter() - t0) / batch)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            model(images[:1], levels[:1])
    parameters = sum(p.numel() for p in model.parameters())
    return {"config": name, "backbone": config.backbone, "image_size": size,
            "cpu_seconds_per_image_median": statistics.median(seconds), "gflops_per_image": counter.get_total_flops() / 1e9,
            "weights_mb": parameters * 4 / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=PUBLISHED)
    parser.add_argument("--image-size", type=int, default=None, help="default: each config's own")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--kaggle-cpu-cores", type=int, default=4)
    parser.add_argument("--gpu-tflops", type=float, default=8.0, help="assumed sustained rate of the kernel's GPU")
    args = parser.parse_args()

    rows = [measure(name, args.image_size, args.batch, args.repeats) for name in args.configs]
    for r in rows:
        print(f"{r['config']:14s} {r['image_size']:4d} px  {r['cpu_seconds_per_image_median'] * 1000:8.1f} ms/image (CPU here)"
              f"  {r['gflops_per_image']:7.2f} GFLOP/image  {r['weights_mb']:7.1f} MB")
    images = sum(IMAGES_PER_STUDY.values())
    cores = torch.get_num_threads()
    per_fold_cpu = sum(r["cpu_seconds_per_image_median"] for r in rows) * images * cores / args.kaggle_cpu_cores
    per_fold_gpu = sum(r["gflops_per_image"] for r in rows) * images / (args.gpu_tflops * 1000)
    speed = RESULTS / "predict_speed.json"
    read = json.loads(speed.read_text()).get("read_and_locate_seconds_per_study_median", 0.0) if speed.is_file() else 0.0
    if not speed.is_file():
        print(f"no {speed}: reading and locating left out of the projection (run predict_speed.py first)")
    budget = KAGGLE_HOURS * 3600 / args.studies  # seconds a study may take
    projection = {}
    for device, per_fold in (("cpu", per_fold_cpu), ("gpu", per_fold_gpu)):
        hours = {k: (read + per_fold * k) * args.studies / 3600 for k in range(1, args.folds + 1)}
        fits = [k for k in hours if read + per_fold * k <= budget]
        projection[device] = {"hours_per_studies": {str(k): round(h, 2) for k, h in hours.items()},
                              "folds_per_model_that_fit": max(fits) if fits else 0}
        print(f"{device}: {args.studies} studies with {len(rows)} backbones x {len(GROUPS)} groups: "
              + ", ".join(f"{k} fold(s) {h:.1f} h" for k, h in hours.items())
              + f"; fits in {KAGGLE_HOURS:g} h with {projection[device]['folds_per_model_that_fit']} fold(s) per model")
    size_gb = sum(r["weights_mb"] for r in rows) * args.folds * len(GROUPS) / 1000
    print(f"models dataset: {len(rows) * args.folds * len(GROUPS)} classifiers, {size_gb:.1f} GB")
    report({"benchmark": "kernel_budget", "rows": rows, "images_per_study": images, "folds": args.folds,
            "studies": args.studies, "kaggle_cpu_cores": args.kaggle_cpu_cores, "assumed_gpu_tflops": args.gpu_tflops,
            "read_and_locate_seconds_per_study": read, "projection": projection, "models_dataset_gb": round(size_gb, 2),
            "classifiers": len(rows) * args.folds * len(GROUPS)})


if __name__ == "__main__":
    main()
