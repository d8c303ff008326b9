"""One self-contained HTML page comparing the backbones: tables, figures (embedded), examples, data report.

It opens from disk in any browser, without a server or network: images are inlined as base64.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade import plots
from spinegrade.constants import GROUPS, PROBABILITY_COLUMNS, SEVERITIES, level_title
from spinegrade.files import write_text_atomic
from spinegrade.layout import RunLayout
from spinegrade.oof import read_oof

SETTINGS_SHOWN = ["backbone", "input", "image_size", "crop_mm", "num_epochs", "batch_size", "learning_rate",
                  "weight_decay", "level_embeddings", "freeze_backbone", "unfreeze_last_n", "class_weights",
                  "pretrained", "weights", "seed"]

CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1d2330; line-height: 1.4; }
h1 { font-size: 24px; margin-bottom: 2px; } h2 { border-bottom: 2px solid #dde3ee; padding-bottom: 4px; margin-top: 34px; }
h3 { margin-bottom: 6px; } .muted { color: #667085; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 14px; }
th, td { border: 1px solid #dde3ee; padding: 4px 8px; text-align: right; } th { background: #f3f6fb; }
td:first-child, th:first-child { text-align: left; } tr.best td { background: #e8f6ec; font-weight: 600; }
tr.prior td { color: #667085; font-style: italic; }
img { max-width: 100%; border: 1px solid #eef1f6; margin: 4px 0; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; align-items: start; }
pre { background: #f6f8fb; padding: 10px; font-size: 11.5px; overflow-x: auto; }
.card { border: 1px solid #dde3ee; border-radius: 6px; padding: 6px 16px 12px; margin: 18px 0; }
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(frame: pd.DataFrame, row_classes: list[str] | None = None, digits: int = 4) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for i, row in enumerate(frame.itertuples(index=False)):
        cells = []
        for v in row:
            if isinstance(v, (float, np.floating)):
                cells.append(f"<td>{'' if np.isnan(v) else f'{v:.{digits}f}'}</td>")
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _example_figure(layout: RunLayout, name: str, group: str, oof: pd.DataFrame, data_dir: Path,
                    per_grade: int = 4) -> Path | None:
    """A few held-out images per true grade with the model's probabilities: the most and least confident."""
    from spinegrade.data.dicom import read_slice
    from spinegrade.data.index import build_index
    from spinegrade.constants import CONDITION_SPECS
    from spinegrade.data.preprocess import PreprocessSettings, canonical_turn, prepare_image, turn
    from spinegrade.errors import SpinegradeError

    model_files = sorted(layout.model_dir(name, group).glob("fold*/model.json"))
    if not model_files:
        return None
    settings = PreprocessSettings.from_model(json.loads(model_files[0].read_text()))
    try:
        table = build_index(data_dir, check_images=False).table
    except SpinegradeError:
        return None
    merged = oof.merge(table[["study_id", "condition", "level", "image_path", "x", "y"]], on=["study_id", "condition", "level"])
    merged = merged[merged["image_path"].notna()]
    true_p = merged[list(PROBABILITY_COLUMNS)].to_numpy()[np.arange(len(merged)), merged["severity"].to_numpy()]
    merged = merged.assign(true_p=true_p)
    images, captions = [], []
    for grade in range(3):
        rows = merged[merged["severity"] == grade].sort_values(["true_p", "row_id"])
        picks = pd.concat([rows.tail(per_grade // 2), rows.head(per_grade - per_grade // 2)]).drop_duplicates("row_id")
        for r in picks.itertuples():
            try:
                s = read_slice(r.image_path)
            except SpinegradeError:
                continue
            image = prepare_image(s.pixels, s.pixel_spacing, r.x, r.y, settings)
            side = CONDITION_SPECS[r.condition].side
            images.append(turn(image, *canonical_turn(s, side if settings.turn_by_side else None)))  # as trained
            probs = " ".join(f"{p:.2f}" for p in (r.normal_mild, r.moderate, r.severe))
            captions.append(f"{r.study_id} {level_title(r.level)}\ntrue {SEVERITIES[grade]}\nN/M/S {probs}")
    if not images:
        return None
    return plots.examples(images, captions, layout.plots / f"{name}_{group}_examples.png", columns=per_grade)


def write_report(layout: RunLayout, summary: pd.DataFrame, competition: pd.DataFrame, backbones: list,
                 priors: dict, comparison: Path, data_dir: str | Path | None = None,
                 suspects: pd.DataFrame | None = None) -> Path:
    """``report.html``: the full competition score, then a section per condition group (its
    backbones side by side, a card per backbone, the group's class prior), the suspect labels
    (``label_noise``), then the data report."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>spinegrade: out-of-fold report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>spinegrade: out-of-fold evaluation</h1>",
        f"<p class='muted'>{html.escape(str(layout.root.resolve()))} · generated "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} · one model per backbone and condition group; "
        "every figure is computed from the OOF files in <code>oof/</code>. Competition loss: the mean of the "
        "weighted log loss of each group present (and <code>any_severe_spinal</code> with the spinal group); "
        "lower is better. The class prior is the weight-scaled prior of each condition and level, fitted on "
        "each fold's training folds.</p>",
        "<h2>Competition score over the groups graded</h2>",
        _table(competition.dropna(axis=1, how="all"),  # terms of groups nobody graded: no column
               ["prior" if n == priors_name(priors) else "" for n in competition["name"]]),
        _img(comparison, "backbone comparison"),
    ]
    for group in GROUPS:
        rows = summary[summary["group"] == group]
        if rows.empty:
            continue
        spec = GROUPS[group]
        parts.append(f"<h2>{html.escape(group)}: {html.escape(', '.join(spec.conditions))} on {html.escape(spec.series_kind)}</h2>")
        shown = rows.dropna(axis=1, how="all")
        prior_name = priors_name(priors)
        models = shown[shown["name"] != prior_name]
        best = models["score"].idxmin() if not models.empty else None
        classes = ["best" if i == best else ("prior" if n == prior_name else "") for i, n in zip(shown.index, shown["name"])]
        parts.append("<div style='overflow-x:auto'>" + _table(shown.rename(columns={"score": "competition"}), classes) + "</div>")
        for b in (b for b in backbones if b.group == group):
            parts.append(_card(layout, b, data_dir))
        pm = priors[group].metrics
        terms = ", ".join(f"{t} {pm[t]:.4f}" for t in (group, spec.any_severe_term) if t and t in pm)
        parts.append(f"<p>Class prior: competition loss {pm['score']:.4f} ({terms}): the baseline every "
                     f"{html.escape(group)} model must beat.</p>")
    if suspects is not None and len(suspects):
        parts.append(_suspects_section(suspects, data_dir))
    if data_dir is not None and Path(data_dir).is_dir():
        from spinegrade.data.index import build_index, format_report
        from spinegrade.errors import SpinegradeError

        try:
            parts.append(f"<h2>Data</h2><pre>{html.escape(format_report(build_index(data_dir)))}</pre>")
        except SpinegradeError as exc:
            parts.append(f"<h2>Data</h2><p>{html.escape(str(exc))}</p>")
    parts.append("</body></html>")
    write_text_atomic(layout.report, "\n".join(parts))
    return layout.report


def _suspects_section(suspects: pd.DataFrame, data_dir, top: int = 10) -> str:
    """The labels the out-of-fold predictions disagree with most, each linked to its study page (made by
    ``spinegrade predict`` on the study's folder, beside it)."""
    columns = ["rank", "study", "condition", "level", "label", "p_label", "predicted", "disagreement"]
    body = []
    for r in suspects.head(top).itertuples(index=False):
        page = Path(data_dir or ".") / "train_images" / f"{r.study_id}-spinegrade" / "study.html"
        href = page.resolve().as_uri()
        cells = [str(r.rank), f"<a href='{html.escape(href)}'>{r.study_id}</a>", html.escape(r.condition),
                 level_title(r.level), html.escape(r.label), f"{r.p_label:.3f}", html.escape(r.predicted),
                 f"{r.disagreement:.3f}"]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table = ("<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr></thead><tbody>"
             + "".join(body) + "</tbody></table>")
    sources = "; ".join(f"{g}: {src}" for g, src in suspects.groupby("group")["source"].first().items())
    return ("<h2>Suspect labels</h2><p class='muted'>Every training label ranked by how far the out-of-fold "
            "predictions disagree with it, in the metric's terms (the label's weight 1/2/4 times minus the log of "
            f"its probability); predictions: {html.escape(sources)}. The top {top} of {len(suspects)} below; all "
            "in <code>results/suspect_labels.csv</code>. A study's page: <code>spinegrade predict "
            "DATA_DIR/train_images/STUDY</code> writes it where the link points.</p>" + table)


def priors_name(priors: dict) -> str:
    return next(iter(priors.values())).name if priors else "class_prior"


def _card(layout: RunLayout, b, data_dir) -> str:
    """One backbone on one group: settings, per grade, per fold, per level, figures, examples."""
    m = b.metrics
    parts = [f"<div class='card'><h2>{html.escape(b.name)} <span class='muted'>{html.escape(b.group)}</span></h2>"]
    settings = {k: b.settings.get(k) for k in SETTINGS_SHOWN if k in b.settings} or b.settings
    parts.append("<h3>Settings</h3>" + _table(pd.DataFrame({"setting": list(settings), "value": [str(v) for v in settings.values()]})))
    grades = pd.DataFrame({
        "grade": SEVERITIES,
        "support": [m[f"support_{c}"] for c in PROBABILITY_COLUMNS],
        "precision": [m[f"precision_{c}"] for c in PROBABILITY_COLUMNS],
        "recall": [m[f"recall_{c}"] for c in PROBABILITY_COLUMNS],
        "F1": [m[f"f1_{c}"] for c in PROBABILITY_COLUMNS],
        "ROC AUC (one vs rest)": [m[f"roc_auc_{c}"] for c in PROBABILITY_COLUMNS],
    })
    parts.append("<h3>Per grade</h3>" + _table(grades))
    folds = pd.DataFrame([{"fold": f, **v} for f, v in m["per_fold"].items()]).rename(columns={"score": "competition"})
    parts.append("<h3>Per fold</h3>" + _table(folds))
    parts.append("<h3>Per level</h3>" + _table(pd.DataFrame(m["per_level"]).assign(level=lambda d: d["level"].map(level_title))))
    if "curves" in b.figures:
        parts.append(_img(b.figures["curves"], "training curves"))
    parts.append("<div class='grid'>" + _img(b.figures["confusion"], "confusion matrix")
                 + _img(b.figures["reliability"], "reliability diagram") + "</div>")
    if "severe_reliability" in b.figures:
        parts.append("<div class='grid'>" + _img(b.figures["severe_reliability"], "Severe reliability diagram")
                     + "<p class='muted'>Severe, calibration: per bin of the predicted Severe probability, the share "
                       "of those levels labelled Severe (on the diagonal: a Severe probability means what it says; "
                       "the metric weighs a Severe level 4 and the any_severe term reads the highest one).</p></div>")
    parts.append(_img(b.figures["one_vs_rest"], "one-vs-rest confusion matrices"))
    parts.append(_img(b.figures["per_level"], "per level"))
    if data_dir is not None and Path(data_dir).is_dir():
        example = _example_figure(layout, b.name, b.group, read_oof(layout, b.name, b.group), Path(data_dir))
        if example is not None:
            parts.append("<h3>Examples</h3><p class='muted'>Per true grade, the held-out levels the model "
                         "was most and least sure of; probabilities Normal/Mild, Moderate, Severe.</p>")
            parts.append(_img(example, "examples"))
    parts.append("</div>")
    return "".join(parts)
