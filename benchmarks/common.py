"""What the benchmark scripts share: the data they measure on, and how they report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from spinegrade.data.synthetic import SynthSettings, write_dataset


def add_data_arguments(parser: argparse.ArgumentParser, studies: int, sizes: tuple[int, int] = (384, 640)) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="a dataset in the RSNA layout (the real one, say); default: synthesise one")
    parser.add_argument("--studies", type=int, default=studies, help="studies to synthesise without --data-dir")
    parser.add_argument("--image-size", dest="synth_size", type=int, nargs=2, default=sizes, metavar=("MIN", "MAX"),
                        help="pixel sizes of synthesised series (default: the real data's usual 384 to 640)")


def benchmark_data(args: argparse.Namespace, scratch: Path) -> Path:
    """``--data-dir``, or a synthetic dataset written under ``scratch`` (same seed: same files)."""
    if args.data_dir is not None:
        return args.data_dir
    target = scratch / "data"
    write_dataset(target, SynthSettings(studies=args.studies, test_studies=1, seed=3, image_size=tuple(args.synth_size)))
    return target


# make demo's data and its grading models' settings per group (Makefile: DEMO_DATA, DEMO_FOLDS,
# DEMO_TRAIN_FLAGS, DEMO_FORAMINAL_FLAGS, DEMO_SUBARTICULAR_FLAGS), on the efficientnet_lite0 config
DEMO_DATA = Path("input/demo/rsna-2024-lumbar-spine-degenerative-classification")
DEMO_FOLDS = Path("input/demo/folds.csv")
DEMO_OUTPUT = Path("runs/demo")  # Makefile: DEMO_OUTPUT
DEMO_GRADING = {"spinal": {"num_epochs": 5}, "foraminal": {"num_epochs": 4, "image_size": 96},
                "subarticular": {"num_epochs": 4, "image_size": 96}}
# each group's competition terms
TERMS = {"spinal": ["spinal", "any_severe_spinal"], "foraminal": ["foraminal"], "subarticular": ["subarticular"]}


def add_run_arguments(parser: argparse.ArgumentParser, split: bool = False) -> None:
    """``--data-dir`` and ``--output-dir`` (a trained run), by default ``make demo``'s; ``split``: also
    ``--split``, the split whose studies are measured (default test)."""
    parser.add_argument("--data-dir", type=Path, default=DEMO_DATA)
    parser.add_argument("--output-dir", type=Path, default=DEMO_OUTPUT)
    if split:
        parser.add_argument("--split", default="test")


def machine() -> dict:
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch_threads": torch.get_num_threads()}


@contextmanager
def logged_lines():
    """The messages the ``spinegrade`` logger emits (INFO and up) while the block runs, in a list."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("spinegrade")
    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# Where each benchmark keeps its latest figures (benchmarks/results/<script>.json), cited by the docs;
# SPINEGRADE_BENCHMARK_RESULTS points elsewhere (the test suite's tiny runs never overwrite them).
RESULTS = Path(os.environ.get("SPINEGRADE_BENCHMARK_RESULTS") or Path(__file__).resolve().parent / "results")


def report(figures: dict, out: Path | None = None) -> None:
    """The last line of every benchmark: its figures as JSON, also written to ``out`` (default
    ``RESULTS/<script>.json``)."""
    figures = {**figures, **machine()}
    out = out or RESULTS / f"{Path(sys.argv[0]).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))
