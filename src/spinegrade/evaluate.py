"""Out-of-fold evaluation: every training study predicted by the fold model that never saw it.

``run_evaluation`` reads ``OUTPUT/oof/<name>/<group>/fold*.csv`` for every (backbone, condition
group) whose folds are all there and writes, under the same output directory, ``results/`` (metrics
JSON per backbone and group, ``summary.csv`` with a row per (backbone, group) and the group's class
prior, ``competition.csv`` with the full competition score over the groups each backbone grades,
confusion matrices, per-level tables), ``plots/`` and ``report.html`` (a section per group). Every
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
from spinegrade.blend import blend_info, load_blends, nested_blends
from spinegrade.constants import GROUPS, LEVELS, PROBABILITY_COLUMNS, SEVERITIES, parse_row_id, row_id
from spinegrade.data.folds import read_folds, write_csv_atomic
from spinegrade.data.index import build_index
from spinegrade.device import select_device
from spinegrade.errors import SpinegradeError
from spinegrade.label_noise import suspect_labels
from spinegrade.files import write_text_atomic
from spinegrade.layout import BLEND_NAME, RunLayout, run_folds
from spinegrade.locators import locate_split, locator_trained
from spinegrade.logs import get_logger
from spinegrade.metrics import (
    class_prior,
    classification_metrics,
    competition_score,
    reliability_table,
    severe_reliability_table,
    weighted_log_loss,
)
from spinegrade.oof import complete_names, parsed, read_oof
from spinegrade.predict import grade_studies, load_fold_models
from spinegrade.report import write_report

log = get_logger(__name__)

PRIOR_NAME = "class_prior"
# The metric's terms, in the competition's order: one per group, then the any-severe terms.
TERMS = [*GROUPS, *(g.any_severe_term for g in GROUPS.values() if g.any_severe_term)]
# Figures reported per fold (mean and spread) and in summary.csv.
FOLD_FIGURES = ("score", *TERMS, "accuracy", "balanced_accuracy", "f1_macro")
SUMMARY_COLUMNS = [
    "name", "group", "studies", "rows", "score", "score_located", "score_fold_mean", "score_fold_std", *TERMS,
    "accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted",
    "f1_normal_mild", "f1_moderate", "f1_severe", "roc_auc_normal_mild", "roc_auc_moderate", "roc_auc_severe", "ece",
]


def prior_predictions(oof: pd.DataFrame) -> pd.DataFrame:
    """The class prior of each condition and level, fitted on the training folds of each row's fold
    (so the baseline, like the model, never sees the row it predicts)."""
    out = oof.copy()
    for fold in oof["fold"].unique():
        held = oof["fold"] == fold
        out.loc[held, list(PROBABILITY_COLUMNS)] = class_prior(oof[~held], oof[held])
    return out


def _probs(frame: pd.DataFrame) -> np.ndarray:
    return frame[list(PROBABILITY_COLUMNS)].to_numpy()


def evaluate_predictions(oof: pd.DataFrame) -> dict:
    """Every figure of one set of OOF predictions: overall, per fold (mean and spread), per level."""
    labels = oof["severity"].to_numpy()
    metrics = classification_metrics(labels, _probs(oof))
    metrics.update(competition_score(oof))
    metrics["studies"], metrics["rows"] = int(oof["study_id"].nunique()), int((labels >= 0).sum())
    figures = [k for k in FOLD_FIGURES if k in metrics]  # the group's terms only
    per_fold = {}
    for fold, rows in oof.groupby("fold"):
        m = {**classification_metrics(rows["severity"].to_numpy(), _probs(rows)), **competition_score(rows)}
        per_fold[int(fold)] = {k: m.get(k, float("nan")) for k in figures}
    metrics["per_fold"] = per_fold
    for k in figures:
        values = np.array([f[k] for f in per_fold.values()], dtype=float)
        metrics[f"{k}_fold_mean"] = float(np.nanmean(values))
        metrics[f"{k}_fold_std"] = float(np.nanstd(values))
    metrics["per_level"] = per_level_table(oof).to_dict("records")
    metrics["reliability"] = reliability_table(labels, _probs(oof)).to_dict("records")
    metrics["severe_reliability"] = severe_reliability_table(labels, _probs(oof)).to_dict("records")
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
                     "loss": weighted_log_loss(sub["severity"].to_numpy(), _probs(sub))})
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
    """What the report shows of one backbone (or of the prior) on one condition group."""

    name: str
    group: str
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
        "severe_reliability": plots.reliability(pd.DataFrame(metrics["severe_reliability"]), f"{name}: Severe, calibration",
                                                plots_dir / f"{name}_severe_reliability.png",
                                                xlabel="predicted Severe probability", ylabel="share labelled Severe"),
    }
    if histories:
        figures["curves"] = plots.training_curves(histories, f"{name}: training curves per fold",
                                                  plots_dir / f"{name}_training_curves.png")
    return figures


def _histories(layout: RunLayout, name: str, group: str) -> dict[int, pd.DataFrame]:
    out = {}
    for path in sorted(layout.model_dir(name, group).glob("fold*/metrics.csv")):
        out[int(path.parent.name.removeprefix("fold"))] = pd.read_csv(path)
    return out


def _settings(layout: RunLayout, name: str, group: str) -> dict:
    configs = sorted(layout.model_dir(name, group).glob("fold*/config.yaml"))
    if configs:
        return yaml.safe_load(configs[0].read_text())
    if name == BLEND_NAME and layout.blend_json.is_file():  # a blend's settings are its members and weights
        info = blend_info(layout.root).get(group)
        if info:
            return {"members": ", ".join(f"{b} {w:.3f}" for b, w in zip(info["backbones"], info["weights"])),
                    "mode": info["mode"], "temperature": info["temperature"], "why": info.get("why", "")}
    return {}


def summary_row(name: str, group: str, metrics: dict) -> dict:
    return {c: (name if c == "name" else group if c == "group" else metrics.get(c, float("nan"))) for c in SUMMARY_COLUMNS}


def run_evaluation(output_dir: str | Path, folds_path: str | Path | None = None,
                   data_dir: str | Path | None = None) -> pd.DataFrame:
    """Evaluate every complete (backbone, group) under ``output_dir``; return the summary table."""
    layout = RunLayout(output_dir)
    folds = sorted(read_folds(run_folds(layout, folds_path))["fold"].unique().tolist())
    layout.results.mkdir(parents=True, exist_ok=True)
    reports, rows, priors, full, located = [], [], {}, {}, {}
    for group in GROUPS:
        names, partial = complete_names(layout, group, folds)
        for name, missing in partial.items():
            log.info(f"{name} {group}: folds {missing} have no OOF predictions yet; left out (train them to include it)")
        if not names:
            continue
        at_locators = _located(layout, group, data_dir, names)
        prior_metrics = None
        for name in names:
            oof = read_oof(layout, name, group)
            full.setdefault(name, []).append(oof)
            metrics = evaluate_predictions(oof)
            if name in at_locators and not at_locators[name].empty:
                metrics["score_located"] = competition_score(parsed(at_locators[name]))["score"]
                located.setdefault(f"{name}, located", []).append(parsed(at_locators[name]))
                write_csv_atomic(at_locators[name], layout.located_oof_file(name, group))
            if prior_metrics is None:
                prior_oof = prior_predictions(oof)
                prior_metrics = evaluate_predictions(prior_oof)
                full.setdefault(PRIOR_NAME, []).append(prior_oof)
            settings = _settings(layout, name, group)
            label = f"{name}_{group}"
            payload = {"name": name, "group": group, **metrics,
                       "class_prior": {k: v for k, v in prior_metrics.items() if k != "per_level"},
                       "settings": settings, "folds": folds}
            write_text_atomic(layout.results / f"{label}_oof_metrics.json", json.dumps(payload, indent=1, default=float))
            _write_tables(label, metrics, layout.results)
            reports.append(BackboneReport(name, group, metrics, settings,
                                          _figures(label, metrics, layout.plots, _histories(layout, name, group))))
            rows.append(summary_row(name, group, metrics))
            log.info(f"{name} {group}: OOF competition loss {metrics['score']:.4f} (folds {metrics['score_fold_mean']:.4f} ± "
                     f"{metrics['score_fold_std']:.4f}), macro F1 {metrics['f1_macro']:.3f}, accuracy {metrics['accuracy']:.3f}")
        rows.append(summary_row(PRIOR_NAME, group, prior_metrics))
        priors[group] = BackboneReport(PRIOR_NAME, group, prior_metrics)
        label = f"{PRIOR_NAME}_{group}"
        _write_tables(label, prior_metrics, layout.results)
        write_text_atomic(layout.results / f"{label}_oof_metrics.json",
                          json.dumps({"name": PRIOR_NAME, "group": group, **prior_metrics}, indent=1, default=float))
    if not rows:
        raise SpinegradeError(f"{layout.oof}: no backbone has OOF predictions for every fold {folds} of any group")
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    write_csv_atomic(summary, layout.results / "summary.csv")
    # the same terms end to end: each held-out study located by its fold's locators (levels not located left out)
    competition = pd.concat([competition_table(full), competition_table(located)], ignore_index=True)
    write_csv_atomic(competition, layout.results / "competition.csv")
    comparison = plots.compare_backbones(summary, layout.plots / "backbones_comparison.png")
    suspects = suspect_labels(layout, folds)
    write_csv_atomic(suspects, layout.results / "suspect_labels.csv")
    report = write_report(layout, summary, competition, reports, priors, comparison, data_dir=data_dir,
                          suspects=suspects)
    log.info(f"report: {report}")
    return summary


def competition_table(full: dict[str, list[pd.DataFrame]]) -> pd.DataFrame:
    """The competition's terms and their mean for each name over every group it has OOF rows of (the
    class prior over every group evaluated): the figure a submission of those models would get on
    these studies, for the targets they grade."""
    rows = []
    for name, frames in full.items():
        scores = competition_score(pd.concat(frames, ignore_index=True))
        groups = [g for g in GROUPS if g in scores]
        rows.append({"name": name, "groups": " ".join(groups), **{t: scores.get(t, float("nan")) for t in TERMS},
                     "score": scores["score"]})
    return pd.DataFrame(rows, columns=["name", "groups", *TERMS, "score"])


def _located(layout: RunLayout, group: str, data_dir, names: list[str]) -> dict[str, pd.DataFrame]:
    """End-to-end OOF predictions (the locator's points) of the group's trained backbones, when the
    group has a trained locator and the images are at hand; empty otherwise."""
    trained = [n for n in names if layout.finished_fold_dirs(n, group)]
    if data_dir is None or not trained or GROUPS[group].locator is None or not locator_trained(layout.root, group):
        return {}
    out = located_oof(layout.root, data_dir, layout.folds if layout.folds.is_file() else None, trained, group)
    blends = load_blends(layout.root) if layout.blend_json.is_file() else {}
    blend = blends.get(group)
    if BLEND_NAME in names and blend is not None and all(n in out for n in blend.backbones):
        # each fold mixed with the weights fitted on the other folds, as the blend's own OOF rows are
        # (a blend saved before those were kept: its weights fitted on every fold, said so in the log)
        per_fold = nested_blends(layout.root, group)
        if not per_fold:
            log.info(f"{group}: blend.json keeps no per-fold blends (written by an older version): the located "
                     "blend row uses weights fitted on every fold; run `spinegrade blend` again for a nested one")
        frames = [out[n].set_index("row_id") for n in blend.backbones]  # the blend's members, mixed the same way
        common = sorted(set.intersection(*(set(f.index) for f in frames)))
        merged = frames[0].loc[common, ["label", "fold"]].reset_index()
        probs = np.zeros((len(common), len(PROBABILITY_COLUMNS)))
        for fold in merged["fold"].unique():
            rows = (merged["fold"] == fold).to_numpy()
            mixing = per_fold.get(int(fold), blend)
            members = [f.loc[common].loc[rows, list(PROBABILITY_COLUMNS)].to_numpy()
                       for f in (frames[blend.backbones.index(n)] for n in mixing.backbones)]
            studies = [parse_row_id(r)[0] for r in merged.loc[rows, "row_id"]]
            probs[rows] = mixing.combine(members, np.asarray(studies))
        merged[list(PROBABILITY_COLUMNS)] = probs
        out[BLEND_NAME] = merged[["row_id", *PROBABILITY_COLUMNS, "label", "fold"]]
    return out


def format_summary(summary: pd.DataFrame) -> str:
    terms = [t for t in TERMS if summary[t].notna().any()]
    columns = ["name", "group", "studies", "rows", "score", "score_located", *terms, "f1_macro", "accuracy", "ece"]
    return summary[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="")


def format_competition(competition: pd.DataFrame) -> str:
    terms = [t for t in TERMS if competition[t].notna().any()]
    return ("OOF competition score over the groups each graded (the prior: over every group evaluated):\n"
            + competition[["name", "groups", *terms, "score"]].to_string(index=False, float_format=lambda v: f"{v:.4f}",
                                                                          na_rep=""))


def oof_scores(oof: pd.DataFrame) -> dict[str, float]:
    """Competition terms of the OOF predictions and of the prior baseline on the same rows."""
    model = competition_score(oof)
    prior = competition_score(prior_predictions(oof))
    return {**model, **{f"prior_{k}": v for k, v in prior.items()}, "rows": len(oof),
            "studies": int(oof["study_id"].nunique()), "folds": int(oof["fold"].nunique())}


def format_scores(name: str, group: str, scores: dict[str, float]) -> str:
    terms = [k for k in (*TERMS, "score") if k in scores]
    model = "  ".join(f"{k} {scores[k]:.4f}" for k in terms)
    prior = "  ".join(f"{k} {scores['prior_' + k]:.4f}" for k in terms)
    return (f"{name} {group}: out-of-fold over {scores['folds']} folds, {scores['studies']} studies, {scores['rows']} levels\n"
            f"  model: {model}\n  prior: {prior}")


def located_oof(output_dir: str | Path, data_dir: str | Path, folds_path: str | Path | None, backbones: list[str],
                group: str = "spinal", device: str | None = None) -> dict[str, pd.DataFrame]:
    """Out-of-fold predictions of one group without coordinates: each training study located by the
    fold's locator and graded by the fold models that never saw it. Beside the OOF predictions at the
    labelled points, this shows what locating costs."""
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
            for r in grade_studies(studies, own, device_).itertuples(index=False):
                severity = labels.get((r.study_id, r.condition, r.level), -1)
                if severity >= 0:
                    rows.append([row_id(r.study_id, r.condition, r.level), *(getattr(r, c) for c in PROBABILITY_COLUMNS),
                                 SEVERITIES[severity], fold])
        out[name] = pd.DataFrame(rows, columns=["row_id", *PROBABILITY_COLUMNS, "label", "fold"])
        log.info(f"{name} {group}: {len(rows)} held-out levels graded at the locator's points")
    return out
