"""The foraminal group's locator (``sagittal_foramina`` in ``constants.GROUPS``): where each neural
foramen is on the Sagittal T1 series, per level and side, from DICOM geometry alone.

Each level's spinal canal point, found on the Sagittal T2/STIR by the level localiser, is carried
into patient space (``Slice.pixel_to_patient``). The foramen lies at an offset from it: mostly along
the patient's x axis (+x is the patient's left), a little forward or back and up. The offset is
learned per level and side from the training folds' labelled points, in mm (the median over
studies of labelled foramen minus labelled canal point, both in patient space), fold by fold so
that every training study is located by offsets that never saw it. Each T1 series is then read
along its own normal: the slice nearest the foramen, and the foramen projected onto it. Which side
a slice shows comes from its ImagePositionPatient and ImageOrientationPatient only, so a series
stored left to right or right to left, in any file order, gives the same slices.

Outputs, under ``OUTPUT/trained_models/localizer/foraminal/``: ``offsets.json`` (the offsets of
every fold and of all folds together; written last, it marks the locator finished), and under
``OUTPUT/results/``: ``localizer_foraminal_oof.csv`` and ``localizer_foraminal_report.json``
(slice within one of the labelled one, point error in mm per level and side, out of fold).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.constants import GROUPS, LEVELS, level_title
from spinegrade.data.dicom import DicomReadError, Stack, read_slice
from spinegrade.data.folds import read_folds, write_csv_atomic
from spinegrade.data.index import build_index
from spinegrade.errors import SpinegradeError
from spinegrade.files import write_text_atomic
from spinegrade.layout import RunLayout, remember_folds
from spinegrade.logs import get_logger

log = get_logger(__name__)

GROUP = "foraminal"
ANCHOR_GROUP = "spinal"  # whose located points the offsets start from
MARKER = "offsets.json"
# A foramen farther than this many slice gaps from the nearest slice lies outside the T1 volume.
OUTSIDE_GAPS = 0.75


def _patient_points(rows: pd.DataFrame) -> pd.DataFrame:
    """The labelled points of ``rows`` (index table rows with image_path, x, y) in patient mm; rows
    whose file cannot be read are left out (the data report names them)."""
    out = []
    headers: dict[str, object] = {}
    for r in rows.itertuples():
        path = str(r.image_path)
        if path not in headers:
            try:
                headers[path] = read_slice(path, with_pixels=False)
            except DicomReadError:
                headers[path] = None
        s = headers[path]
        if s is None:
            continue
        p = s.pixel_to_patient(float(r.x), float(r.y))
        out.append({"study_id": r.study_id, "condition": r.condition, "level": r.level, "px": p[0], "py": p[1], "pz": p[2]})
    return pd.DataFrame(out, columns=["study_id", "condition", "level", "px", "py", "pz"])


def labelled_offsets(data_dir: Path) -> pd.DataFrame:
    """One row per labelled foramen whose level also has a labelled canal point: the offset from the
    canal point to the foramen in patient mm (dx, dy, dz)."""
    table = build_index(data_dir, check_images=False).table
    labelled = table[table["instance_number"].notna() & table["image_path"].notna()]
    canal = _patient_points(labelled[labelled["condition"].isin(GROUPS[ANCHOR_GROUP].conditions)])
    foramen = _patient_points(labelled[labelled["condition"].isin(GROUPS[GROUP].conditions)])
    joined = foramen.merge(canal.drop(columns="condition"), on=["study_id", "level"], suffixes=("", "_canal"))
    return pd.DataFrame({"study_id": joined["study_id"], "condition": joined["condition"], "level": joined["level"],
                         "dx": joined["px"] - joined["px_canal"], "dy": joined["py"] - joined["py_canal"],
                         "dz": joined["pz"] - joined["pz_canal"]})


def _medians(offsets: pd.DataFrame) -> dict[str, dict[str, list[float]]]:
    """condition -> level -> [dx, dy, dz], the median over studies."""
    out: dict[str, dict[str, list[float]]] = {}
    for (condition, level), part in offsets.groupby(["condition", "level"]):
        out.setdefault(condition, {})[level] = [float(part[c].median()) for c in ("dx", "dy", "dz")]
    return out


def train_foramen_locator(data_dir: str | Path, folds_path: str | Path, output_dir: str | Path) -> dict:
    """Learn the offsets of every fold (from the other folds' studies) and of all folds; write offsets.json."""
    data_dir, layout = Path(data_dir), RunLayout(output_dir)
    remember_folds(layout, Path(folds_path))
    offsets = labelled_offsets(data_dir).merge(read_folds(folds_path), on="study_id")
    if offsets.empty:
        raise SpinegradeError(f"{data_dir}: no study has both a labelled foramen (Sagittal T1) and a labelled "
                              "spinal canal point (Sagittal T2/STIR) at one level: nothing to learn the offsets from")
    info = {"all": _medians(offsets), "per_fold": {}, "studies": int(offsets["study_id"].nunique())}
    for fold in sorted(offsets["fold"].unique()):
        info["per_fold"][str(int(fold))] = _medians(offsets[offsets["fold"] != fold])
    for condition, per_level in info["all"].items():
        side = condition.split("_")[0]
        log.info(f"foramen offsets, {side}: " + ", ".join(
            f"{level_title(lv)} x {v[0]:+.1f} y {v[1]:+.1f} z {v[2]:+.1f} mm" for lv, v in per_level.items()))
    folder = layout.localizer_dir(GROUP, existing=False)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / MARKER, json.dumps(info, indent=1))
    return info


@dataclass
class ForamenOffsets:
    """The learned offsets (all folds, or one fold's for out-of-fold use)."""

    offsets: dict[str, dict[str, list[float]]]  # condition -> level -> [dx, dy, dz] mm

    @classmethod
    def load(cls, root: str | Path, folds: list[int] | None = None) -> ForamenOffsets:
        path = Path(root) / MARKER
        if not path.is_file():
            raise SpinegradeError(f"{path}: no trained foramen locator (run `spinegrade train-localizer`)")
        info = json.loads(path.read_text())
        if folds is not None and len(folds) == 1 and str(folds[0]) in info["per_fold"]:
            return cls(info["per_fold"][str(folds[0])])
        return cls(info["all"])

    def target(self, condition: str, level: str, canal: np.ndarray) -> np.ndarray | None:
        v = self.offsets.get(condition, {}).get(level)
        return None if v is None else np.asarray(canal, dtype=float) + np.asarray(v)


def nearest_slice(stack: Stack, point: np.ndarray) -> tuple[int, float, float] | None:
    """(index in the stack, x, y in its pixels) of the slice nearest ``point`` (patient mm), projected
    onto it; None when the point lies outside the stack's volume or its image."""
    projected = [s.patient_to_pixel(point) for s in stack.slices]
    distances = np.array([abs(d) for _, _, d in projected])
    k = int(distances.argmin())
    positions = np.array([s.distance for s in stack.slices])
    gap = float(np.median(np.diff(positions))) if len(stack) > 1 else float(stack.slices[0].thickness or 1.0)
    if distances[k] > OUTSIDE_GAPS * abs(gap) + 1e-6:
        return None
    x, y, _ = projected[k]
    rows, cols = stack.slices[k].shape
    if not (-0.5 <= x <= cols - 0.5 and -0.5 <= y <= rows - 0.5):
        return None
    return k, float(x), float(y)


def locate_foramina(study_id: int, canal: dict[str, np.ndarray], stacks: dict[str, Stack],
                    offsets: ForamenOffsets) -> tuple[list[list], list[str]]:
    """Rows of the locations table for every (side, level, T1 series) whose foramen lies in that
    series' volume, and a note per (side, level) that no series reaches. ``canal``: level ->
    patient point of its spinal canal."""
    rows, outside = [], []
    for condition in GROUPS[GROUP].conditions:
        for level in LEVELS:
            point = offsets.target(condition, level, canal[level]) if level in canal else None
            found = False
            for series, stack in stacks.items():
                hit = nearest_slice(stack, point) if point is not None else None
                if hit is None:
                    continue
                k, x, y = hit
                rows.append([study_id, condition, level, series, stack.slices[k].instance_number, x, y, "localised"])
                found = True
            if not found:
                outside.append(f"{condition.split('_')[0]} {level_title(level)}")
    return rows, outside


def write_foramen_report(located: pd.DataFrame, stacks: dict[tuple[int, str], Stack], data_dir: Path,
                         output_dir: Path) -> dict:
    """Out-of-fold located foramina against the labelled ones: how often the slice is within one of
    the labelled slice, and the point error in mm (in patient space, so a wrong slice counts),
    per level and side. ``stacks``: (study, series) -> the stack the rows index."""
    table = build_index(data_dir, check_images=False).table
    labelled = table[table["condition"].isin(GROUPS[GROUP].conditions) & table["instance_number"].notna()]
    by_key = {(h.study_id, h.condition, h.level, h.series): h for h in located.itertuples()}
    rows = []
    for r in labelled.itertuples():
        series = str(Path(r.image_path).parent)
        h = by_key.get((r.study_id, r.condition, r.level, series))
        stack = stacks.get((r.study_id, series))
        if h is None or stack is None:
            continue
        k_found, k_label = stack.index_of_instance(int(h.instance_number)), stack.index_of_instance(int(r.instance_number))
        if k_found is None or k_label is None:
            continue
        found = stack.slices[k_found].pixel_to_patient(h.x, h.y)
        truth = stack.slices[k_label].pixel_to_patient(float(r.x), float(r.y))
        rows.append({"study_id": r.study_id, "condition": r.condition, "level": r.level, "series": series,
                     "instance_found": int(h.instance_number), "instance_labelled": int(r.instance_number),
                     "x": h.x, "y": h.y, "x_label": r.x, "y_label": r.y, "slice_offset": k_found - k_label,
                     "error_mm": float(np.linalg.norm(found - truth))})
    frame = pd.DataFrame(rows)
    results = RunLayout(output_dir).results
    results.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(frame, results / f"localizer_{GROUP}_oof.csv")
    if frame.empty:
        report = {"points": 0}
    else:
        report = {"points": len(frame), "slice_within_one": float((frame["slice_offset"].abs() <= 1).mean()),
                  "slice_exact": float((frame["slice_offset"] == 0).mean()),
                  "all": {"median_mm": float(frame["error_mm"].median()),
                          "p90_mm": float(frame["error_mm"].quantile(0.9))}, "per_level_side": {}}
        for (condition, level), part in frame.groupby(["condition", "level"]):
            report["per_level_side"][f"{condition.split('_')[0]} {level}"] = {
                "points": len(part), "slice_within_one": float((part["slice_offset"].abs() <= 1).mean()),
                "median_mm": float(part["error_mm"].median()), "p90_mm": float(part["error_mm"].quantile(0.9))}
        log.info(f"foramen locator out of fold over {len(frame)} labelled foramina: slice within one of the labelled "
                 f"{report['slice_within_one']:.1%} (exact {report['slice_exact']:.1%}); point error median "
                 f"{report['all']['median_mm']:.2f} mm, 90th percentile {report['all']['p90_mm']:.2f} mm")
    write_text_atomic(results / f"localizer_{GROUP}_report.json", json.dumps(report, indent=1))
    return report
