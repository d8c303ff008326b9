"""Out-of-fold evaluation: every training study predicted by the fold model that never saw it.

``run_evaluation`` reads ``OUTPUT/oof/<name>/fold*.csv`` for every backbone whose folds are all
there and writes, under the same output directory, ``results/`` (metrics JSON per backbone,
``summary.csv``, confusion matrices, per-level tables), ``plots/`` and ``report.html``. Every
figure is computed from the OOF files on disk, so any number can be traced back to predictions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from spinegrade import plots
from spinegrade.constants import LEVELS, PROBABILITY_COLUMNS, SEVERITIES, SEVERITY_INDEX, parse_row_id
from spinegrade.data.folds import read_folds, write_csv_atomic
from spinegrade.files import write_text_atomic
from spinegrade.metrics import (
    classification_metrics,
    competition_score,
    reliability_table,
    weighted_log_loss,
    weighted_prior,
)

PRIOR_NAME = "class_prior"
# Figures reported per fold (mean and spread) and in summary.csv.
FOLD_FIGURES = ("score", "spinal", "any_severe_spinal", "accuracy", "balanced_accuracy", "f1_macro")
SUMMARY_COLUMNS = [
    "name", "studies", "rows", "score", "score_localised", "score_fold_mean", "score_fold_std", "spinal",
    "spinal_localised", "any_severe_spinal",
    "accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted",
    "f1_normal_mild", "f1_moderate", "f1_severe", "roc_auc_normal_mild", "roc_auc_moderate", "roc_auc_severe", "ece",
]


def read_oof(output_dir: str | Path, name: str) -> pd.DataFrame:
    """All fold files of one backbone, with study_id, condition, level and severity parsed out."""
    paths = sorted((Path(output_dir) / "oof" / name).glob("fold*.csv"))
    if not paths:
        return pd.DataFrame()
    return _parsed(pd.concat([pd.read_csv(p) for p in paths], ignore_index=True))


def _parsed(oof: pd.DataFrame) -> pd.DataFrame:
    parsed = [parse_row_id(r) for r in oof["row_id"]]
    return oof.assign(study_id=[p[0] for p in parsed], condition=[p[1] for p in parsed],
                      level=[p[2] for p in parsed], severity=oof["label"].map(SEVERITY_INDEX).astype(int))


def complete_backbones(output_dir: str | Path, folds: list[int]) -> tuple[list[str], dict[str, list[int]]]:
    """Backbones with an OOF file for every fold, and the missing folds of the others."""
    complete, partial = [], {}
    root = Path(output_dir) / "oof"
    for directory in sorted(p for p in root.glob("*") if p.is_dir() and p.name != "localised"):
        present = {int(p.stem.removeprefix("fold")) for p in directory.glob("fold*.csv")}
        models = Path(output_dir) / "trained_models" / directory.name
        if models.is_dir():  # a fold still training (or killed) has OOF files but no done.json
            present &= {int(p.parent.name.removeprefix("fold")) for p in models.glob("fold*/done.json")}
        missing = [f for f in folds if f not in present]
        if missing:
            partial[directory.name] = missing
        else:
            complete.append(directory.name)
    return complete, partial


def prior_predictions(oof: pd.DataFrame) -> pd.DataFrame:
    """The weight-scaled class prior of each condition and level, fitted on the training folds of each
    row's fold (so the baseline, like the model, never sees the row it predicts)."""
    out = oof.copy()
    for fold in oof["fold"].unique():
        train = oof[oof["fold"] != fold]
        for (condition, level), rows in oof[oof["fold"] == fold].groupby(["condition", "level"]):
            seen = train[(train["condition"] == condition) & (train["level"] == level)]["severity"].to_numpy()
            out.loc[rows.index, list(PROBABILITY_COLUMNS)] = weighted_prior(seen)
    return out


def _probs(frame: pd.DataFrame) -> np.ndarray:
    return frame[list(PROBABILITY_COLUMNS)].to_numpy()


def evaluate_predictions(oof: pd.DataFrame) -> dict:
    """Every figure of one set of OOF predictions: overall, per fold (mean and spread), per level."""
    labels = oof["severity"].to_numpy()
    metrics = classification_metrics(labels, _probs(oof))
    metrics.update(competition_score(oof))
    metrics["studies"], metrics["rows"] = int(oof["study_id"].nunique()), int((labels >= 0).sum())
    per_fold = {}
    for fold, rows in oof.groupby("fold"):
        m = {**classification_metrics(rows["severity"].to_numpy(), _probs(rows)), **competition_score(rows)}
        per_fold[int(fold)] = {k: m.get(k, float("nan")) for k in FOLD_FIGURES}
    metrics["per_fold"] = per_fold
    for k in FOLD_FIGURES:
        values = np.array([f[k] for f in per_fold.values()], dtype=float)
        metrics[f"{k}_fold_mean"] = float(np.nanmean(values))
        metrics[f"{k}_fold_std"] = float(np.nanstd(values))
    metrics["per_level"] = per_level_table(oof).to_dict("records")
    metrics["reliability"] = reliability_table(labels, _probs(oof)).to_dict("records")
    return metrics


def per_level_table(oof: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for level in LEVELS:
        sub = oof[oof["level"] == level]
        if sub.empty:
            continue
        m = classification_metrics(sub["severity"].to_numpy(), _probs(sub))
        rows.append({"level": level, "support": len(sub), "accuracy": m["accuracy"],
                     **{f"f1_{c}": m[f"f1_{c}"] for c in PROBABILITY_COLUMNS},
                     "spinal_loss": weighted_log_loss(sub["severity"].to_numpy(), _probs(sub))})
    return pd.DataFrame(rows)


def one_vs_rest_matrices(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Each grade against the other two: [[TN, FP], [FN, TP]]."""
    confusion = np.asarray(confusion)
    total = confusion.sum()
    out = {}
    for k, grade in enumerate(SEVERITIES):
        tp = confusion[k, k]
        fn = confusion[k].sum() - tp
        fp = confusion[:, k].sum() - tp
        out[grade] = np.array([[total - tp - fn - fp, fp], [fn, tp]])
    return out


@dataclass
class BackboneReport:
    """What the report shows of one backbone (or of the prior)."""

    name: str
    metrics: dict
    settings: dict = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)


def _write_tables(name: str, metrics: dict, results: Path) -> None:
    confusion = np.array(metrics["confusion_matrix"])
    normalised = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    frame = pd.DataFrame(confusion, index=SEVERITIES, columns=SEVERITIES)
    frame_norm = pd.DataFrame(normalised, index=SEVERITIES, columns=SEVERITIES)
    both = pd.concat({"count": frame, "row_normalised": frame_norm}, names=["table", "true"]).reset_index()
    write_csv_atomic(both, results / f"{name}_confusion_matrix.csv")
    ovr = [{"grade": g, "tn": int(m[0, 0]), "fp": int(m[0, 1]), "fn": int(m[1, 0]), "tp": int(m[1, 1])}
           for g, m in one_vs_rest_matrices(confusion).items()]
    write_csv_atomic(pd.DataFrame(ovr), results / f"{name}_confusion_one_vs_rest.csv")
    write_csv_atomic(pd.DataFrame(metrics["per_level"]), results / f"{name}_per_level.csv")


def _figures(name: str, metrics: dict, plots_dir: Path, histories: dict[int, pd.DataFrame]) -> dict[str, Path]:
    confusion = np.array(metrics["confusion_matrix"])
    figures = {
        "confusion": plots.confusion_matrix(confusion, f"{name}: OOF confusion matrix", plots_dir / f"{name}_confusion_matrix.png"),
        "one_vs_rest": plots.one_vs_rest(one_vs_rest_matrices(confusion), f"{name}: each grade against the others",
                                         plots_dir / f"{name}_confusion_one_vs_rest.png"),
        "reliability": plots.reliability(pd.DataFrame(metrics["reliability"]), f"{name}: reliability (ECE {metrics['ece']:.3f})",
                                         plots_dir / f"{name}_reliability.png"),
        "per_level": plots.per_level(pd.DataFrame(metrics["per_level"]), f"{name}: per level", plots_dir / f"{name}_per_level.png"),
    }
    if histories:
        figures["curves"] = plots.training_curves(histories, f"{name}: training curves per fold",
                                                  plots_dir / f"{name}_training_curves.png")
    return figures


def _histories(output_dir: Path, name: str) -> dict[int, pd.DataFrame]:
    out = {}
    for path in sorted((output_dir / "trained_models" / name).glob("fold*/metrics.csv")):
        out[int(path.parent.name.removeprefix("fold"))] = pd.read_csv(path)
    return out


def _settings(output_dir: Path, name: str) -> dict:
    configs = sorted((output_dir / "trained_models" / name).glob("fold*/config.yaml"))
    if configs:
        return yaml.safe_load(configs[0].read_text())
    blend = output_dir / "oof" / "blend.json"
    if name == "blend" and blend.is_file():  # a blend's settings are its members and weights
        info = json.loads(blend.read_text())
        return {"members": ", ".join(f"{b} {w:.3f}" for b, w in zip(info["backbones"], info["weights"])),
                "mode": info["mode"], "temperature": info["temperature"], "why": info.get("why", "")}
    return {}


def summary_row(name: str, metrics: dict) -> dict:
    return {c: (name if c == "name" else metrics.get(c, float("nan"))) for c in SUMMARY_COLUMNS}


def run_evaluation(output_dir: str | Path, folds_path: str | Path, data_dir: str | Path | None = None,
                   log=print) -> pd.DataFrame:
    """Evaluate every complete backbone under ``output_dir``; return the summary table."""
    from spinegrade.errors import SpinegradeError
    from spinegrade.report import write_report

    output_dir = Path(output_dir)
    folds = sorted(read_folds(folds_path)["fold"].unique().tolist())
    names, partial = complete_backbones(output_dir, folds)
    for name, missing in partial.items():
        log(f"{name}: folds {missing} have no OOF predictions yet; left out (train them to include it)")
    if not names:
        raise SpinegradeError(f"{output_dir / 'oof'}: no backbone has OOF predictions for every fold {folds}")
    results, plots_dir = output_dir / "results", output_dir / "plots"
    results.mkdir(parents=True, exist_ok=True)
    reports, rows = [], []
    prior_metrics = None
    localised = _localised(output_dir, data_dir, folds_path, names, log)
    for name in names:
        oof = read_oof(output_dir, name)
        metrics = evaluate_predictions(oof)
        if name in localised and not localised[name].empty:
            scores = competition_score(_parsed(localised[name]))
            metrics["score_localised"], metrics["spinal_localised"] = scores["score"], scores.get("spinal", float("nan"))
            write_csv_atomic(localised[name], output_dir / "oof" / "localised" / f"{name}.csv")
        if prior_metrics is None:
            prior_metrics = evaluate_predictions(prior_predictions(oof))
        settings = _settings(output_dir, name)
        payload = {"name": name, **metrics, "class_prior": {k: v for k, v in prior_metrics.items() if k != "per_level"},
                   "settings": settings, "folds": folds}
        write_text_atomic(results / f"{name}_oof_metrics.json", json.dumps(payload, indent=1, default=float))
        _write_tables(name, metrics, results)
        reports.append(BackboneReport(name, metrics, settings, _figures(name, metrics, plots_dir, _histories(output_dir, name))))
        rows.append(summary_row(name, metrics))
        log(f"{name}: OOF competition loss {metrics['score']:.4f} (folds {metrics['score_fold_mean']:.4f} ± "
            f"{metrics['score_fold_std']:.4f}), macro F1 {metrics['f1_macro']:.3f}, accuracy {metrics['accuracy']:.3f}")
    rows.append(summary_row(PRIOR_NAME, prior_metrics))
    _write_tables(PRIOR_NAME, prior_metrics, results)
    write_text_atomic(results / f"{PRIOR_NAME}_oof_metrics.json", json.dumps({"name": PRIOR_NAME, **prior_metrics}, indent=1, default=float))
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    write_csv_atomic(summary, results / "summary.csv")
    comparison = plots.compare_backbones(summary, plots_dir / "backbones_comparison.png")
    report = write_report(output_dir, summary, reports, BackboneReport(PRIOR_NAME, prior_metrics), comparison,
                          data_dir=data_dir)
    log(f"report: {report}")
    return summary


def _localised(output_dir: Path, data_dir, folds_path, names: list[str], log) -> dict[str, pd.DataFrame]:
    """End-to-end OOF predictions (localiser's points) of the trained backbones, when there is a
    localiser and the images are at hand; empty otherwise."""
    from spinegrade.localize import localizer_dir

    trained = [n for n in names if any((output_dir / "trained_models" / n).glob("fold*/best.safetensors"))]
    if data_dir is None or not trained or not any(localizer_dir(output_dir).glob("fold*/best.safetensors")):
        return {}
    from spinegrade.blend import BLEND_NAME, load_blend
    from spinegrade.predict import localised_oof

    out = localised_oof(output_dir, data_dir, folds_path, trained, log=log)
    if BLEND_NAME in names and (output_dir / "oof" / "blend.json").is_file():
        blend = load_blend(output_dir)
        if all(n in out for n in blend.backbones):  # the blend's members, mixed the same way
            frames = [out[n].set_index("row_id") for n in blend.backbones]
            common = sorted(set.intersection(*(set(f.index) for f in frames)))
            mixed = blend.combine([f.loc[common, list(PROBABILITY_COLUMNS)].to_numpy() for f in frames])
            merged = frames[0].loc[common, ["label", "fold"]].reset_index()
            merged[list(PROBABILITY_COLUMNS)] = mixed
            out[BLEND_NAME] = merged[["row_id", *PROBABILITY_COLUMNS, "label", "fold"]]
    return out


def format_summary(summary: pd.DataFrame) -> str:
    columns = ["name", "studies", "rows", "score", "score_localised", "spinal", "any_severe_spinal", "f1_macro",
               "accuracy", "ece"]
    return summary[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}")


def oof_scores(oof: pd.DataFrame) -> dict[str, float]:
    """Competition terms of the OOF predictions and of the prior baseline on the same rows."""
    model = competition_score(oof)
    prior = competition_score(prior_predictions(oof))
    return {**model, **{f"prior_{k}": v for k, v in prior.items()}, "rows": len(oof),
            "studies": int(oof["study_id"].nunique()), "folds": int(oof["fold"].nunique())}


def format_scores(name: str, scores: dict[str, float]) -> str:
    terms = [k for k in ("spinal", "any_severe_spinal", "score") if k in scores]
    model = "  ".join(f"{k} {scores[k]:.4f}" for k in terms)
    prior = "  ".join(f"{k} {scores['prior_' + k]:.4f}" for k in terms)
    return (f"{name}: out-of-fold over {scores['folds']} folds, {scores['studies']} studies, {scores['rows']} levels\n"
            f"  model: {model}\n  prior: {prior}")
