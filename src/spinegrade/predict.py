"""From raw DICOM to graded levels, with no coordinates: locate, then grade with every fold model.

Per condition group (``constants.GROUPS``): the group's locator places its points on the series the
group is read on, as rows of a locations table (study, condition, level, series, instance, frame, x,
y, source); every fold model of every backbone of that group grades them (fold models averaged), from
images made by the same preprocessing as training (``data.preprocess.prepare_stack``, then the
centre view), so a model sees at test time what it trained on. The grades are a tidy table, one row
per (group, backbone, study, condition, level) graded (``GRADE_COLUMNS``). A study whose series is
missing or unreadable has no rows and a problem, which the log names: one bad study never stops a
run, and the submission (``submit.py``) gives it the training prior.

Studies come as :class:`~spinegrade.study.Study` (a competition split, or a scanner folder): each is
located on its own (``locators.locate_studies``); grading goes model set by model set over all the
located studies, because the published ensemble's fold models (27.7 GB in float32) cannot all be held
at once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spinegrade.blend import Blend
from spinegrade.constants import GROUPS, LEVELS, PROBABILITY_COLUMNS
from spinegrade.data.preprocess import (
    PREPROCESS_VERSION,
    PreprocessSettings,
    centre_view,
    prepare_stack,
    refuse_other_inputs,
)
from spinegrade.device import autocast
from spinegrade.errors import SpinegradeError
from spinegrade.layout import RunLayout
from spinegrade.locating import LocatedStudy
from spinegrade.locators import locate_studies, locator_class, locator_trained
from spinegrade.logs import get_logger
from spinegrade.models.classifier import (
    LevelClassifier,
    ModelSpec,
    grade_probabilities,
    load_state,
    weights_loaded_after,
)
from spinegrade.models.folding import fold_batch_norms
from spinegrade.study import Study

log = get_logger(__name__)

GRADE_COLUMNS = ["group", "backbone", "study_id", "condition", "level", *PROBABILITY_COLUMNS]


@dataclass
class FoldModel:
    name: str
    group: str
    fold: int
    model: LevelClassifier
    settings: PreprocessSettings
    test_time_flip: bool = False  # graded as the mean over the image and its mirror (as its training did)


def load_fold_models(output_dir: Path, name: str, group: str, device: torch.device) -> list[FoldModel]:
    """Every finished fold model of one backbone on one group, rebuilt from its model.json and weights
    alone (a fold still training, or killed, has no done.json and is left out). A fold trained on
    inputs this code no longer makes (``preprocess_version``) is refused, naming it."""
    layout = RunLayout(output_dir)
    folders = layout.finished_fold_dirs(name, group)
    if not folders:
        raise SpinegradeError(f"{layout.model_dir(name, group)}: no finished fold")
    models = []
    folded: dict[str, list[tuple[str, str]]] = {}  # architecture -> the batch norms its first fold had folded
    for folder in folders:
        spec = json.loads((folder / "model.json").read_text())
        refuse_other_inputs(spec, "preprocess_version", PREPROCESS_VERSION, folder)
        model_spec = ModelSpec.from_dict(spec)
        with weights_loaded_after():
            model = LevelClassifier(model_spec)
        load_state(model, folder / "best.safetensors")
        # channels-last: oneDNN's convolutions on a CPU take half the time (the same logits to 1e-5)
        model = model.to(device).eval().to(memory_format=torch.channels_last)
        settings = PreprocessSettings.from_model(spec)
        # batch norms folded into their convolutions: a grader's forward in about 0.6x the time
        folded[repr(model_spec)] = fold_batch_norms(model, probe_call(model, settings.image_size, device),
                                                    folded.get(repr(model_spec)))
        models.append(FoldModel(name, group, int(spec["fold"]), model, settings, bool(spec.get("test_time_flip", False))))
    return models


def probe_call(model: LevelClassifier, size: int, device: torch.device):
    """A call of ``model`` on one fixed random image of its input (``models.folding``'s probe)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1, model.spec.input_channels, size, size), dtype=torch.uint8, generator=generator)
    levels = torch.tensor([len(LEVELS) // 2])
    return lambda: model(images.to(device), levels.to(device))


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


def grade_studies(studies: list[LocatedStudy], models: list[FoldModel], device: torch.device,
                  prepared: dict[PreprocessSettings, dict[int, np.ndarray]] | None = None) -> pd.DataFrame:
    """One row per located (study, condition, level): study_id, condition, level and the probabilities,
    averaged over the fold models, and over the series where a level was located on several. A
    study whose images cannot be made gets a problem and no rows (the prior), as does a level whose
    probabilities are not finite. ``prepared`` (settings -> study id -> :func:`model_inputs`), when
    given, receives the images made, for a later reader of the same crops (the evidence maps)."""
    usable = [s for s in studies if s.locations is not None]
    prepared = {} if prepared is None else prepared  # settings -> study -> model_inputs: given, it is kept there
    failed: set[int] = set()  # its locations stay: another group may start from them
    for settings in {m.settings for m in models}:  # images shared by fold models with the same preprocessing
        prepared.setdefault(settings, {})
        for st in usable:
            if st.study_id in failed:
                continue
            try:
                prepared[settings][st.study_id] = model_inputs(st, settings)
            except Exception as exc:  # an image this code cannot prepare: that study gets the prior
                st.problem = f"cannot prepare its images ({type(exc).__name__}: {exc})"
                failed.add(st.study_id)
    usable = [s for s in usable if s.study_id not in failed]
    columns = ["study_id", "condition", "level", *PROBABILITY_COLUMNS]
    if not usable:
        return empty_grades(columns)
    by_settings = {settings: np.concatenate([per_study[st.study_id] for st in usable])
                   for settings, per_study in prepared.items()}
    level_index = {lv: i for i, lv in enumerate(LEVELS)}
    levels = torch.tensor([level_index[lv] for st in usable for lv in st.locations["level"]])
    total = np.zeros((len(levels), 3))
    for m in models:
        batch = torch.from_numpy(by_settings[m.settings])  # uint8 grey (rows, slices, H, W): the model normalises
        probs = []  # kept on the device until the model's last batch: no wait per batch
        with torch.inference_mode(), autocast(device):
            for start in range(0, len(batch), 64):
                probs.append(grade_probabilities(m.model, batch[start:start + 64].to(device),
                                                 levels[start:start + 64].to(device), m.test_time_flip))
        total += torch.cat(probs).cpu().numpy()
    total /= len(models)
    rows, k = [], 0
    for st in usable:
        part = st.locations.reset_index(drop=True)
        for condition, in_condition in part.groupby("condition", sort=False):
            for level in LEVELS:  # the mean over the series that have the level
                at = in_condition.index[in_condition["level"] == level].to_numpy()
                p = total[k + at].mean(axis=0) if len(at) else None
                if p is not None and np.isfinite(p).all():
                    rows.append([st.study_id, condition, level, *p])
        k += len(part)
    return pd.DataFrame(rows, columns=columns) if rows else empty_grades(columns)


def empty_grades(columns: list[str]) -> pd.DataFrame:
    """No grades, with the columns' types (ids integer, probabilities float), so that concatenating
    it keeps a numeric table."""
    kinds = {"study_id": "int64", **{c: "float64" for c in PROBABILITY_COLUMNS}}
    return pd.DataFrame({c: pd.Series(dtype=kinds.get(c, "object")) for c in columns})


@dataclass
class SplitGrades:
    """What grading some studies found: their ids, each group's located studies, and the grades
    (``GRADE_COLUMNS``; a target without a row was not graded)."""

    studies: list[int]
    located: dict[str, list[LocatedStudy]]
    grades: pd.DataFrame
    blends: dict[str, Blend]
    # With ``grade_split(keep=True)``: each (group, backbone)'s fold models, and the images they graded
    # (settings -> study id -> model_inputs), so that the evidence maps need neither load nor crop again.
    models: dict[tuple[str, str], list[FoldModel]] = field(default_factory=dict)
    inputs: dict[tuple[str, str], dict[PreprocessSettings, dict[int, np.ndarray]]] = field(default_factory=dict)

    def graded(self, group: str, study_id: int, condition: str, level: str) -> bool:
        g = self.grades
        return bool(((g["group"] == group) & (g["study_id"] == study_id) & (g["condition"] == condition)
                     & (g["level"] == level)).any())


def locate_with_anchors(studies: list[Study], output_dir: Path, group: str, device: torch.device,
                        located: dict[str, list[LocatedStudy]]) -> list[LocatedStudy]:
    """``group``'s located studies, from ``located`` (group -> located studies) when already there;
    else located, after the group its locator starts from, and both kept in ``located``."""
    if group not in located:
        anchor = locator_class(group).anchor
        anchors = locate_with_anchors(studies, output_dir, anchor, device, located) if anchor else None
        located[group] = locate_studies(studies, output_dir, group, device, anchors=anchors)
    return located[group]


def grade_split(studies: list[Study], output_dir: Path, blends: dict[str, Blend], device: torch.device,
                keep: bool = False) -> SplitGrades:
    """Locate and grade every study for each group a blend covers; a group without a model or a
    study without its series is named in the log and left to the prior. With ``keep`` (one study's
    page), the fold models and the images they graded stay in the result for its evidence maps."""
    result = SplitGrades([s.study_id for s in studies], {}, empty_grades(GRADE_COLUMNS), blends)
    located_by_group: dict[str, list[LocatedStudy]] = {}  # each group located once (the spinal points start others)
    frames = []
    for group, spec in GROUPS.items():
        blend = blends.get(group)
        names = [n for n, w in zip(blend.backbones, blend.weights) if w > 0] if blend else []
        if not names:
            log.info(f"{group}: no model grades it; its rows get the training prior of each condition and level")
            continue
        if spec.locator is None or not locator_trained(output_dir, group):
            log.warning(f"{group}: no trained locator places its points ({RunLayout(output_dir).locator_dir(group)}: "
                        "run `spinegrade train-localizer`); its rows get the training prior")
            continue
        located = locate_with_anchors(studies, output_dir, group, device, located_by_group)
        result.located[group] = located
        graded_ids: set[int] = set()
        for name in names:
            t0 = time.perf_counter()
            models = load_fold_models(output_dir, name, group, device)
            loaded = time.perf_counter() - t0
            t0 = time.perf_counter()
            prepared: dict[PreprocessSettings, dict[int, np.ndarray]] = {}
            graded = grade_studies(located, models, device, prepared)
            if keep:
                result.models[(group, name)], result.inputs[(group, name)] = models, prepared
            if not graded.empty:
                frames.append(graded.assign(group=group, backbone=name)[GRADE_COLUMNS])
            graded_ids |= set(graded["study_id"])
            log.info(f"{name} {group}: {len(models)} fold models loaded in {loaded:.2f} s, graded "
                     f"{graded['study_id'].nunique()} studies in {time.perf_counter() - t0:.2f} s")
            del models
        for st in located:
            if st.problem and st.study_id not in graded_ids:
                log.warning(f"study {st.study_id}: {st.problem}; its {group} rows get the training prior")
    if frames:
        result.grades = pd.concat(frames, ignore_index=True)
    return result
