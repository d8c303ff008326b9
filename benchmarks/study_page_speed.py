"""The study page's cost with and without its evidence maps: `spinegrade predict STUDY_DIR` per study.

For each study folder of a split (any folder of DICOM files would do), the page is made with and
without evidence maps, the two interleaved in one run so that both meet the same machine state.
Prints the median seconds per study each way, the maps' own time (timed inside the page) and the
ratio of the two medians. The page loads its models for every study (one study per command), so its
time is not the split's per-study figure (predict_speed.py). The last line is JSON. Defaults point
at `make demo`'s outputs.

    python benchmarks/study_page_speed.py [--data-dir D] [--output-dir OUT] [--studies 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import add_run_arguments, logged_lines, report
from spinegrade.study_page import predict_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, split=True)
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    folders = sorted(p for p in (args.data_dir / f"{args.split}_images").iterdir() if p.is_dir())[:args.studies]
    seconds: dict[bool, list[float]] = {False: [], True: []}
    maps_seconds, maps = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for folder in folders:
                for evidence in ((False, True) if repeat % 2 == 0 else (True, False)):
                    started = time.perf_counter()
                    with logged_lines():
                        result = predict_study(folder, args.output_dir, out_dir=Path(scratch) / f"{folder.name}-{evidence}",
                                               device="cpu", evidence=evidence)
                    seconds[evidence].append(time.perf_counter() - started)
                    if evidence:
                        maps_seconds.append(result["evidence"]["seconds"])
                        maps.append(sum(len(t["evidence"]) for t in result["targets"]))
    plain, with_maps = statistics.median(seconds[False]), statistics.median(seconds[True])
    result = {
        "benchmark": "study_page_speed", "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only'}",
        "studies": len(folders), "repeats": args.repeats, "maps_per_study_median": statistics.median(maps),
        "seconds_per_study_without_maps_median": plain,
        "seconds_per_study_with_maps_median": with_maps,
        "maps_seconds_per_study_median": statistics.median(maps_seconds),
        "with_over_without": with_maps / plain,
    }
    print(f"study page: {plain:.2f} s per study without evidence maps, {with_maps:.2f} s with them "
          f"({result['with_over_without']:.2f}x; the maps themselves {result['maps_seconds_per_study_median']:.2f} s for "
          f"{result['maps_per_study_median']:g} crops), medians of {len(seconds[True])} pages each way, interleaved")
    report(result)


if __name__ == "__main__":
    main()
