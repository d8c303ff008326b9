"""The submission: one row per target of every study, each group's blend of its backbones where they
graded it, else the training prior of its condition and level; checked as the competition would check
it, then written. ``predict_split`` grades a split (``predict.py``) and writes it; ``submit`` does so
with the OOF-tuned blend (``oof/blend.json``) and writes a manifest of what made it."""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.blend import Blend, blend_info, blends_for, combine, load_blends
from spinegrade.constants import (
    CONDITIONS,
    LABEL_COLUMNS,
    LEVELS,
    PROBABILITY_COLUMNS,
    SEVERITY_INDEX,
    parse_row_id,
    row_id,
)
from spinegrade.data.index import build_index, read_csv_checked
from spinegrade.device import select_device
from spinegrade.errors import SpinegradeError
from spinegrade.files import write_csv_atomic, write_text_atomic
from spinegrade.layout import RunLayout
from spinegrade.logs import get_logger
from spinegrade.metrics import competition_score, prior_for, prior_table
from spinegrade.predict import SplitGrades, grade_split
from spinegrade.study import Study, split_studies

log = get_logger(__name__)


def training_priors(data_dir: Path | None, output_dir: Path) -> pd.DataFrame:
    """Weight-scaled prior per (condition, level): from train.csv when at hand, else as saved at training."""
    if data_dir is not None and (Path(data_dir) / "train.csv").is_file():
        return prior_table(build_index(data_dir, check_images=False).table)
    saved = RunLayout(output_dir).priors
    if saved.is_file():
        return pd.read_csv(saved)
    raise SpinegradeError(f"no training prior: neither {Path(data_dir or '.') / 'train.csv'} nor {saved} exists")


def submission_frame(study_ids: list[int], grades: pd.DataFrame, blends: dict[str, Blend],
                     priors: pd.DataFrame) -> pd.DataFrame:
    """One row per target of every study: the blend of the group's backbones that graded it (their
    weights renormalised when some could not), else the training prior of its condition and level.
    ``grades``: ``predict.GRADE_COLUMNS``."""
    targets = pd.DataFrame([(s, c, lv) for s in study_ids for c in CONDITIONS for lv in LEVELS],
                           columns=["study_id", "condition", "level"])
    probs = prior_for(priors, targets)
    key = pd.MultiIndex.from_frame(targets)
    for group, blend in blends.items():
        names = [n for n, w in zip(blend.backbones, blend.weights) if w > 0]
        weight = np.array([w for w in blend.weights if w > 0])
        mine = grades[(grades["group"] == group) & grades["backbone"].isin(names)]
        if mine.empty:
            continue
        per_name = np.stack([mine[mine["backbone"] == n].set_index(["study_id", "condition", "level"])
                             [list(PROBABILITY_COLUMNS)].reindex(key).to_numpy(dtype=float) for n in names])
        present = np.isfinite(per_name).all(axis=2)  # (backbones, targets): which backbones graded each target
        for pattern in {tuple(col) for col in present.T if col.any()}:
            rows = (present.T == pattern).all(axis=1)
            used = np.array(pattern)
            probs[rows] = combine(list(per_name[used][:, rows]), weight[used] / weight[used].sum(), blend.mode,
                                  blend.temperature)
        graded = present.any(axis=0)  # calibrated together: the Severe factor compares a study's levels
        probs[graded] = blend.calibrate(probs[graded], targets["study_id"].to_numpy()[graded])
    ids = [row_id(s, c, lv) for s, c, lv in zip(targets["study_id"], targets["condition"], targets["level"])]
    return pd.DataFrame({"row_id": ids, **{c: probs[:, k] for k, c in enumerate(PROBABILITY_COLUMNS)}})


def check_submission(frame: pd.DataFrame, sample: pd.DataFrame | None = None) -> None:
    """Refuse a submission the competition would reject: missing or extra rows, NaN, negatives, bad sums."""
    if list(frame.columns) != ["row_id", *PROBABILITY_COLUMNS]:
        raise SpinegradeError(f"submission columns {list(frame.columns)}; expected row_id, {', '.join(PROBABILITY_COLUMNS)}")
    if frame["row_id"].duplicated().any():
        raise SpinegradeError(f"submission has duplicate row {frame.loc[frame['row_id'].duplicated(), 'row_id'].iloc[0]}")
    if sample is not None:
        missing = set(sample["row_id"]) - set(frame["row_id"])
        extra = set(frame["row_id"]) - set(sample["row_id"])
        if missing or extra:
            raise SpinegradeError(f"submission rows differ from sample_submission.csv: {len(missing)} missing "
                                  f"(e.g. {sorted(missing)[:1]}), {len(extra)} extra (e.g. {sorted(extra)[:1]})")
    p = frame[list(PROBABILITY_COLUMNS)].to_numpy(dtype=float)
    bad = ~np.isfinite(p).all(axis=1) | (p < 0).any(axis=1) | (np.abs(p.sum(axis=1) - 1) > 1e-4)
    if bad.any():
        raise SpinegradeError(f"submission row {frame.loc[bad, 'row_id'].iloc[0]}: probabilities must be finite, "
                              "non-negative and sum to 1")


def write_submission(frame: pd.DataFrame, path: Path, sample: pd.DataFrame | None = None) -> None:
    """Check, then write. ``frame`` holds every target of every listed study; when ``sample`` lists
    exactly those rows its order is used, and when it lists others (the shipped sample names one
    study, the hidden test set hundreds) the listed studies win and the mismatch is reported."""
    if sample is not None and set(sample["row_id"]) != set(frame["row_id"]):
        log.warning(f"sample_submission.csv lists {len(sample)} rows, the test series {len(frame)}; "
                    "writing a row for all 25 targets of every listed study")
        sample = None
    check_submission(frame, sample)
    if sample is not None:  # the sample's row order
        frame = frame.set_index("row_id").loc[sample["row_id"]].reset_index()
    write_csv_atomic(frame, path)


def predict_split(data_dir: str | Path, split: str, output_dir: str | Path, backbones: list[str] | None = None,
                  blends: dict[str, Blend] | None = None, out: str | Path | None = None, device: str | None = None,
                  predictions_dir: str | Path | None = None,
                  structured_reports: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predict every study of ``split``; write per-backbone predictions and a submission (each group's
    blend of its backbones, or their plain mean without one); with ``structured_reports`` (a folder),
    also one DICOM Structured Report per study there, ``<study_id>.dcm`` (``structured_report.py``).

    ``output_dir`` (where ``trained_models/`` is) is only read when ``out`` and ``predictions_dir``
    are given, so the models may sit on a read-only mount (a Kaggle dataset).
    Returns (per-backbone predictions, submission)."""
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    if structured_reports is not None:
        from spinegrade.structured_report import require_highdicom

        require_highdicom()  # before minutes of grading, not after
    layout = RunLayout(output_dir)
    predictions_dir = Path(predictions_dir) if predictions_dir else layout.predictions
    studies = split_studies(data_dir, split)
    grades = grade_split(studies, output_dir, blends or blends_for(output_dir, backbones), select_device(device))
    g = grades.grades
    per_backbone = pd.DataFrame({"row_id": [row_id(s, c, lv) for s, c, lv in zip(g["study_id"], g["condition"], g["level"])],
                                 "backbone": g["backbone"].to_numpy(),
                                 **{c: g[c].to_numpy(dtype=float) for c in PROBABILITY_COLUMNS}})
    write_csv_atomic(per_backbone, predictions_dir / f"{split}_per_backbone.csv")
    submission = submission_frame(grades.studies, g, grades.blends, training_priors(data_dir, output_dir))
    sample_path = data_dir / "sample_submission.csv"
    sample = pd.read_csv(sample_path) if split == "test" and sample_path.is_file() else None
    out = Path(out) if out else layout.submissions / f"{split}_predictions.csv"
    write_submission(submission, out, sample)
    log.info(f"{len(submission)} rows for {len(grades.studies)} studies written to {out} "
             f"(per backbone: {predictions_dir / f'{split}_per_backbone.csv'})")
    if structured_reports is not None:
        write_split_reports(studies, grades, submission, Path(structured_reports))
    return per_backbone, submission


def write_split_reports(studies: list[Study], grades: SplitGrades, submission: pd.DataFrame, folder: Path) -> list[Path]:
    """One structured report per study, ``folder/<study_id>.dcm`` (the folder's earlier reports removed
    first, so none is left from another run); a study whose report cannot be made (no readable source
    file to place it in its study, a header the report cannot copy) is named in the log and the others
    are written."""
    from spinegrade.findings import models_used, source_files, study_targets
    from spinegrade.structured_report import write_structured_report

    models, written = models_used(grades.blends), []
    if folder.is_dir():
        for old in folder.glob("*.dcm"):
            old.unlink()
    for study in studies:
        path = folder / f"{study.study_id}.dcm"
        try:
            written.append(write_structured_report(study_targets(study, grades, submission),
                                                   source_files(study, grades), models, path))
        except OSError as exc:  # the folder, not the study: every other report would fail the same way
            raise SpinegradeError(f"{path}: cannot write the structured report there ({exc})") from None
        except Exception as exc:  # a damaged source header, or one highdicom refuses: this study only
            log.warning(f"study {study.study_id}: no structured report ({type(exc).__name__}: {exc})")
    log.info(f"{len(written)} structured reports of {len(studies)} studies written to {folder}")
    return written


def scored_rows(submission: pd.DataFrame | str | Path, labels_csv: str | Path) -> pd.DataFrame:
    """A submission's rows beside their labels (train.csv's format, e.g. a synthetic dataset's answers),
    as :func:`metrics.competition_score` reads them; rows without a label are left out."""
    if not isinstance(submission, pd.DataFrame):
        submission = read_csv_checked(Path(submission), ["row_id", *PROBABILITY_COLUMNS])
    truth = read_csv_checked(Path(labels_csv), ["study_id", *LABEL_COLUMNS], dtypes={c: str for c in LABEL_COLUMNS})
    truth = truth.melt(id_vars="study_id", var_name="column", value_name="label")
    parsed = [parse_row_id(r) for r in submission["row_id"]]
    frame = submission.assign(study_id=[p[0] for p in parsed], condition=[p[1] for p in parsed],
                              column=[f"{p[1]}_{p[2]}" for p in parsed])
    frame = frame.merge(truth, on=["study_id", "column"], how="inner")
    frame["severity"] = frame["label"].map(SEVERITY_INDEX).fillna(-1).astype(int)
    return frame


def score_submission(submission: pd.DataFrame | str | Path, labels_csv: str | Path) -> dict[str, float]:
    """Competition terms of a submission against labels in train.csv's format, over the conditions whose
    labels are given."""
    return competition_score(scored_rows(submission, labels_csv))


def prior_submission(row_ids, data_dir: Path | None, output_dir: Path) -> pd.DataFrame:
    """The training prior for every row: the baseline a submission must beat."""
    parsed = [parse_row_id(r) for r in row_ids]
    rows = pd.DataFrame({"condition": [c for _, c, _ in parsed], "level": [lv for _, _, lv in parsed]})
    probs = prior_for(training_priors(data_dir, output_dir), rows)
    return pd.DataFrame({"row_id": list(row_ids), **{c: probs[:, k] for k, c in enumerate(PROBABILITY_COLUMNS)}})



def submit(data_dir: str | Path, output_dir: str | Path, description: str = "blend", device: str | None = None) -> Path:
    layout = RunLayout(output_dir)
    blends = load_blends(output_dir)
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in description)[:60] or "blend"
    folder = layout.submissions
    path = folder / f"submission-{date.today():%Y%m%d}-{slug}.csv"
    _, submission = predict_split(data_dir, "test", output_dir, blends=blends, out=path, device=device)
    shutil.copyfile(path, folder / "submission.csv")
    info = blend_info(output_dir)
    groups = {}
    for group, blend in blends.items():
        used = [n for n, w in zip(blend.backbones, blend.weights) if w > 0]
        groups[group] = {
            "backbones": used, "weights": dict(zip(blend.backbones, map(float, blend.weights))),
            "mode": blend.mode, "temperature": blend.temperature,
            "folds": {n: [p.name for p in layout.finished_fold_dirs(n, group)] for n in used},
            "oof_loss": {"backbones": info[group]["backbone_oof_loss"],
                         "blend_in_sample": info[group]["blend_oof_loss_in_sample"],
                         "blend_nested": info[group]["blend_oof_loss_nested"]}}
    manifest = {"submission": path.name, "rows": len(submission), "data_dir": str(data_dir), "groups": groups}
    write_text_atomic(path.with_suffix(".json"), json.dumps(manifest, indent=1))
    log.info(f"submission: {path} (and {folder / 'submission.csv'}), manifest {path.with_suffix('.json')}")
    return path
