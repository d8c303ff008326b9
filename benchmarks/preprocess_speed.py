"""Preprocessing throughput: DICOM files decoded per second by the cache build (all cores) against a
single-process pydicom loop over the same files.

The cache build reads every slice of each labelled series (neighbouring slices are cached too), so both
sides decode the same files: the series folders of the spinal canal samples of --data-dir, or of a
synthetic set with the real data's image sizes. Medians over --repeats, each build into an empty cache;
the ratio is taken within each repeat. The last line is JSON.

    python benchmarks/preprocess_speed.py [--data-dir D] [--studies 24] [--workers 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from common import add_data_arguments, benchmark_data, report
from spinegrade.config import TrainConfig
from spinegrade.constants import GROUPS
from spinegrade.data.index import build_index
from spinegrade.data.preprocess import PreprocessSettings, build_cache

GROUP = TrainConfig().group  # what the models grade
SPINAL = GROUPS[GROUP].conditions[0]  # its condition


def pydicom_loop(files: list[Path]) -> float:
    """Seconds for the plain loop: read each file and decode its pixels, one process."""
    started = time.perf_counter()
    for path in files:
        np.asarray(pydicom.dcmread(path).pixel_array, dtype=np.float32)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, studies=24)
    parser.add_argument("--workers", type=int, default=0, help="cache build processes (0: every core)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = benchmark_data(args, Path(tmp))
        samples = build_index(data_dir, check_images=False).usable(SPINAL).reset_index(drop=True)
        series = sorted({Path(p).parent for p in samples["image_path"]})
        files = [f for s in series for f in sorted(s.glob("*.dcm"))]
        settings = PreprocessSettings(GROUP, "crop", 128, 48.0)
        ours, loop, ratios, per_study_kb = [], [], [], 0.0
        for _ in range(args.repeats):
            root = Path(tmp) / "cache"
            shutil.rmtree(root, ignore_errors=True)
            started = time.perf_counter()
            cache = build_cache(samples, settings, root, workers=args.workers)
            build = time.perf_counter() - started
            plain = pydicom_loop(files)
            ours.append(len(files) / build)
            loop.append(len(files) / plain)
            ratios.append(plain / build)
            per_study_kb = cache.images.nbytes / 1e3 / max(cache.samples["study_id"].nunique(), 1)
    workers = args.workers or os.cpu_count()
    print(f"{len(files)} DICOM files in {len(series)} series, {len(samples)} samples; medians of {args.repeats}")
    print(f"cache build, {workers} processes: {statistics.median(ours):8.1f} files/s (decode, window, crop, write)")
    print(f"pydicom loop, 1 process:         {statistics.median(loop):8.1f} files/s (decode only)")
    print(f"ratio {statistics.median(ratios):.2f}; cache size {per_study_kb:.0f} kB per study "
          f"({settings.image_size} px crops, {2 * settings.neighbours + 1} slices each)")
    report({"benchmark": "preprocess_speed", "files": len(files), "series": len(series), "workers": workers,
            "data": str(args.data_dir or f"synthetic, {args.studies} studies, {args.synth_size[0]}-{args.synth_size[1]} px"),
            "repeats": args.repeats, "cache_files_per_s": statistics.median(ours),
            "pydicom_files_per_s": statistics.median(loop), "ratio": statistics.median(ratios),
            "cache_kb_per_study": per_study_kb})


if __name__ == "__main__":
    main()
