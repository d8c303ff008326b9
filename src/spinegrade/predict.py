"""From raw DICOM to graded levels, with no coordinates: locate, then grade with every fold model.

Per condition group (``constants.GROUPS``): the group's locator places its points on the series the
group is read on, as rows of a locations table (study, condition, level, series, instance, x, y,
source); every fold model of every backbone of that group grades them (fold models averaged), from
images made by the same preprocessing as training (``data.preprocess.prepare_stack``, then the
centre view), so a model sees at test time what it trained on. A study whose series is missing or
unreadable keeps its rows, filled with the training prior, and a warning names it: one bad study
never stops a run. A group no model (or no locator) covers gets the weight-scaled training prior of
each condition and level, and the command names it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spinegrade.blend import Blend, combine, load_blends
from spinegrade.constants import (
    CONDITION_GROUP,
    CONDITIONS,
    GROUPS,
    LEVELS,
    PROBABILITY_COLUMNS,
    SEVERITIES,
    row_id,
)
from spinegrade.data.index import read_csv_checked
from spinegrade.data.preprocess import PreprocessSettings, centre_view, prepare_stack
from spinegrade.errors import SpinegradeError
from spinegrade.files import write_csv_atomic
from spinegrade.layout import RunLayout
from spinegrade.locating import LocatedStudy, listed_studies
from spinegrade.locators import locate_split, locator_class, locator_trained
from spinegrade.logs import get_logger
from spinegrade.metrics import prior_for, prior_table
from spinegrade.models.classifier import LevelClassifier, ModelSpec, grade_probabilities, load_state

log = get_logger(__name__)

@dataclass
class FoldModel:
    name: str
    group: str
    fold: int
    model: LevelClassifier
    settings: PreprocessSettings
    test_time_flip: bool = False  # graded as the mean over the image and its mirror (as its training did)


def trained_backbones(output_dir: Path) -> list[str]:
    """Backbones with at least one finished fold of any group under ``output_dir/trained_models``."""
    return RunLayout(output_dir).backbones()


def load_fold_models(output_dir: Path, name: str, group: str, device: torch.device) -> list[FoldModel]:
    """Every finished fold model of one backbone on one group, rebuilt from its model.json and weights
    alone (a fold still training, or killed, has no done.json and is left out)."""
    layout = RunLayout(output_dir)
    folders = layout.finished_fold_dirs(name, group)
    if not folders:
        raise SpinegradeError(f"{layout.model_dir(name, group)}: no finished fold")
    models = []
    for folder in folders:
        spec = json.loads((folder / "model.json").read_text())
        model = LevelClassifier(ModelSpec.from_dict(spec))
        load_state(model, folder / "best.safetensors")
        models.append(FoldModel(name, group, int(spec["fold"]), model.to(device).eval(), PreprocessSettings.from_model(spec),
                                bool(spec.get("test_time_flip", False))))
    return models


# --- grading ------------------------------------------------------------------------------------

def model_inputs(study: LocatedStudy, settings: PreprocessSettings) -> np.ndarray | None:
    """(rows of its locations, slices, H, W) uint8: the images a model of ``settings`` grades (the
    located slice and the neighbours it reads as channels, ``PreprocessSettings.from_model``), made
    exactly as training's cache makes them."""
    windows: dict[str, dict] = {}  # per series: its slices' intensity windows
    images = []
    for r in study.locations.itertuples():
        stack, k = study.stack_at(r)
        canvases = prepare_stack(stack, k, r.x, r.y, settings, windows.setdefault(f"{r.series}:{id(stack)}", {}),
                                 condition=r.condition)
        images.append(centre_view(canvases, settings.image_size, len(canvases)))
    return np.stack(images)


def grade_studies(studies: list[LocatedStudy], models: list[FoldModel], device: torch.device) -> dict[int, dict[str, np.ndarray]]:
    """Per located study, (5, 3) probabilities per condition of the models' group, averaged over the
    fold models, and over the series where a level was located on several (NaN rows for levels not
    located). A study whose images cannot be made gets a problem and no grades (the prior)."""
    out: dict[int, dict[str, np.ndarray]] = {}
    usable = [s for s in studies if s.locations is not None]
    prepared: dict[PreprocessSettings, dict[int, np.ndarray]] = {}
    failed: set[int] = set()  # its locations stay: another group may start from them
    for settings in {m.settings for m in models}:  # images shared by fold models with the same preprocessing
        prepared[settings] = {}
        for st in usable:
            if st.study_id in failed:
                continue
            try:
                prepared[settings][st.study_id] = model_inputs(st, settings)
            except Exception as exc:  # an image this code cannot prepare: that study gets the prior
                st.problem = f"cannot prepare its images ({type(exc).__name__}: {exc})"
                failed.add(st.study_id)
    usable = [s for s in usable if s.study_id not in failed]
    if not usable:
        return out
    by_settings = {settings: np.concatenate([per_study[st.study_id] for st in usable])
                   for settings, per_study in prepared.items()}
    level_index = {lv: i for i, lv in enumerate(LEVELS)}
    levels = torch.tensor([level_index[lv] for st in usable for lv in st.locations["level"]])
    total = np.zeros((len(levels), 3))
    for m in models:
        batch = torch.from_numpy(by_settings[m.settings])  # uint8 grey (rows, slices, H, W): the model normalises
        probs = []
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for start in range(0, len(batch), 64):
                probs.append(grade_probabilities(m.model, batch[start:start + 64].to(device),
                                                 levels[start:start + 64].to(device), m.test_time_flip).cpu().numpy())
        total += np.concatenate(probs)
    total /= len(models)
    k = 0
    for st in usable:
        rows = st.locations.reset_index(drop=True)
        graded: dict[str, np.ndarray] = {}
        for condition, part in rows.groupby("condition", sort=False):
            p = np.full((len(LEVELS), 3), np.nan)
            for level, at_level in part.groupby("level", sort=False):  # one row per series that has the level
                p[level_index[level]] = total[k + at_level.index.to_numpy()].mean(axis=0)
            graded[condition] = p
        out[st.study_id] = graded
        k += len(rows)
    return out


def training_priors(data_dir: Path | None, output_dir: Path) -> pd.DataFrame:
    """Weight-scaled prior per (condition, level): from train.csv when at hand, else as saved at training."""
    if data_dir is not None and (Path(data_dir) / "train.csv").is_file():
        from spinegrade.data.index import build_index

        return prior_table(build_index(data_dir, check_images=False).table)
    saved = RunLayout(output_dir).priors
    if saved.is_file():
        return pd.read_csv(saved)
    raise SpinegradeError(f"no training prior: neither {Path(data_dir or '.') / 'train.csv'} nor {saved} exists")


def submission_frame(study_ids: list[int], graded: dict[str, dict[str, dict[int, dict[str, np.ndarray]]]],
                     blends: dict[str, Blend], priors: pd.DataFrame) -> pd.DataFrame:
    """One row per target of every study: the blend of the group's backbones that grade it (their
    weights renormalised when some could not), else the training prior of its condition and level.
    ``graded[group][backbone][study][condition]`` is (5, 3)."""
    targets = pd.DataFrame([(c, lv) for c in CONDITIONS for lv in LEVELS], columns=["condition", "level"])
    prior = dict(zip(zip(targets["condition"], targets["level"]), prior_for(priors, targets)))
    rows = []
    for study in study_ids:
        for condition in CONDITIONS:
            group = CONDITION_GROUP[condition]
            blend, by_name = blends.get(group), graded.get(group, {})
            weight = dict(zip(blend.backbones, blend.weights)) if blend else {}
            names = [n for n in weight if weight[n] > 0 and condition in by_name.get(n, {}).get(study, {})]
            probs = None
            if names:
                w = np.array([weight[n] for n in names])
                probs = combine([by_name[n][study][condition] for n in names], w / w.sum(), blend.mode, blend.temperature)
            for k, level in enumerate(LEVELS):
                p = probs[k] if probs is not None and np.isfinite(probs[k]).all() else prior[(condition, level)]
                rows.append([row_id(study, condition, level), *p])
    return pd.DataFrame(rows, columns=["row_id", *PROBABILITY_COLUMNS])


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


def mean_blends(output_dir: Path, backbones: list[str] | None) -> dict[str, Blend]:
    """The plain mean of the named (else every trained) backbones, per group they have."""
    layout = RunLayout(output_dir)
    backbones = backbones or layout.backbones()
    if not backbones:
        raise SpinegradeError(f"{layout.trained_models}: no trained backbone to predict with")
    out = {}
    for group in GROUPS:
        names = [n for n in backbones if layout.finished_fold_dirs(n, group)]
        if names:
            out[group] = Blend(names, np.full(len(names), 1.0 / len(names)))
    if not out:
        raise SpinegradeError(f"{layout.trained_models}: none of {', '.join(backbones)} has a finished fold")
    return out


def blends_for(output_dir: Path, backbones: list[str] | None) -> dict[str, Blend]:
    """The tuned blend of each group when there is one: restricted to ``backbones`` when they are named
    (each group uses the named backbones that have it, with the blend's weights for them); else the
    plain mean of the named (or every trained) backbones."""
    layout = RunLayout(output_dir)
    if not layout.blend_json.is_file():
        return mean_blends(output_dir, backbones)
    blends = load_blends(output_dir)
    if backbones is None:
        return blends
    out = {}
    for group, blend in blends.items():
        keep = [(n, w) for n, w in zip(blend.backbones, blend.weights) if n in backbones and w > 0]
        if keep:
            w = np.array([w for _, w in keep])
            out[group] = Blend([n for n, _ in keep], w / w.sum(), blend.mode, blend.temperature)
    for group, blend in mean_blends(output_dir, backbones).items():
        out.setdefault(group, blend)  # a group the blend never had: the named backbones' mean
    return out


@dataclass
class SplitGrades:
    """What grading a split found: the listed studies, each group's located studies, and
    ``graded[group][backbone][study][condition]``, (5, 3) probabilities (NaN rows: not located)."""

    studies: list[int]
    located: dict[str, list[LocatedStudy]]
    graded: dict[str, dict[str, dict[int, dict[str, np.ndarray]]]]
    blends: dict[str, Blend]


def locate_with_anchors(data_dir: Path, split: str, output_dir: Path, group: str, device: torch.device,
                        located: dict[str, list[LocatedStudy]]) -> list[LocatedStudy]:
    """``group``'s located studies, from ``located`` (group -> located studies) when already there;
    else located, after the group its locator starts from, and both kept in ``located``."""
    if group not in located:
        anchor = locator_class(group).anchor
        anchors = locate_with_anchors(data_dir, split, output_dir, anchor, device, located) if anchor else None
        located[group] = locate_split(data_dir, split, output_dir, group, device, anchors=anchors)
    return located[group]


def grade_split(data_dir: Path, split: str, output_dir: Path, blends: dict[str, Blend], device: torch.device) -> SplitGrades:
    """Locate and grade every listed study of ``split`` for each group a blend covers; a group without
    a model or a study without its series is named in the log and left to the prior."""
    result = SplitGrades(listed_studies(data_dir, split), {}, {}, blends)
    located_by_group: dict[str, list[LocatedStudy]] = {}  # each group located once (the spinal points start others)
    for group, spec in GROUPS.items():
        blend = blends.get(group)
        names = [n for n, w in zip(blend.backbones, blend.weights) if w > 0] if blend else []
        if not names:
            log.info(f"{group}: no model grades it; its rows get the training prior of each condition and level")
            continue
        if spec.locator is None or not locator_trained(output_dir, group):
            log.warning(f"{group}: no trained locator places its points ({RunLayout(output_dir).localizer_dir(group)}: "
                        "run `spinegrade train-localizer`); its rows get the training prior")
            continue
        located = locate_with_anchors(data_dir, split, output_dir, group, device, located_by_group)
        result.located[group] = located
        result.graded[group] = {}
        for name in names:
            t0 = time.perf_counter()
            models = load_fold_models(output_dir, name, group, device)
            loaded = time.perf_counter() - t0
            t0 = time.perf_counter()
            result.graded[group][name] = grade_studies(located, models, device)
            log.info(f"{name} {group}: {len(models)} fold models loaded in {loaded:.2f} s, graded "
                     f"{len(result.graded[group][name])} studies in {time.perf_counter() - t0:.2f} s")
            del models
        for st in located:
            if st.problem and st.study_id not in result.graded[group][names[0]]:
                log.warning(f"study {st.study_id}: {st.problem}; its {group} rows get the training prior")
    return result


def predict_split(data_dir: str | Path, split: str, output_dir: str | Path, backbones: list[str] | None = None,
                  blends: dict[str, Blend] | None = None, out: str | Path | None = None, device: str | None = None,
                  predictions_dir: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predict every study of ``split``; write per-backbone predictions and a submission (each group's
    blend of its backbones, or their plain mean without one).

    ``output_dir`` (where ``trained_models/`` is) is only read when ``out`` and ``predictions_dir``
    are given, so the models may sit on a read-only mount (a Kaggle dataset).
    Returns (per-backbone predictions, submission)."""
    from spinegrade.train import select_device

    data_dir, output_dir = Path(data_dir), Path(output_dir)
    layout = RunLayout(output_dir)
    predictions_dir = Path(predictions_dir) if predictions_dir else layout.predictions
    grades = grade_split(data_dir, split, output_dir, blends or blends_for(output_dir, backbones), select_device(device))
    rows = [[row_id(study, condition, level), name, *p[k]]
            for by_name in grades.graded.values() for name, by_study in by_name.items()
            for study, per_condition in by_study.items() for condition, p in per_condition.items()
            for k, level in enumerate(LEVELS) if np.isfinite(p[k]).all()]
    per_backbone = pd.DataFrame(rows, columns=["row_id", "backbone", *PROBABILITY_COLUMNS])
    write_csv_atomic(per_backbone, predictions_dir / f"{split}_per_backbone.csv")
    submission = submission_frame(grades.studies, grades.graded, grades.blends, training_priors(data_dir, output_dir))
    sample_path = data_dir / "sample_submission.csv"
    sample = pd.read_csv(sample_path) if split == "test" and sample_path.is_file() else None
    out = Path(out) if out else layout.submissions / f"{split}_predictions.csv"
    write_submission(submission, out, sample)
    log.info(f"{len(submission)} rows for {len(grades.studies)} studies written to {out} "
             f"(per backbone: {predictions_dir / f'{split}_per_backbone.csv'})")
    return per_backbone, submission


def score_submission(submission: pd.DataFrame | str | Path, labels_csv: str | Path) -> dict[str, float]:
    """Competition terms of a submission against labels in train.csv's format (e.g. a synthetic
    dataset's answers), over the conditions whose labels are given."""
    from spinegrade.constants import LABEL_COLUMNS, SEVERITY_INDEX, parse_row_id
    from spinegrade.metrics import competition_score

    if not isinstance(submission, pd.DataFrame):
        submission = read_csv_checked(Path(submission), ["row_id", *PROBABILITY_COLUMNS])
    truth = read_csv_checked(Path(labels_csv), ["study_id", *LABEL_COLUMNS], dtypes={c: str for c in LABEL_COLUMNS})
    truth = truth.melt(id_vars="study_id", var_name="column", value_name="label")
    parsed = [parse_row_id(r) for r in submission["row_id"]]
    frame = submission.assign(study_id=[p[0] for p in parsed], condition=[p[1] for p in parsed],
                              column=[f"{p[1]}_{p[2]}" for p in parsed])
    frame = frame.merge(truth, on=["study_id", "column"], how="inner")
    frame["severity"] = frame["label"].map(SEVERITY_INDEX).fillna(-1).astype(int)
    return competition_score(frame)


def prior_submission(row_ids, data_dir: Path | None, output_dir: Path) -> pd.DataFrame:
    """The training prior for every row: the baseline a submission must beat."""
    from spinegrade.constants import parse_row_id

    parsed = [parse_row_id(r) for r in row_ids]
    rows = pd.DataFrame({"condition": [c for _, c, _ in parsed], "level": [lv for _, _, lv in parsed]})
    probs = prior_for(training_priors(data_dir, output_dir), rows)
    return pd.DataFrame({"row_id": list(row_ids), **{c: probs[:, k] for k, c in enumerate(PROBABILITY_COLUMNS)}})


def localised_oof(output_dir: str | Path, data_dir: str | Path, folds_path: str | Path | None, backbones: list[str],
                  group: str = "spinal", device: str | None = None) -> dict[str, pd.DataFrame]:
    """Out-of-fold predictions of one group without coordinates: each training study located by the
    fold's locator and graded by the fold models that never saw it. Beside the OOF predictions at the
    labelled points, this shows what localisation costs."""
    from spinegrade.data.folds import read_folds
    from spinegrade.data.index import build_index
    from spinegrade.layout import run_folds
    from spinegrade.train import select_device

    output_dir, data_dir = Path(output_dir), Path(data_dir)
    device_ = select_device(device)
    folds = read_folds(run_folds(RunLayout(output_dir), folds_path)).set_index("study_id")["fold"]
    table = build_index(data_dir, check_images=False).table
    labels = table.set_index(["study_id", "condition", "level"])["severity"]
    located = locate_split(data_dir, "train", output_dir, group, device_, folds=folds)
    for st in located:
        if st.problem:
            log.info(f"end-to-end: study {st.study_id} not graded ({st.problem})")
    fold_of = folds.to_dict()
    out = {}
    for name in backbones:
        models = load_fold_models(output_dir, name, group, device_)
        rows = []
        for fold in sorted({m.fold for m in models}):
            own = [m for m in models if m.fold == fold]
            studies = [st for st in located if fold_of.get(st.study_id) == fold]
            for study, per_condition in grade_studies(studies, own, device_).items():
                for condition, probs in per_condition.items():
                    for k, level in enumerate(LEVELS):
                        severity = labels.get((study, condition, level), -1)
                        if severity >= 0 and np.isfinite(probs[k]).all():
                            rows.append([row_id(study, condition, level), *probs[k], SEVERITIES[severity], fold])
        out[name] = pd.DataFrame(rows, columns=["row_id", *PROBABILITY_COLUMNS, "label", "fold"])
        log.info(f"{name} {group}: {len(rows)} held-out levels graded at the locator's points")
    return out
