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
from spinegrade.constants import PROBABILITY_COLUMNS, SEVERITIES, level_title
from spinegrade.files import write_text_atomic

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


def _example_figure(output_dir: Path, name: str, oof: pd.DataFrame, data_dir: Path, per_grade: int = 4) -> Path | None:
    """A few held-out images per true grade with the model's probabilities: the most and least confident."""
    from spinegrade.data.dicom import read_slice
    from spinegrade.data.index import build_index
    from spinegrade.data.preprocess import PreprocessSettings, prepare_image
    from spinegrade.errors import SpinegradeError

    model_files = sorted((output_dir / "trained_models" / name).glob("fold*/model.json"))
    if not model_files:
        return None
    spec = json.loads(model_files[0].read_text())
    settings = PreprocessSettings(spec["condition"], spec["input"], int(spec["image_size"]), float(spec["crop_mm"]))
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
            images.append(prepare_image(s.pixels, s.pixel_spacing, r.x, r.y, settings))
            probs = " ".join(f"{p:.2f}" for p in (r.normal_mild, r.moderate, r.severe))
            captions.append(f"{r.study_id} {level_title(r.level)}\ntrue {SEVERITIES[grade]}\nN/M/S {probs}")
    if not images:
        return None
    return plots.examples(images, captions, output_dir / "plots" / f"{name}_examples.png", columns=per_grade)


def write_report(output_dir: Path, summary: pd.DataFrame, backbones: list, prior, comparison: Path,
                 data_dir: str | Path | None = None) -> Path:
    from spinegrade.evaluate import read_oof

    output_dir = Path(output_dir)
    best = summary[summary["name"] != prior.name]["score"].idxmin()
    classes = ["best" if i == best else ("prior" if n == prior.name else "") for i, n in zip(summary.index, summary["name"])]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>spinegrade: out-of-fold report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>spinegrade: out-of-fold evaluation</h1>",
        f"<p class='muted'>{html.escape(str(output_dir.resolve()))} · generated "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} · spinal canal stenosis, graded per level; "
        "every figure is computed from the OOF files in <code>oof/</code>. Competition loss: mean of the spinal "
        "weighted log loss and <code>any_severe_spinal</code> (the terms these models cover; lower is better). "
        "The class prior is the weight-scaled prior of each level, fitted on each fold's training folds.</p>",
        "<h2>Backbones side by side</h2>",
        "<div style='overflow-x:auto'>" + _table(summary.rename(columns={"score": "competition"}), classes) + "</div>",
        _img(comparison, "backbone comparison"),
    ]
    for b in backbones:
        m = b.metrics
        parts.append(f"<div class='card'><h2>{html.escape(b.name)}</h2>")
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
        parts.append(_img(b.figures["one_vs_rest"], "one-vs-rest confusion matrices"))
        parts.append(_img(b.figures["per_level"], "per level"))
        if data_dir is not None and Path(data_dir).is_dir():
            example = _example_figure(output_dir, b.name, read_oof(output_dir, b.name), Path(data_dir))
            if example is not None:
                parts.append("<h3>Examples</h3><p class='muted'>Per true grade, the held-out levels the model "
                             "was most and least sure of; probabilities Normal/Mild, Moderate, Severe.</p>")
                parts.append(_img(example, "examples"))
        parts.append("</div>")
    pm = prior.metrics
    parts.append(f"<h2>Class prior</h2><p>Competition loss {pm['score']:.4f} (spinal {pm['spinal']:.4f}, "
                 f"any_severe_spinal {pm['any_severe_spinal']:.4f}): the baseline every model must beat.</p>")
    if data_dir is not None and Path(data_dir).is_dir():
        from spinegrade.data.index import build_index, format_report
        from spinegrade.errors import SpinegradeError

        try:
            parts.append(f"<h2>Data</h2><pre>{html.escape(format_report(build_index(data_dir)))}</pre>")
        except SpinegradeError as exc:
            parts.append(f"<h2>Data</h2><p>{html.escape(str(exc))}</p>")
    parts.append("</body></html>")
    path = output_dir / "report.html"
    write_text_atomic(path, "\n".join(parts))
    return path
