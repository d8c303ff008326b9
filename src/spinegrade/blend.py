"""Blend backbones with weights tuned on their out-of-fold predictions under the competition loss.

Weights are non-negative and sum to one (a softmax of free parameters, optimised with
scipy). Two ways of mixing are tried: the weighted mean of probabilities, and the weighted mean of
log-probabilities renormalised (a geometric mean, which rewards agreement); each may carry one
temperature. Weights tuned and scored on the same predictions flatter themselves, so the choice
between them, and the figure reported for unseen studies, come from a nested estimate: for each
fold, weights fitted on the other folds' OOF rows and scored on that fold's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from spinegrade.constants import CONDITION_GROUP, METRIC_GROUPS, PROBABILITY_COLUMNS, SEVERITY_WEIGHTS
from spinegrade.data.folds import read_folds, write_csv_atomic
from spinegrade.errors import SpinegradeError
from spinegrade.evaluate import complete_backbones, read_oof
from spinegrade.files import write_text_atomic
from spinegrade.metrics import competition_score

BLEND_NAME = "blend"
NEAR_ZERO = 0.02  # a weight below this is reported as contributing nothing
EPS = 1e-7


@dataclass
class Blend:
    backbones: list[str]
    weights: np.ndarray
    mode: str = "probability"  # or "log"
    temperature: float = 1.0

    def combine(self, probabilities: list[np.ndarray]) -> np.ndarray:
        """Mix (rows, 3) probability arrays, one per backbone, in the order of ``backbones``."""
        return combine(probabilities, self.weights, self.mode, self.temperature)

    def to_dict(self) -> dict:
        return {"backbones": self.backbones, "weights": [float(w) for w in self.weights], "mode": self.mode,
                "temperature": float(self.temperature)}

    @classmethod
    def from_dict(cls, d: dict) -> "Blend":
        return cls(list(d["backbones"]), np.asarray(d["weights"], dtype=float), d.get("mode", "probability"),
                   float(d.get("temperature", 1.0)))


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


class FastLoss:
    """The competition loss of :func:`spinegrade.metrics.competition_score` for a fixed set of rows,
    with the grouping precomputed: the optimiser calls it thousands of times."""

    def __init__(self, frame: pd.DataFrame):
        labels = frame["severity"].to_numpy()
        groups = frame["condition"].map(CONDITION_GROUP).to_numpy()
        self.groups = []
        for g in METRIC_GROUPS:
            rows = np.flatnonzero((groups == g) & (labels >= 0))
            if len(rows):
                self.groups.append((rows, labels[rows], np.asarray(SEVERITY_WEIGHTS)[labels[rows]]))
        spinal = np.flatnonzero((groups == "spinal") & (labels >= 0))
        self.any_severe = None
        if len(spinal):
            order = spinal[np.argsort(frame["study_id"].to_numpy()[spinal], kind="stable")]
            studies = frame["study_id"].to_numpy()[order]
            starts = np.flatnonzero(np.r_[True, studies[1:] != studies[:-1]])
            y = np.maximum.reduceat((labels[order] == 2).astype(float), starts)
            w = np.maximum.reduceat(np.asarray(SEVERITY_WEIGHTS)[labels[order]], starts)
            self.any_severe = (order, starts, y, w)

    def __call__(self, probs: np.ndarray) -> float:
        p = probs / probs.sum(axis=1, keepdims=True)
        p = np.clip(p, 1e-15, 1 - 1e-15)
        terms = [float(np.sum(w * -np.log(p[rows, y])) / np.sum(w)) for rows, y, w in self.groups]
        if self.any_severe is not None:
            order, starts, y, w = self.any_severe
            q = np.clip(np.maximum.reduceat(p[order, 2], starts), 1e-15, 1 - 1e-15)
            terms.append(float(np.sum(w * -(y * np.log(q) + (1 - y) * np.log(1 - q))) / np.sum(w)))
        return float(np.mean(terms))


def fit_blend(frame: pd.DataFrame, per_backbone: list[np.ndarray], backbones: list[str], mode: str,
              fit_temperature: bool) -> Blend:
    """Weights (and temperature) minimising the competition loss of the blended rows of ``frame``."""
    n = len(backbones)
    loss = FastLoss(frame)

    def unpack(x):
        return _softmax(x[:n]), (float(np.exp(x[n])) if fit_temperature else 1.0)

    def objective(x):
        w, t = unpack(x)
        return loss(combine(per_backbone, w, mode, t))

    best = None
    starts = [np.zeros(n)] + [np.eye(n)[i] * 3 for i in range(n)] if n > 1 else [np.zeros(n)]
    for start in starts:
        x0 = np.concatenate([start, [0.0]]) if fit_temperature else start
        result = minimize(objective, x0, method="Powell", options={"xtol": 1e-4, "ftol": 1e-7, "maxiter": 4000})
        if best is None or result.fun < best.fun:
            best = result
    w, t = unpack(best.x)
    return Blend(backbones, w, mode, t)


@dataclass
class BlendReport:
    blend: Blend
    backbone_losses: dict[str, float]
    in_sample: float
    nested: float
    candidates: dict[str, dict] = field(default_factory=dict)
    near_zero: list[str] = field(default_factory=list)
    rows: int = 0


def aligned_oof(output_dir: Path, backbones: list[str]) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """Rows every backbone predicted (the same studies and levels), in one order."""
    frames = {name: read_oof(output_dir, name).set_index("row_id") for name in backbones}
    common = sorted(set.intersection(*(set(f.index) for f in frames.values())))
    if not common:
        raise SpinegradeError("the backbones' OOF predictions share no row: were they trained on the same data?")
    first = frames[backbones[0]].loc[common].reset_index()
    return first, [frames[name].loc[common, list(PROBABILITY_COLUMNS)].to_numpy(dtype=float) for name in backbones]


def nested_loss(frame: pd.DataFrame, per_backbone: list[np.ndarray], backbones: list[str], mode: str,
                fit_temperature: bool) -> tuple[float, np.ndarray]:
    """Loss on each fold of weights fitted on the other folds; returns the pooled loss and the predictions."""
    out = np.zeros_like(per_backbone[0])
    folds = frame["fold"].to_numpy()
    for fold in np.unique(folds):
        train = folds != fold
        blend = fit_blend(frame[train], [p[train] for p in per_backbone], backbones, mode, fit_temperature)
        out[~train] = blend.combine([p[~train] for p in per_backbone])
    return _loss(frame, out), out


def run_blend(output_dir: str | Path, folds_path: str | Path, temperature: bool = False, log=print) -> BlendReport:
    """Blend every complete backbone; write ``oof/blend.json`` and the nested blended OOF in ``oof/blend/``."""
    output_dir = Path(output_dir)
    folds = sorted(read_folds(folds_path)["fold"].unique().tolist())
    names, partial = complete_backbones(output_dir, folds)
    names = [n for n in names if n != BLEND_NAME]
    for name, missing in partial.items():
        if name != BLEND_NAME:
            log(f"{name}: folds {missing} missing; left out of the blend")
    if not names:
        raise SpinegradeError(f"{output_dir / 'oof'}: no backbone has OOF predictions for every fold {folds}")
    frame, per_backbone = aligned_oof(output_dir, names)
    losses = {name: _loss(frame, p) for name, p in zip(names, per_backbone)}
    candidates = {}
    for mode in ("probability", "log"):
        blend = fit_blend(frame, per_backbone, names, mode, temperature)
        nested, nested_probs = nested_loss(frame, per_backbone, names, mode, temperature)
        candidates[mode] = {"blend": blend, "in_sample": _loss(frame, blend.combine(per_backbone)), "nested": nested,
                            "nested_probs": nested_probs}
    mode = min(candidates, key=lambda m: candidates[m]["nested"])
    chosen = candidates[mode]
    blend = chosen["blend"]
    # A backbone that contributes nothing is dropped outright, so prediction never loads it.
    near_zero = [n for n, w in zip(names, blend.weights) if w < NEAR_ZERO]
    snapped = np.where(blend.weights < NEAR_ZERO, 0.0, blend.weights)
    blend.weights = snapped / snapped.sum()
    chosen["in_sample"] = _loss(frame, blend.combine(per_backbone))
    report = BlendReport(blend, losses, chosen["in_sample"], chosen["nested"],
                         {m: {"in_sample": c["in_sample"], "nested": c["nested"], **c["blend"].to_dict()}
                          for m, c in candidates.items()}, near_zero, len(frame))
    # The blend's OOF files hold the nested predictions (each fold blended with weights fitted on the
    # others), so the evaluation scores the blend as honestly as it scores a backbone.
    blended = chosen["nested_probs"]
    for fold in folds:
        rows = frame["fold"].to_numpy() == fold
        out = frame.loc[rows, ["row_id"]].copy()
        out[list(PROBABILITY_COLUMNS)] = blended[rows]
        out["label"], out["fold"] = frame.loc[rows, "label"].to_numpy(), fold
        write_csv_atomic(out, output_dir / "oof" / BLEND_NAME / f"fold{fold}.csv")
    payload = {**blend.to_dict(), "why": f"{mode} mixing had the lower nested loss "
               + ", ".join(f"({m} {c['nested']:.4f})" for m, c in report.candidates.items()),
               "temperature_fitted": temperature, "backbone_oof_loss": losses, "blend_oof_loss_in_sample": report.in_sample,
               "blend_oof_loss_nested": report.nested, "near_zero_weight": near_zero, "rows": len(frame),
               "candidates": report.candidates, "folds": folds}
    write_text_atomic(output_dir / "oof" / "blend.json", json.dumps(payload, indent=1))
    log(format_blend(report))
    return report


def format_blend(report: BlendReport) -> str:
    lines = [f"OOF competition loss over {report.rows} levels (spinal term and any_severe_spinal):"]
    for name, loss in report.backbone_losses.items():
        w = report.blend.weights[report.blend.backbones.index(name)]
        lines.append(f"  {name:24s} {loss:.4f}   weight {w:.3f}{'  (near zero: contributes nothing)' if name in report.near_zero else ''}")
    lines.append(f"  {'blend (' + report.blend.mode + ')':24s} {report.in_sample:.4f}   tuned and scored on the same rows")
    lines.append(f"  {'blend, nested over folds':24s} {report.nested:.4f}   weights fitted on other folds: "
                 "the estimate for unseen studies")
    return "\n".join(lines)


def load_blend(output_dir: str | Path) -> Blend:
    path = Path(output_dir) / "oof" / "blend.json"
    if not path.is_file():
        raise SpinegradeError(f"{path}: no blend yet (run `spinegrade blend` / `make blend`)")
    return Blend.from_dict(json.loads(path.read_text()))
