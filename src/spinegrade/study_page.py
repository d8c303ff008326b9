"""One study straight off a scanner: ``spinegrade predict STUDY_DIR``.

The three series are found among any DICOM files under the folder (any names, any nesting, other
files ignored): by SeriesDescription first, and where a description is missing or unusual, by the
slices' orientation (the normal along the patient's x axis: sagittal; along z: axial) and contrast
(RepetitionTime and EchoTime: T1 is short and short, T2 long; an inversion recovery with a short
inversion time or a long echo is a STIR, one with neither a T1 FLAIR). The
study is then graded exactly as a test split is (``predict.grade_split``), through a one-study
dataset of links in the competition's layout, so it gets what a submission gets: every group, the
tuned blend, the prior where a series is missing.

Written to ``OUT`` (``STUDY_DIR-spinegrade`` by default):

- ``grades.json``: all 25 targets, each with its grade, probabilities, where it comes from (the
  model, or the prior and why), and every point it was read at (series, instance, pixel, patient mm);
  the series found and how; the models used per group.
- ``study.html``, self-contained (images inline): per group, each graded slice with every located
  point marked and labelled with its grade and probability, so a reader checks at a glance that the
  levels and sides are right.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.constants import (
    AXIAL_T2,
    CONDITION_GROUP,
    GROUPS,
    LEVELS,
    PROBABILITY_COLUMNS,
    REGISTRY,
    SAGITTAL_T1,
    SAGITTAL_T2,
    SERIES_DESCRIPTIONS,
    SEVERITIES,
    level_title,
    parse_row_id,
)
from spinegrade.data.dicom import DicomReadError, Slice, list_dicom_files, load_pixels, read_slice
from spinegrade.errors import SpinegradeError
from spinegrade.files import write_text_atomic
from spinegrade.logs import get_logger
from spinegrade.predict import blends_for, grade_split, submission_frame, training_priors

log = get_logger(__name__)

STUDY_ID = 1  # the one-study dataset's id: the study folder may be named anything
# Contrast from timing (ms): T1 has a short repetition and echo time, T2 a long echo or repetition time.
T1_MAX_TR, T1_MAX_TE, T2_MIN_TE, T2_MIN_TR = 1200.0, 40.0, 60.0, 2000.0
STIR_MAX_TI = 300.0  # a short inversion time nulls fat: STIR (a T1 FLAIR inverts at about 800 ms or more)
GRADE_COLOURS = {"Normal/Mild": "#4caf50", "Moderate": "#ff9800", "Severe": "#f44336"}


def kind_from_description(description: str) -> str | None:
    """The competition's series kind a SeriesDescription names, if it names one (whole words: "ax" in
    "max" or "tra" in "contrast" name nothing)."""
    d = description.lower().replace("_", " ")
    if d in (k.lower() for k in SERIES_DESCRIPTIONS):
        return next(k for k in SERIES_DESCRIPTIONS if k.lower() == d)
    words = set(re.findall(r"[a-z0-9]+", d))
    sagittal = bool(words & {"sag", "sagittal"})
    axial = bool(words & {"ax", "axial", "tra", "transverse", "transversal"})
    if sagittal and words & {"t1", "t1w"}:
        return SAGITTAL_T1
    if sagittal and words & {"t2", "t2w", "stir"}:
        return SAGITTAL_T2
    if axial and words & {"t2", "t2w"}:
        return AXIAL_T2
    return None


def kind_from_geometry(s: Slice) -> str | None:
    """The series kind from one slice's orientation and contrast, when the description says nothing
    (nothing without an ImageOrientationPatient)."""
    if not s.has_geometry:
        return None
    axis = int(np.argmax(np.abs(np.cross(s.orientation[:3], s.orientation[3:]))))  # 0: x (sagittal), 2: z (axial)
    tr, te = s.repetition_time, s.echo_time
    if s.inversion_time and (s.inversion_time <= STIR_MAX_TI or (te is not None and te >= T2_MIN_TE)):
        contrast = "T2"  # STIR: read as the T2 series
    elif s.inversion_time:
        contrast = "T1"  # T1 FLAIR
    elif tr is not None and tr <= T1_MAX_TR and (te is None or te <= T1_MAX_TE):
        contrast = "T1"
    elif (te is not None and te >= T2_MIN_TE) or (tr is not None and tr >= T2_MIN_TR):
        contrast = "T2"
    else:
        return None
    if axis == 0:
        return SAGITTAL_T1 if contrast == "T1" else SAGITTAL_T2
    if axis == 2 and contrast == "T2":
        return AXIAL_T2
    return None


@dataclass
class FoundSeries:
    kind: str  # one of SERIES_DESCRIPTIONS
    description: str  # as the files say it
    uid: str
    files: list[Path]
    how: str  # "description" or "orientation and contrast"


def find_series(study_dir: Path) -> tuple[list[FoundSeries], list[str]]:
    """Every series of the three kinds among the DICOM files under ``study_dir``, and what was left
    out (other series, files that are not DICOM)."""
    by_series: dict[str, list[Path]] = {}
    first: dict[str, Slice] = {}
    skipped = 0
    for path in list_dicom_files(study_dir):
        try:
            header = read_slice(path, with_pixels=False)
        except DicomReadError:
            skipped += 1  # not DICOM, or broken: the other files may still make the series
            continue
        key = header.series_uid or header.series_description or "(no series id)"
        by_series.setdefault(key, []).append(path)
        first.setdefault(key, header)
    found, notes = [], []
    for key, files in by_series.items():
        s = first[key]
        kind, how = kind_from_description(s.series_description), "description"
        if kind is None:
            kind, how = kind_from_geometry(s), "orientation and contrast"
        if kind is None:
            notes.append(f"series {s.series_description or key!r} ({len(files)} files): not one of the three kinds")
            continue
        found.append(FoundSeries(kind, s.series_description, s.series_uid, sorted(files), how))
    if skipped:
        notes.append(f"{skipped} files are not readable DICOM and were skipped")
    if not found:
        raise SpinegradeError(f"{study_dir}: no Sagittal T1, Sagittal T2/STIR or Axial T2 series among "
                              f"{sum(map(len, by_series.values()))} DICOM files")
    # the Sagittal T2/STIR the level localiser reads: the largest one, first
    found.sort(key=lambda f: (SERIES_DESCRIPTIONS.index(f.kind), -(len(f.files) if f.kind == SAGITTAL_T2 else 0)))
    return found, notes


def _one_study_dataset(root: Path, series: list[FoundSeries]) -> dict[str, FoundSeries]:
    """A test split of one study in the competition's layout, made of links to the files; returns
    series folder -> the series it holds. One Sagittal T2/STIR is kept (the localiser reads one)."""
    rows, folders = [], {}
    sagittal_t2 = [f for f in series if f.kind == SAGITTAL_T2][:1]  # find_series lists the largest first
    for number, f in enumerate([f for f in series if f.kind != SAGITTAL_T2] + sagittal_t2, start=1):
        folder = root / "test_images" / str(STUDY_ID) / str(number)
        folder.mkdir(parents=True)
        for k, path in enumerate(f.files):
            (folder / f"{k}.dcm").symlink_to(path.resolve())
        rows.append({"study_id": STUDY_ID, "series_id": number, "series_description": f.kind})
        folders[str(folder)] = f
    pd.DataFrame(rows).to_csv(root / "test_series_descriptions.csv", index=False)
    return folders


def predict_study(study_dir: str | Path, output_dir: str | Path, backbones: list[str] | None = None,
                  out_dir: str | Path | None = None, device: str | None = None) -> dict:
    """Grade all 25 targets of one study folder; write ``grades.json`` and ``study.html``."""
    from spinegrade.train import select_device

    study_dir, output_dir = Path(study_dir).resolve(), Path(output_dir)
    if not study_dir.is_dir():
        raise SpinegradeError(f"{study_dir}: not a folder")
    out_dir = Path(out_dir) if out_dir else study_dir.parent / f"{study_dir.name}-spinegrade"
    series, notes = find_series(study_dir)
    for f in series:
        log.info(f"{f.kind}: series {f.description!r} ({len(f.files)} files), found by {f.how}")
    extra = [f for f in series if f.kind == SAGITTAL_T2][1:]
    if extra:
        notes.append(f"{len(extra)} more Sagittal T2/STIR series not read (the level localiser reads the largest)")
    for note in notes:
        log.info(note)
    blends = blends_for(output_dir, backbones)
    with tempfile.TemporaryDirectory(prefix="spinegrade-study-") as tmp:
        try:
            folders = _one_study_dataset(Path(tmp), series)
        except OSError as exc:
            raise SpinegradeError(f"{tmp}: cannot link the study's files there ({exc})") from None
        grades = grade_split(Path(tmp), "test", output_dir, blends, select_device(device))
        submission = submission_frame([STUDY_ID], grades.graded, grades.blends, training_priors(None, output_dir))
        result = _result(study_dir, series, notes, grades, submission, folders)
        pages = _slice_figures(grades, result, folders)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "grades.json", json.dumps(result, indent=1))
        write_text_atomic(out_dir / "study.html", _html(result, pages))
    except OSError as exc:
        raise SpinegradeError(f"{out_dir}: cannot write the results there ({exc}); choose another with --out") from None
    for t in result["targets"]:
        log.info(f"{t['condition']:34s} {t['level']}: {t['grade']:12s} "
                 + "  ".join(f"{c} {t['probabilities'][c]:.2f}" for c in PROBABILITY_COLUMNS) + f"  ({t['source']})")
    log.info(f"written: {out_dir / 'grades.json'}, {out_dir / 'study.html'}")
    return result


def _result(study_dir: Path, series: list[FoundSeries], notes: list[str], grades, submission: pd.DataFrame,
            folders: dict[str, FoundSeries]) -> dict:
    located = {group: next((st for st in studies if st.study_id == STUDY_ID), None)
               for group, studies in grades.located.items()}
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
                f = folders[h.series]
                points.append({"series": f.description, "series_uid": f.uid, "series_kind": f.kind,
                               "instance": int(h.instance_number), "x": float(h.x), "y": float(h.y),
                               "patient_mm": [round(float(v), 2) for v in s.pixel_to_patient(h.x, h.y)]})
        graded = any(condition in by_study.get(STUDY_ID, {}) and np.isfinite(by_study[STUDY_ID][condition][LEVELS.index(level)]).all()
                     for by_study in grades.graded.get(group, {}).values())
        if graded:
            source = "model"
        elif group not in grades.graded:
            source = "prior: no model grades this group"
        elif st is not None and st.problem:
            source = f"prior: {st.problem}"
        else:
            source = f"prior: no {GROUPS[group].series} slice reaches this level"
        targets.append({"row_id": r.row_id, "condition": condition, "group": group, "side": REGISTRY[condition].side,
                        "level": level_title(level), "grade": SEVERITIES[int(probs.argmax())],
                        "probabilities": dict(zip(PROBABILITY_COLUMNS, map(float, probs))), "source": source,
                        "points": points})
    models = {group: {"backbones": dict(zip(b.backbones, map(float, b.weights))), "mode": b.mode,
                      "locator": GROUPS[group].locator} for group, b in grades.blends.items()}
    return {"study_dir": str(study_dir),
            "series": [{"kind": f.kind, "description": f.description, "uid": f.uid, "files": len(f.files), "found_by": f.how}
                       for f in series],
            "notes": notes, "models": models, "targets": targets}


def _slice_figures(grades, result: dict, folders: dict[str, FoundSeries]) -> dict[str, list[tuple[str, str]]]:
    """group -> [(caption, PNG as base64)]: each slice a group was read on, its points marked."""
    by_target = {(t["condition"], t["level"]): t for t in result["targets"]}
    out: dict[str, list[tuple[str, str]]] = {}
    for group, studies in grades.located.items():
        st = next((s for s in studies if s.study_id == STUDY_ID), None)
        if st is None or st.locations is None:
            continue
        for (series, instance), rows in st.locations.groupby(["series", "instance_number"], sort=False):
            s = st.slice_of(rows.iloc[0])
            marks = []
            for h in rows.itertuples():
                t = by_target[(h.condition, level_title(h.level))]
                side = {"left": "L ", "right": "R "}.get(REGISTRY[h.condition].side or "", "")
                marks.append((h.x, h.y, f"{side}{t['level']} {t['grade']} {max(t['probabilities'].values()):.2f}",
                              GRADE_COLOURS[t["grade"]]))
            f = folders[series]
            number = list(folders.values()).index(f) + 1  # several series may share a description
            caption = f"{f.description or f.kind} (series {number} of {len(folders)}), instance {int(instance)}"
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
        parts.append(f"<h2>{group} ({html.escape(spec.series)})</h2><p>models: {html.escape(used)}</p>")
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
