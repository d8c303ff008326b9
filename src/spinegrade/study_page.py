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
import time
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.blend import blends_for
from spinegrade.constants import (
    CONDITION_SPECS,
    GROUPS,
    PROBABILITY_COLUMNS,
    level_title,
)
from spinegrade.data.dicom import Slice, load_pixels
from spinegrade.device import select_device
from spinegrade.errors import SpinegradeError
from spinegrade.evidence import (
    EVIDENCE_DIR,
    EvidenceMap,
    file_name,
    overlay,
    png_bytes,
    require_grad_cam,
    study_evidence,
)
from spinegrade.files import write_text_atomic
from spinegrade.findings import located_in, models_used, source_files, study_targets
from spinegrade.logs import get_logger
from spinegrade.predict import SplitGrades, grade_split
from spinegrade.structured_report import write_structured_report
from spinegrade.study import Study, scanner_study
from spinegrade.submit import submission_frame, training_priors

log = get_logger(__name__)

GRADE_COLOURS = {"Normal/Mild": "#4caf50", "Moderate": "#ff9800", "Severe": "#f44336"}


def predict_study(study_dir: str | Path, output_dir: str | Path, backbones: list[str] | None = None,
                  out_dir: str | Path | None = None, device: str | None = None, evidence: bool = True) -> dict:
    """Grade all 25 targets of one study folder; write ``grades.json``, ``study.html``, ``grades-sr.dcm``
    and, with ``evidence``, a map per graded crop under ``evidence/`` (``evidence.py``)."""
    study_dir, output_dir = Path(study_dir).resolve(), Path(output_dir)
    if not study_dir.is_dir():
        raise SpinegradeError(f"{study_dir}: not a folder")
    if evidence:
        require_grad_cam()
    out_dir = Path(out_dir) if out_dir else study_dir.parent / f"{study_dir.name}-spinegrade"
    study, notes = scanner_study(study_dir)
    for f in study.series:
        log.info(f"{f.kind}: series {f.description!r} ({len(f.files)} files), found by {f.found_by}")
    for note in notes:
        log.info(note)
    blends = blends_for(output_dir, backbones)
    torch_device = select_device(device)
    grades = grade_split([study], output_dir, blends, torch_device, keep=evidence)
    submission = submission_frame([study.study_id], grades.grades, grades.blends, training_priors(None, output_dir))
    result = _result(study_dir, study, notes, grades, submission)
    pages = _slice_figures(grades, result, study)
    maps: dict[str, list[EvidenceMap]] = {}
    if evidence:
        t0 = time.perf_counter()
        maps = study_evidence(grades, result["targets"], study.study_id, output_dir, torch_device)
        result["evidence"] = {"method": "Grad-CAM of the grade given, at the backbone's last feature map",
                              "seconds": round(time.perf_counter() - t0, 3),
                              "groups": {g: {"backbone": m[0].backbone, "folds": m[0].folds, "whole_slice": m[0].whole_slice,
                                             "turned": any(x.turned for x in m)} for g, m in maps.items() if m}}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        figures = _write_evidence(maps, result["targets"], out_dir)
        write_text_atomic(out_dir / "grades.json", json.dumps(result, indent=1))
        write_text_atomic(out_dir / "study.html", _html(result, pages, figures))
        write_structured_report(result["targets"], source_files(study, grades), result["models"], out_dir / "grades-sr.dcm")
    except OSError as exc:
        raise SpinegradeError(f"{out_dir}: cannot write the results there ({exc}); choose another with --out") from None
    for t in result["targets"]:
        log.info(f"{t['condition']:34s} {t['level']}: {t['grade']:12s} "
                 + "  ".join(f"{c} {t['probabilities'][c]:.2f}" for c in PROBABILITY_COLUMNS) + f"  ({t['source']})")
    written = ["grades.json", "study.html", "grades-sr.dcm"] + ([f"{EVIDENCE_DIR}/ ({sum(map(len, maps.values()))} maps, "
                                                                 f"{result['evidence']['seconds']:.1f} s)"] if evidence else [])
    log.info(f"written to {out_dir}: {', '.join(written)}")
    return result


def _write_evidence(maps: dict[str, list[EvidenceMap]], targets: list[dict], out_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Each map as a PNG under ``OUT/evidence/``, named in its target's ``evidence`` list (the folder
    emptied first: a rerun leaves no stale map); group -> [(caption, PNG as base64)] for the page."""
    folder = out_dir / EVIDENCE_DIR
    if folder.is_dir():
        for old in folder.glob("*.png"):
            old.unlink()
    by_target = {(t["condition"], t["level"]): t for t in targets}
    for t in targets:
        t["evidence"] = []
    figures: dict[str, list[tuple[str, str]]] = {}
    taken: set[str] = set()
    for group, group_maps in maps.items():
        for m in group_maps:
            png = png_bytes(overlay(m))
            name = file_name(m, taken)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(png)
            by_target[(m.condition, m.level)]["evidence"].append(f"{EVIDENCE_DIR}/{name}")
            where = f"instance {m.instance_number}" + (f", frame {m.frame}" if m.frame else "")
            figures.setdefault(group, []).append((f"{side_prefix(m.condition)}{m.level}: {m.grade} ({where})",
                                                  base64.b64encode(png).decode()))
    return figures


def _result(study_dir: Path, study: Study, notes: list[str], grades: SplitGrades, submission: pd.DataFrame) -> dict:
    return {"study_dir": str(study_dir),
            "series": [{"kind": f.kind, "description": f.description, "uid": f.uid, "files": len(f.files),
                        "found_by": f.found_by} for f in study.series],
            "notes": notes, "models": models_used(grades.blends), "targets": study_targets(study, grades, submission)}


def side_prefix(condition: str) -> str:
    """"L " or "R " for a sided condition (the patient's side), "" for the canal: how labels name a side."""
    return {"left": "L ", "right": "R "}.get(CONDITION_SPECS[condition].side or "", "")


def _slice_figures(grades: SplitGrades, result: dict, study: Study) -> dict[str, list[tuple[str, str]]]:
    """group -> [(caption, PNG as base64)]: each slice a group was read on, its points marked."""
    by_target = {(t["condition"], t["level"]): t for t in result["targets"]}
    out: dict[str, list[tuple[str, str]]] = {}
    for group, st in located_in(grades, study.study_id).items():
        if st is None or st.locations is None:
            continue
        for (series, instance, frame), rows in st.locations.groupby(["series", "instance_number", "frame"], sort=False):
            s = st.slice_of(rows.iloc[0])
            marks = []
            for h in rows.itertuples():
                t = by_target[(h.condition, level_title(h.level))]
                marks.append((h.x, h.y, f"{side_prefix(h.condition)}{t['level']} {t['grade']} {max(t['probabilities'].values()):.2f}",
                              GRADE_COLOURS[t["grade"]]))
            number, f = next((k, f) for k, f in enumerate(study.series, start=1) if f.key == series)
            # several series may share a description
            caption = (f"{f.description or f.kind} (series {number} of {len(study.series)}), instance {int(instance)}"
                       + (f", frame {int(frame)}" if frame else ""))
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
    # zlib's fastest level: the same pixels, about 0.6x the time to save a figure, a quarter larger
    fig.savefig(buffer, format="png", dpi=100, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _html(result: dict, figures: dict[str, list[tuple[str, str]]], evidence: dict[str, list[tuple[str, str]]]) -> str:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>spinegrade: one study</title><style>",
             "body{font-family:sans-serif;margin:1.5em;background:#fafafa} table{border-collapse:collapse;margin:.5em 0}",
             "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px} figure{display:inline-block;margin:4px}",
             "p.help{color:#555;font-size:13px}",
             "figcaption{font-size:12px;text-align:center} img{max-width:600px} figure.evidence img{width:192px}</style></head><body>",
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
        if evidence.get(group):
            how = result["evidence"]["groups"][group]
            saw = ("the whole slice" if how["whole_slice"] else "its crop, centred on the located point"
                   + ("; turned so that the side's lateral is on the right" if how["turned"]
                      else "; turned to its plane's one orientation"))
            parts.append(f"<h3>Evidence</h3><p class='help'>Where the model found each grade: a Grad-CAM map of the grade "
                         f"given (red: most), on what the model saw ({saw}), from {html.escape(how['backbone'])}, the "
                         f"blend's heaviest backbone, averaged over its {how['folds']} folds.</p>")
            for caption, png in evidence[group]:
                parts.append(f"<figure class='evidence'><img alt='{html.escape(caption)}' src='data:image/png;base64,{png}'>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
