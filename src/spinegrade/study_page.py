"""One study straight off a scanner: ``spinegrade predict STUDY_DIR``.

The folder is read as a :class:`~spinegrade.study.Study` (``study.scanner_study``: the three series
found among any DICOM files under it, by description, else by orientation and contrast), then graded
exactly as a test split is (``predict.grade_split``, ``submit.submission_frame``), so it gets what a
submission gets: every group, the tuned blend, the prior where a series is missing.

Written to ``OUT`` (``STUDY_DIR-spinegrade`` by default):

- ``grades.json``: all 25 targets, each with its grade, probabilities, where it comes from (the
  model, or the prior and why), and every point it was read at (series, instance, pixel, patient mm);
  the series found and how; the models used per group.
- ``grades-sr.dcm``: the same grades as a DICOM Structured Report (``structured_report.py``), in the
  study of the source images, for a PACS or a DICOM viewer.
- ``study.html``, self-contained (images inline): per group, each graded slice with every located
  point marked and labelled with its grade and probability, so a reader checks at a glance that the
  levels and sides are right.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.constants import (
    CONDITION_GROUP,
    GROUPS,
    PROBABILITY_COLUMNS,
    CONDITION_SPECS,
    SEVERITIES,
    level_title,
    parse_row_id,
)
from spinegrade.data.dicom import Slice, load_pixels
from spinegrade.errors import SpinegradeError
from spinegrade.files import write_text_atomic
from spinegrade.logs import get_logger
from spinegrade.blend import blends_for
from spinegrade.device import select_device
from spinegrade.predict import SplitGrades, grade_split
from spinegrade.structured_report import write_structured_report
from spinegrade.study import Study, scanner_study
from spinegrade.submit import submission_frame, training_priors

log = get_logger(__name__)

GRADE_COLOURS = {"Normal/Mild": "#4caf50", "Moderate": "#ff9800", "Severe": "#f44336"}


def predict_study(study_dir: str | Path, output_dir: str | Path, backbones: list[str] | None = None,
                  out_dir: str | Path | None = None, device: str | None = None) -> dict:
    """Grade all 25 targets of one study folder; write ``grades.json``, ``study.html`` and ``grades-sr.dcm``."""
    study_dir, output_dir = Path(study_dir).resolve(), Path(output_dir)
    if not study_dir.is_dir():
        raise SpinegradeError(f"{study_dir}: not a folder")
    out_dir = Path(out_dir) if out_dir else study_dir.parent / f"{study_dir.name}-spinegrade"
    study, notes = scanner_study(study_dir)
    for f in study.series:
        log.info(f"{f.kind}: series {f.description!r} ({len(f.files)} files), found by {f.found_by}")
    for note in notes:
        log.info(note)
    blends = blends_for(output_dir, backbones)
    grades = grade_split([study], output_dir, blends, select_device(device))
    submission = submission_frame([study.study_id], grades.grades, grades.blends, training_priors(None, output_dir))
    result = _result(study_dir, study, notes, grades, submission)
    pages = _slice_figures(grades, result, study)
    sources = {(s.series_uid, s.instance_number): s.path for located in grades.located.values() for st in located
               if st.locations is not None for s in (st.slice_of(r) for r in st.locations.itertuples())}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "grades.json", json.dumps(result, indent=1))
        write_text_atomic(out_dir / "study.html", _html(result, pages))
        write_structured_report(result["targets"], sources, result["models"], out_dir / "grades-sr.dcm")
    except OSError as exc:
        raise SpinegradeError(f"{out_dir}: cannot write the results there ({exc}); choose another with --out") from None
    for t in result["targets"]:
        log.info(f"{t['condition']:34s} {t['level']}: {t['grade']:12s} "
                 + "  ".join(f"{c} {t['probabilities'][c]:.2f}" for c in PROBABILITY_COLUMNS) + f"  ({t['source']})")
    log.info(f"written: {out_dir / 'grades.json'}, {out_dir / 'study.html'}, {out_dir / 'grades-sr.dcm'}")
    return result


def _result(study_dir: Path, study: Study, notes: list[str], grades: SplitGrades, submission: pd.DataFrame) -> dict:
    located = {group: next((st for st in studies if st.study_id == study.study_id), None)
               for group, studies in grades.located.items()}
    by_key = {f.key: f for f in study.series}
    targets = []
    for r in submission.itertuples(index=False):
        _, condition, level = parse_row_id(r.row_id)
        group = CONDITION_GROUP[condition]
        probs = np.array([getattr(r, c) for c in PROBABILITY_COLUMNS])
        st = located.get(group)
        points = []
        if st is not None and st.locations is not None:
            for h in st.locations[(st.locations["condition"] == condition) & (st.locations["level"] == level)].itertuples():
                s = st.slice_of(h)
                f = by_key[h.series]
                points.append({"series": f.description, "series_uid": f.uid, "series_kind": f.kind,
                               "instance": int(h.instance_number), "x": float(h.x), "y": float(h.y),
                               "patient_mm": [round(float(v), 2) for v in s.pixel_to_patient(h.x, h.y)]})
        if grades.graded(group, study.study_id, condition, level):
            source = "model"
        elif group not in grades.located:
            source = "prior: no model grades this group"
        elif st is not None and st.problem:
            source = f"prior: {st.problem}"
        else:
            source = f"prior: no {GROUPS[group].series_kind} slice reaches this level"
        targets.append({"row_id": r.row_id, "condition": condition, "group": group, "side": CONDITION_SPECS[condition].side,
                        "level": level_title(level), "grade": SEVERITIES[int(probs.argmax())],
                        "probabilities": dict(zip(PROBABILITY_COLUMNS, map(float, probs))), "source": source,
                        "points": points})
    models = {group: {"backbones": dict(zip(b.backbones, map(float, b.weights))), "mode": b.mode,
                      "locator": GROUPS[group].locator} for group, b in grades.blends.items()}
    return {"study_dir": str(study_dir),
            "series": [{"kind": f.kind, "description": f.description, "uid": f.uid, "files": len(f.files),
                        "found_by": f.found_by} for f in study.series],
            "notes": notes, "models": models, "targets": targets}


def _slice_figures(grades: SplitGrades, result: dict, study: Study) -> dict[str, list[tuple[str, str]]]:
    """group -> [(caption, PNG as base64)]: each slice a group was read on, its points marked."""
    by_target = {(t["condition"], t["level"]): t for t in result["targets"]}
    out: dict[str, list[tuple[str, str]]] = {}
    for group, studies in grades.located.items():
        st = next((s for s in studies if s.study_id == study.study_id), None)
        if st is None or st.locations is None:
            continue
        for (series, instance), rows in st.locations.groupby(["series", "instance_number"], sort=False):
            s = st.slice_of(rows.iloc[0])
            marks = []
            for h in rows.itertuples():
                t = by_target[(h.condition, level_title(h.level))]
                side = {"left": "L ", "right": "R "}.get(CONDITION_SPECS[h.condition].side or "", "")
                marks.append((h.x, h.y, f"{side}{t['level']} {t['grade']} {max(t['probabilities'].values()):.2f}",
                              GRADE_COLOURS[t["grade"]]))
            number, f = next((k, f) for k, f in enumerate(study.series, start=1) if f.key == series)
            # several series may share a description
            caption = f"{f.description or f.kind} (series {number} of {len(study.series)}), instance {int(instance)}"
            out.setdefault(group, []).append((caption, _figure(s, marks)))
    return out


def edge_letter(direction: np.ndarray) -> str:
    """The patient direction (LPS: Left/Right, Posterior/Anterior, Superior/Inferior) a unit vector
    mostly points along: the letter a radiologist expects at that edge of the image."""
    axis = int(np.argmax(np.abs(direction)))
    return ("LR", "PA", "SI")[axis][0 if direction[axis] > 0 else 1]


def _figure(s: Slice, marks: list[tuple[float, float, str, str]]) -> str:
    """The slice with its points marked and labelled; each label on the far side of its point from the
    others (left and right recesses straddle the canal), and the patient's directions at the edges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = load_pixels(s)
    rows, cols = pixels.shape
    fig, ax = plt.subplots(figsize=(6, 6 * rows / cols))
    ax.imshow(pixels, cmap="gray", vmin=np.percentile(pixels, 1), vmax=np.percentile(pixels, 99.5))
    centre = float(np.mean([x for x, _, _, _ in marks]))
    for x, y, text, colour in marks:
        right = x >= centre
        ax.plot(x, y, "+", color=colour, markersize=12, markeredgewidth=2)
        ax.text(x + (0.03 if right else -0.03) * cols, y, text, color=colour, fontsize=8, va="center",
                ha="left" if right else "right", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "edgecolor": "none"})
    for (u, v), direction in (((0.98, 0.5), s.row_direction), ((0.02, 0.5), -s.row_direction),
                              ((0.5, 0.98), s.column_direction), ((0.5, 0.02), -s.column_direction)):
        ax.text(u * cols, v * rows, edge_letter(direction), color="yellow", fontsize=11, ha="center", va="center")
    ax.axis("off")
    fig.tight_layout(pad=0.2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _html(result: dict, figures: dict[str, list[tuple[str, str]]]) -> str:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>spinegrade: one study</title><style>",
             "body{font-family:sans-serif;margin:1.5em;background:#fafafa} table{border-collapse:collapse;margin:.5em 0}",
             "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px} figure{display:inline-block;margin:4px}",
             "p.help{color:#555;font-size:13px}",
             "figcaption{font-size:12px;text-align:center} img{max-width:600px}</style></head><body>",
             f"<h1>{html.escape(result['study_dir'])}</h1><p>Series found: "
             + "; ".join(html.escape(f"{s['kind']} ({s['description'] or 'no description'}, {s['files']} files, by "
                                     f"{s['found_by']})") for s in result["series"]) + "</p>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in result["notes"]]
    parts.append("<p class='help'>Each slice shows the points it was read at (L, R: the patient's left and right "
                 "side, from the DICOM geometry), labelled with the grade and its probability; the yellow letters "
                 "are the patient's directions at the image edges (L/R, A/P, S/I).</p>")
    for group, spec in GROUPS.items():
        model = result["models"].get(group)
        used = ", ".join(f"{n} {w:.2f}" for n, w in model["backbones"].items()) if model else "none (prior)"
        parts.append(f"<h2>{group} ({html.escape(spec.series_kind)})</h2><p>models: {html.escape(used)}</p>")
        parts.append("<table><tr><th>target</th><th>level</th><th>grade</th>"
                     + "".join(f"<th>{c}</th>" for c in PROBABILITY_COLUMNS) + "<th>from</th></tr>")
        for t in (t for t in result["targets"] if t["group"] == group):
            parts.append(f"<tr><td>{t['condition']}</td><td>{t['level']}</td>"
                         f"<td style='color:{GRADE_COLOURS[t['grade']]}'><b>{t['grade']}</b></td>"
                         + "".join(f"<td>{t['probabilities'][c]:.3f}</td>" for c in PROBABILITY_COLUMNS)
                         + f"<td>{html.escape(t['source'])}</td></tr>")
        parts.append("</table>")
        for caption, png in figures.get(group, []):
            parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{png}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
