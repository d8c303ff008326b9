"""Training memory against the number of studies: a real `spinegrade train` run on N and on 4N studies.

The peak is sampled from /proc every 20 ms over the whole run (index, cache build, epochs). Two figures:
anonymous memory (what the process itself holds: tensors, tables, the model) and resident memory
including file-backed pages (the memory-mapped cache pages the kernel keeps cached, reclaimable at any
time). The goal is anonymous peak at 4N within 20% of N. The last line is JSON.

    python benchmarks/memory_scaling.py [--studies 20] [--factor 4] [--epochs 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report
from spinegrade.data.folds import make_folds, write_csv_atomic
from spinegrade.data.index import build_index
from spinegrade.data.synthetic import SynthSettings, write_dataset

CONFIG = """name: memory
backbone: resnet18
pretrained: false
input: crop
image_size: 64
batch_size: 16
num_workers: 0
"""


def status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def peak_training_memory(root: Path, studies: int, epochs: int) -> dict[str, float]:
    data = root / f"data{studies}"
    write_dataset(data, SynthSettings(studies=studies, test_studies=1, seed=9, image_size=(96, 128)))
    folds = root / f"folds{studies}.csv"
    write_csv_atomic(make_folds(build_index(data, check_images=False).labels_wide(), n_folds=3, seed=0), folds)
    config = root / "memory.yaml"
    config.write_text(CONFIG)
    command = [sys.executable, "-m", "spinegrade.cli", "train", "--models", str(config), "--fold", "0", "--data-dir",
               str(data), "--folds", str(folds), "--output-dir", str(root / f"out{studies}"), "--device", "cpu",
               "--num_epochs", str(epochs)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    anon = rss = 0
    started = time.perf_counter()
    while process.poll() is None:
        now = status_kb(process.pid)
        anon, rss = max(anon, now.get("RssAnon", 0)), max(rss, now.get("VmRSS", 0))
        time.sleep(0.02)
    if process.returncode != 0:
        raise SystemExit(f"training on {studies} studies failed:\n{process.stderr.read()[-2000:]}")
    return {"studies": studies, "anon_mb": anon / 1024, "rss_mb": rss / 1024, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = peak_training_memory(Path(tmp), args.studies, args.epochs)
        large = peak_training_memory(Path(tmp), args.studies * args.factor, args.epochs)
    growth = large["anon_mb"] / small["anon_mb"] - 1
    for run in (small, large):
        print(f"{run['studies']:4d} studies: peak anonymous {run['anon_mb']:7.1f} MB, resident {run['rss_mb']:7.1f} MB "
              f"({run['seconds']:.0f} s)")
    print(f"x{args.factor} studies: anonymous peak {growth:+.1%} (goal: within 20%)")
    report({"benchmark": "memory_scaling", "factor": args.factor, "small": small, "large": large,
            "anon_growth": growth, "rss_growth": large["rss_mb"] / small["rss_mb"] - 1})


if __name__ == "__main__":
    main()
