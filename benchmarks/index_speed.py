"""Data report speed: DICOM headers read per second when `spinegrade index` checks every file of every
listed series, in one process and shared out over every core, and the projected time for the real
dataset's 147,000 files.

The files are those the index reads (`data.index._series_files`: every file of every listed Sagittal
T1, Sagittal T2/STIR and Axial T2 series) and the function is the index's own (`_check_readable`,
headers only unless --decode-pixels). Medians over --repeats; the ratio is taken within each repeat.
Prints its figures; the last line, JSON, is also written to benchmarks/results/index_speed.json.

    python benchmarks/index_speed.py [--data-dir D] [--studies 12] [--repeats 3] [--decode-pixels]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import add_data_arguments, benchmark_data, report
from spinegrade.data.index import _check_readable, _series_files, build_index

REAL_FILES = 147_000  # DICOM files in the competition's train_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, studies=12, sizes=(256, 384))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-pixels", action="store_true", help="decode pixels too, as `index --decode-pixels`")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file (default: benchmarks/results/index_speed.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = benchmark_data(args, Path(tmp))
        series = build_index(data_dir, check_images=False).series
        files = sorted(_series_files(series, data_dir, "train"))
        cores = os.cpu_count() or 1
        one, many, ratios = [], [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            _check_readable(files, args.decode_pixels, workers=1)
            single = time.perf_counter() - started
            started = time.perf_counter()
            _check_readable(files, args.decode_pixels, workers=cores)
            shared = time.perf_counter() - started
            one.append(len(files) / single)
            many.append(len(files) / shared)
            ratios.append(single / shared)
    rate = statistics.median(many)
    figures = {"files": len(files), "series": len(series), "decode_pixels": args.decode_pixels, "workers": cores,
               "one_process_files_per_s": statistics.median(one), "all_cores_files_per_s": rate,
               "all_cores_over_one": statistics.median(ratios), "repeats": args.repeats,
               "projected_minutes_147000_files": REAL_FILES / rate / 60}
    print(f"{len(files)} files: {figures['one_process_files_per_s']:.0f} headers/s in one process, {rate:.0f}/s on "
          f"{cores} cores ({figures['all_cores_over_one']:.2f}x); 147,000 files: "
          f"{figures['projected_minutes_147000_files']:.1f} min")
    report(figures, args.out)


if __name__ == "__main__":
    main()
