"""Blend backbones with weights tuned on their out-of-fold predictions under the competition loss.

Weights are non-negative and sum to one (a softmax of free parameters, optimised with
scipy). Two ways of mixing are tried: the weighted mean of probabilities, and the weighted mean of
log-probabilities renormalised (a geometric mean, which rewards agreement). Then the blend may be
calibrated: one temperature, or that with a scale per grade and, for the spinal group, a factor on each
study's highest Severe probability, which is all the any_severe term reads (2nd place multiplied it by
1.25). By default ("auto") the mode and the calibration are chosen by their leave-one-fold-out loss, so
a calibration is kept only where it mends more on unseen folds than it costs.

Weights tuned and scored on the same predictions flatter themselves, so the figure reported for unseen
studies is nested: for each fold, the mode and calibration chosen by an inner split of the other folds,
then fitted on them, and scored on that fold's rows.

Each condition group is blended on its own OOF rows (the spinal group scored with
any_severe_spinal): a backbone trained on one group only is left out of the others' blends.
``oof/blend.json`` is ``{"groups": {group: {...}}}``; one written before groups existed (no
``groups`` key) reads as the spinal group's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from spinegrade.config import CALIBRATIONS
from spinegrade.constants import CONDITION_GROUP, GROUPS, PROBABILITY_COLUMNS
from spinegrade.data.folds import read_folds, write_csv_atomic
from spinegrade.errors import SpinegradeError
from spinegrade.files import write_text_atomic
from spinegrade.layout import BLEND_NAME, LEGACY_GROUP, RunLayout, run_folds
from spinegrade.logs import get_logger, result
from spinegrade.metrics import FixedRowsScore, competition_score
from spinegrade.oof import complete_names, read_oof

log = get_logger(__name__)
NEAR_ZERO = 0.02  # a weight below this is reported as contributing nothing
EPS = 1e-7


# What a blend may fit beside its weights: nothing; one temperature; "full": the temperature, a scale per
# grade and, where the rows carry an any_severe term, the study-level Severe factor. ``blend
# --calibration`` also takes "auto" (the default), each fold's chosen by an inner split of the other
# folds: on a small run's folds a fitted calibration follows which folds happened to be hard and can cost
# more than it mends (docs/figures.md), so whether it is fitted is itself measured.
FITTED = tuple(c for c in CALIBRATIONS if c != "auto")


@dataclass
class Blend:
    """How a group's backbones are mixed, then calibrated: one temperature; per-class scales (each grade's
    probability multiplied, rows renormalised); for a group with an any_severe term, a study-level factor
    on the highest Severe probability of each study (the any_severe term reads only that one)."""

    backbones: list[str]
    weights: np.ndarray
    mode: str = "probability"  # or "log"
    temperature: float = 1.0
    class_scale: np.ndarray = field(default_factory=lambda: np.ones(3))
    severe_factor: float = 1.0
    calibration: str = "none"  # which of FITTED these values were fitted as

    def combine(self, probabilities: list[np.ndarray], study_ids: np.ndarray | None = None) -> np.ndarray:
        """Mix (rows, 3) probability arrays, one per backbone, in the order of ``backbones``, and calibrate
        (the study-level factor only where ``study_ids`` says which rows are one study's)."""
        return self.calibrate(combine(probabilities, self.weights, self.mode, self.temperature), study_ids)

    def calibrate(self, probabilities: np.ndarray, study_ids: np.ndarray | None = None) -> np.ndarray:
        p = np.asarray(probabilities, dtype=float) * np.asarray(self.class_scale, dtype=float)
        p = p / p.sum(axis=1, keepdims=True)
        if self.severe_factor != 1.0 and study_ids is not None and len(p):
            p = boost_highest_severe(p, np.asarray(study_ids), self.severe_factor)
        return p

    def to_dict(self) -> dict:
        return {"backbones": self.backbones, "weights": [float(w) for w in self.weights], "mode": self.mode,
                "temperature": float(self.temperature), "class_scale": [float(c) for c in self.class_scale],
                "severe_factor": float(self.severe_factor), "calibration": self.calibration}

    @classmethod
    def from_dict(cls, d: dict) -> "Blend":
        return cls(list(d["backbones"]), np.asarray(d["weights"], dtype=float), d.get("mode", "probability"),
                   float(d.get("temperature", 1.0)), np.asarray(d.get("class_scale", [1.0, 1.0, 1.0]), dtype=float),
                   float(d.get("severe_factor", 1.0)), d.get("calibration", "none"))


def boost_highest_severe(probabilities: np.ndarray, study_ids: np.ndarray, factor: float) -> np.ndarray:
    """Each study's row with the highest Severe probability, that probability multiplied by ``factor``
    (capped so the row stays a distribution) and the row renormalised; every other row as it was."""
    p = probabilities.copy()
    order = np.lexsort((-p[:, 2], study_ids))
    first = order[np.r_[True, study_ids[order][1:] != study_ids[order][:-1]]]
    severe = np.minimum(p[first, 2] * factor, 1 - 1e-6)
    rest = p[first, :2].sum(axis=1, keepdims=True)
    p[first, :2] = p[first, :2] / np.maximum(rest, 1e-12) * (1 - severe)[:, None]
    p[first, 2] = severe
    return p


def combine(probabilities: list[np.ndarray], weights: np.ndarray, mode: str, temperature: float = 1.0) -> np.ndarray:
    stacked = np.clip(np.stack([np.asarray(p, dtype=float) for p in probabilities]), EPS, 1.0)
    w = np.asarray(weights, dtype=float)[:, None, None]
    if mode == "log":
        logits = (w * np.log(stacked)).sum(axis=0) / temperature
    elif mode == "probability":
        mixed = (w * stacked).sum(axis=0)
        if temperature == 1.0:
            return mixed / mixed.sum(axis=1, keepdims=True)
        logits = np.log(mixed) / temperature
    else:
        raise SpinegradeError(f"unknown blend mode {mode!r}: probability or log")
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _loss(frame: pd.DataFrame, probs: np.ndarray) -> float:
    scored = frame[["study_id", "condition", "severity"]].copy()
    scored[list(PROBABILITY_COLUMNS)] = probs
    return competition_score(scored)["score"]


def fit_blend(frame: pd.DataFrame, per_backbone: list[np.ndarray], backbones: list[str], mode: str,
              calibration: str = "full") -> Blend:
    """Weights, and the ``calibration`` (``FITTED``: none; one temperature; "full": the temperature,
    per-class scales and, where the rows carry an any_severe term, the study-level Severe factor)
    minimising the competition loss of the blended rows of ``frame`` (its any_severe term included)."""
    if calibration not in FITTED:
        raise SpinegradeError(f"calibration must be one of {', '.join(FITTED)}, got {calibration!r}")
    n = len(backbones)
    loss = FixedRowsScore(frame)
    studies = frame["study_id"].to_numpy()
    severe_term = any(GROUPS[CONDITION_GROUP[c]].any_severe_term for c in frame["condition"].unique())
    extra = {"none": 0, "temperature": 1, "full": 3 + int(severe_term)}[calibration]

    def unpack(x) -> Blend:
        t = float(np.exp(x[n])) if extra else 1.0
        scale = np.exp(np.r_[0.0, x[n + 1:n + 3]]) if extra >= 3 else np.ones(3)
        factor = float(np.exp(x[n + 3])) if extra == 4 else 1.0
        return Blend(backbones, _softmax(x[:n]), mode, t, scale, factor, calibration)

    def objective(x):
        return loss(unpack(x).combine(per_backbone, studies))

    # The weights' landscape can have several basins: several starts, uncalibrated (cheap). The calibration
    # then starts from the best of them, once: a start per basin again cost four times as long (three
    # backbones) for an in-sample loss lower by a few thousandths at most.
    def weights_only(x):
        return loss(combine(per_backbone, _softmax(x), mode))

    options = {"xtol": 1e-4, "ftol": 1e-7, "maxiter": 4000}
    x = np.zeros(n)  # one backbone: its weight is 1 whatever x says
    if n > 1:
        starts = [np.zeros(n)] + [np.eye(n)[i] * 3 for i in range(n)]
        x = min((minimize(weights_only, s, method="Powell", options=options) for s in starts), key=lambda r: r.fun).x
    if extra:
        x = minimize(objective, np.concatenate([x, np.zeros(extra)]), method="Powell", options=options).x
    return unpack(x)


@dataclass
class BlendReport:
    group: str
    blend: Blend
    backbone_losses: dict[str, float]
    in_sample: float
    nested: float
    candidates: dict[str, dict] = field(default_factory=dict)
    near_zero: list[str] = field(default_factory=list)
    rows: int = 0
    payload: dict = field(default_factory=dict)  # what blend.json keeps of it


def aligned_oof(layout: RunLayout, backbones: list[str], group: str) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """Rows of ``group`` every backbone predicted (the same studies and levels), in one order."""
    frames = {name: read_oof(layout, name, group).set_index("row_id") for name in backbones}
    common = sorted(set.intersection(*(set(f.index) for f in frames.values())))
    if not common:
        raise SpinegradeError(f"{group}: the backbones' OOF predictions share no row: were they trained on the same data?")
    first = frames[backbones[0]].loc[common].reset_index()
    return first, [frames[name].loc[common, list(PROBABILITY_COLUMNS)].to_numpy(dtype=float) for name in backbones]


def held_out(frame: pd.DataFrame, per_backbone: list[np.ndarray], backbones: list[str],
             recipe: tuple[str, str]) -> np.ndarray:
    """Every row blended by ``recipe`` (mode, calibration) fitted on the other folds of ``frame``."""
    out = np.zeros_like(per_backbone[0])
    folds, studies = frame["fold"].to_numpy(), frame["study_id"].to_numpy()
    for fold in np.unique(folds):
        train = folds != fold
        blend = fit_blend(frame[train], [p[train] for p in per_backbone], backbones, *recipe)
        out[~train] = blend.combine([p[~train] for p in per_backbone], studies[~train])
    return out


def recipes(backbones: int, calibration: str) -> list[tuple[str, str]]:
    """The (mode, calibration) pairs a blend chooses among, the simplest first. One backbone mixes the
    same either way; ``"auto"`` tries every calibration, any other value only itself."""
    modes = ("probability", "log") if backbones > 1 else ("probability",)
    chosen = FITTED if calibration == "auto" else (calibration,)
    return [(mode, c) for mode in modes for c in chosen]


def choose_recipe(frame: pd.DataFrame, per_backbone: list[np.ndarray], backbones: list[str],
                  candidates: list[tuple[str, str]]) -> tuple[tuple[str, str], dict[tuple[str, str], float]]:
    """The candidate whose leave-one-fold-out loss on ``frame`` is lowest, and every candidate's loss.
    On fewer than two folds nothing can be held out: the simplest candidate."""
    if len(candidates) == 1 or frame["fold"].nunique() < 2:
        return candidates[0], {}
    losses = {c: _loss(frame, held_out(frame, per_backbone, backbones, c)) for c in candidates}
    return min(losses, key=losses.get), losses


def nested_loss(frame: pd.DataFrame, per_backbone: list[np.ndarray], backbones: list[str],
                candidates: list[tuple[str, str]]) -> tuple[float, np.ndarray, dict[int, Blend]]:
    """Each fold blended by a recipe chosen (:func:`choose_recipe`, an inner split) and fitted on the other
    folds alone; returns the pooled loss, the predictions and each held-out fold's blend (what the located
    OOF rows of that fold are mixed with). Nothing in a fold's rows chooses its mode, its calibration or
    its weights."""
    out = np.zeros_like(per_backbone[0])
    folds, studies = frame["fold"].to_numpy(), frame["study_id"].to_numpy()
    per_fold = {}
    for fold in np.unique(folds):
        train = folds != fold
        inner = [p[train] for p in per_backbone]
        recipe, _ = choose_recipe(frame[train], inner, backbones, candidates)
        blend = fit_blend(frame[train], inner, backbones, *recipe)
        out[~train] = blend.combine([p[~train] for p in per_backbone], studies[~train])
        per_fold[int(fold)] = blend
    return _loss(frame, out), out, per_fold


def run_blend(output_dir: str | Path, folds_path: str | Path | None = None,
              calibration: str = "auto") -> dict[str, BlendReport]:
    """Blend, per condition group, every backbone with OOF predictions of that group on every fold;
    write ``oof/blend.json`` and the nested blended OOF in ``oof/blend/<group>/``. ``calibration``
    (``CALIBRATIONS``): what is fitted beside the weights (:func:`fit_blend`), or "auto", chosen like the
    mixing mode."""
    if calibration not in CALIBRATIONS:
        raise SpinegradeError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    layout = RunLayout(output_dir)
    folds = sorted(read_folds(run_folds(layout, folds_path))["fold"].unique().tolist())
    reports: dict[str, BlendReport] = {}
    for group in GROUPS:
        names, partial = complete_names(layout, group, folds)
        names = [n for n in names if n != BLEND_NAME]
        for name, missing in partial.items():
            if name != BLEND_NAME:
                log.info(f"{name} {group}: folds {missing} missing; left out of the {group} blend")
        if names:
            reports[group] = blend_group(layout, group, names, folds, calibration)
    if not reports:
        raise SpinegradeError(f"{layout.oof}: no backbone has OOF predictions for every fold {folds} of any group")
    payload = {"groups": {g: r.payload for g, r in reports.items()}, "folds": folds}
    write_text_atomic(layout.blend_json, json.dumps(payload, indent=1))
    for r in reports.values():
        result(log, format_blend(r))
    return reports


def blend_group(layout: RunLayout, group: str, names: list[str], folds: list[int], calibration: str) -> BlendReport:
    """The blend of one group. Each recipe (mixing mode and calibration, :func:`recipes`) is scored by its
    leave-one-fold-out loss; the lowest is fitted on every fold and kept for prediction. The figure reported
    for unseen studies is the nested one: each fold blended by the recipe an inner split of the other folds
    chose, fitted on them."""
    frame, per_backbone = aligned_oof(layout, names, group)
    studies = frame["study_id"].to_numpy()
    losses = {name: _loss(frame, p) for name, p in zip(names, per_backbone)}
    candidates = recipes(len(names), calibration)
    recipe, held = choose_recipe(frame, per_backbone, names, candidates)
    nested, nested_probs, per_fold = nested_loss(frame, per_backbone, names, candidates)
    blend = fit_blend(frame, per_backbone, names, *recipe)
    # A backbone that contributes nothing is dropped outright, so prediction never loads it.
    near_zero = [n for n, w in zip(names, blend.weights) if w < NEAR_ZERO]
    snapped = np.where(blend.weights < NEAR_ZERO, 0.0, blend.weights)
    blend.weights = snapped / snapped.sum()
    in_sample = _loss(frame, blend.combine(per_backbone, studies))
    report = BlendReport(group, blend, losses, in_sample, nested,
                         {f"{m}, {c}": {"held_out": loss} for (m, c), loss in held.items()}, near_zero, len(frame))
    # The blend's OOF files hold the nested predictions (each fold blended by a recipe chosen and fitted on
    # the others), so the evaluation scores the blend as honestly as it scores a backbone.
    for fold in folds:
        rows = frame["fold"].to_numpy() == fold
        out = frame.loc[rows, ["row_id"]].copy()
        out[list(PROBABILITY_COLUMNS)] = nested_probs[rows]
        out["label"], out["fold"] = frame.loc[rows, "label"].to_numpy(), fold
        write_csv_atomic(out, layout.oof_file(BLEND_NAME, group, fold, existing=False))
    why = (f"{recipe[0]} mixing, {recipe[1]} calibration: the lowest leave-one-fold-out loss ("
           + ", ".join(f"{k} {v['held_out']:.4f}" for k, v in report.candidates.items()) + ")"
           if held else f"{recipe[0]} mixing, {recipe[1]} calibration: the only recipe asked for")
    report.payload = {**blend.to_dict(), "why": why, "calibration_asked": calibration, "backbone_oof_loss": losses,
                      "blend_oof_loss_in_sample": in_sample, "blend_oof_loss_nested": nested,
                      "near_zero_weight": near_zero, "rows": len(frame), "candidates": report.candidates,
                      "nested_blends": {str(k): b.to_dict() for k, b in per_fold.items()}}
    return report


def format_blend(report: BlendReport) -> str:
    terms = [report.group] + ([GROUPS[report.group].any_severe_term] if GROUPS[report.group].any_severe_term else [])
    lines = [f"{report.group}: OOF competition loss over {report.rows} levels ({', '.join(terms)}):"]
    for name, loss in report.backbone_losses.items():
        w = report.blend.weights[report.blend.backbones.index(name)]
        lines.append(f"  {name:24s} {loss:.4f}   weight {w:.3f}{'  (near zero: contributes nothing)' if name in report.near_zero else ''}")
    recipe = f"{report.blend.mode}, {report.blend.calibration} calibration"
    lines.append(f"  {'blend':24s} {report.in_sample:.4f}   {recipe}: tuned and scored on the same rows")
    lines.append(f"  {'blend, nested over folds':24s} {report.nested:.4f}   recipe and weights chosen and fitted on "
                 "other folds: the estimate for unseen studies")
    return "\n".join(lines)


def load_blends(output_dir: str | Path) -> dict[str, Blend]:
    """The blend of every group in ``oof/blend.json`` (one written before groups: the spinal group's)."""
    path = RunLayout(output_dir).blend_json
    if not path.is_file():
        raise SpinegradeError(f"{path}: no blend yet (run `spinegrade blend` / `make blend`)")
    info = json.loads(path.read_text())
    groups = info["groups"] if "groups" in info else {LEGACY_GROUP: info}
    return {g: Blend.from_dict(d) for g, d in groups.items()}


def nested_blends(output_dir: str | Path, group: str) -> dict[int, Blend]:
    """Each fold's blend fitted on the other folds (``blend.json``'s ``nested_blends``); empty for a blend
    written before they were kept."""
    info = blend_info(output_dir).get(group, {})
    return {int(k): Blend.from_dict(d) for k, d in info.get("nested_blends", {}).items()}


def blend_info(output_dir: str | Path) -> dict[str, dict]:
    """What ``oof/blend.json`` says of each group (losses, candidates), in the same reading as :func:`load_blends`."""
    info = json.loads(RunLayout(output_dir).blend_json.read_text())
    return info["groups"] if "groups" in info else {LEGACY_GROUP: info}


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
            out[group] = Blend([n for n, _ in keep], w / w.sum(), blend.mode, blend.temperature, blend.class_scale,
                               blend.severe_factor)
    for group, blend in mean_blends(output_dir, backbones).items():
        out.setdefault(group, blend)  # a group the blend never had: the named backbones' mean
    return out
