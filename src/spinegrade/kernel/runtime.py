"""What the kernel runs on Kaggle: find the mounted inputs, predict, and always leave a valid submission.

A kernel that crashes scores nothing, so every failure falls back one step: a bad study gets prior
rows (inside :func:`predict_split`); a failure of the whole prediction (models unreadable, a broken
mount) gets the training prior for every row, logged loudly; without even a prior, uniform rows.
The script still exits 0 (Kaggle scores what it wrote), and says what fell back in ``STATUS_FILE``,
which the local rehearsal (``spinegrade kernel-run``) reads and fails on: a fallback of the whole
prediction, or a blended group that got no model row on any study (a study without a Sagittal T1
getting the prior for its foramina is by design, and says nothing).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from spinegrade.constants import COMPETITION, CONDITIONS, LEVELS, PROBABILITY_COLUMNS, row_id
from spinegrade.files import write_text_atomic
from spinegrade.kernel import MODELS_MARKER, STATUS_FILE
from spinegrade.logs import ROOT, get_logger, reset_logging, setup_logging

log = get_logger(__name__)


@contextmanager
def _kernel_logging():
    """Timestamped lines on stdout (where a Kaggle kernel's log, and ``spinegrade kernel-run``, read them)
    while the kernel runs, unless whoever called it has set up the spinegrade logger already."""
    logger = logging.getLogger(ROOT)
    if logger.handlers:
        yield
        return
    level = logger.level
    setup_logging(timestamps=True, stream=sys.stdout)
    try:
        yield
    finally:  # leave the process as it was (a test, a notebook calling run_kernel twice)
        reset_logging(level)


def find_input(root: Path, preferred: str, marker: str) -> Path | None:
    """``root/preferred`` when it holds ``marker``, else the first folder one or two levels down that does
    (mounts have moved between Kaggle versions; the competition's 147,000 files are never walked)."""
    if (root / preferred / marker).is_file():
        return root / preferred
    for pattern in (f"*/{marker}", f"*/*/{marker}"):
        found = sorted(root.glob(pattern))
        if found:
            return found[0].parent
    return None


def test_study_ids(competition: Path | None) -> list[int]:
    """Every test study listed, from the series descriptions, else from the sample submission."""
    if competition is None:
        return []
    series = competition / "test_series_descriptions.csv"
    if series.is_file():
        ids = pd.to_numeric(pd.read_csv(series)["study_id"], errors="coerce").dropna().astype(int)
        return sorted(set(ids))
    sample = competition / "sample_submission.csv"
    if sample.is_file():
        return sorted({int(r.split("_")[0]) for r in pd.read_csv(sample)["row_id"]})
    return []


def fallback_submission(competition: Path | None, models: Path | None) -> pd.DataFrame:
    """The training prior on every row of every listed study (uniform when no prior can be had)."""
    from spinegrade.submit import prior_submission

    rows = [row_id(s, c, lv) for s in test_study_ids(competition) for c in CONDITIONS for lv in LEVELS]
    try:
        return prior_submission(rows, competition, models)
    except Exception as exc:
        log.error(f"no training prior either ({type(exc).__name__}: {exc}); writing uniform probabilities")
        return pd.DataFrame([[r, 1 / 3, 1 / 3, 1 / 3] for r in rows], columns=["row_id", *PROBABILITY_COLUMNS])


def run_kernel(models_dataset: str = "", input_root: str | Path | None = None, working: str | Path | None = None,
               device: str | None = None) -> Path:
    """Predict the mounted test set with the mounted blend; returns the submission's path.

    Logs timestamped lines on stdout when the spinegrade logger has no handler yet (a Kaggle kernel)."""
    with _kernel_logging():
        return _run_kernel(models_dataset, input_root, working, device)


def _run_kernel(models_dataset: str, input_root: str | Path | None, working: str | Path | None,
                device: str | None) -> Path:
    import torch

    from spinegrade.blend import load_blends
    from spinegrade.constants import CONDITION_GROUP, parse_row_id
    from spinegrade.submit import predict_split, write_submission

    started = time.perf_counter()
    input_root = Path(input_root or os.environ.get("KAGGLE_INPUT", "/kaggle/input"))
    working = Path(working or os.environ.get("KAGGLE_WORKING", "/kaggle/working"))
    working.mkdir(parents=True, exist_ok=True)
    out = working / "submission.csv"
    competition = find_input(input_root, COMPETITION, "test_series_descriptions.csv")
    models = find_input(input_root, models_dataset, MODELS_MARKER)
    cuda = torch.cuda.is_available()
    log.info(f"spinegrade kernel: Python {sys.version.split()[0]}, torch {torch.__version__}, "
             f"{'GPU ' + torch.cuda.get_device_name(0) if cuda else 'CPU'}; competition {competition}, models {models}")
    fallback, silent = None, []
    try:
        if competition is None:
            raise FileNotFoundError(f"no test_series_descriptions.csv under {input_root}")
        if models is None:
            raise FileNotFoundError(f"no {MODELS_MARKER} under {input_root} (is the models dataset attached?)")
        blends = load_blends(models)
        per_backbone, submission = predict_split(competition, "test", models, blends=blends, out=out,
                                                 predictions_dir=working, device=device)
        studies = len(submission) // (len(CONDITIONS) * len(LEVELS))
        graded = {CONDITION_GROUP[parse_row_id(r)[1]] for r in per_backbone["row_id"]}
        silent = sorted(set(blends) - graded) if studies else []
        if silent:
            log.error(f"no model row at all for the {', '.join(silent)} group(s): every such row is the prior")
    except Exception as exc:  # the submission must be written whatever failed
        fallback = f"{type(exc).__name__}: {exc}"
        log.error(f"prediction failed, every row gets the training prior: {fallback}")
        log.error(traceback.format_exc())
        submission = fallback_submission(competition, models)
        sample_path = competition / "sample_submission.csv" if competition else None
        sample = pd.read_csv(sample_path) if sample_path and sample_path.is_file() else None
        write_submission(submission, out, sample)
        studies = len(submission) // (len(CONDITIONS) * len(LEVELS))
    elapsed = time.perf_counter() - started
    log.info(f"wrote {out}: {len(submission)} rows, {studies} studies, {elapsed:.1f} s "
             f"({elapsed / max(studies, 1):.2f} s per study including model loading)")
    write_text_atomic(working / STATUS_FILE, json.dumps({"fallback": fallback, "groups_without_model_rows": silent}))
    write_text_atomic(working / "kernel_timing.json", json.dumps(
        {"studies": studies, "seconds": elapsed, "device": torch.cuda.get_device_name(0) if cuda else "cpu"}))
    return out
