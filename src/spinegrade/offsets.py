"""Points placed at learned offsets from the spinal canal, in patient space: the locators of the groups
read beside the canal (``sagittal_foramina`` in ``foramina.py``, ``axial_subarticular`` in
``subarticular.py``).

Each level's spinal canal point, found on the Sagittal T2/STIR by the level localiser, is carried
into patient space (``Slice.pixel_to_patient``). A foramen or a lateral recess lies at an offset
from it: mostly along the patient's x axis (+x is the patient's left), a little forward or back
and up. The offset is learned per condition (so per side) and level from the training folds'
labelled points, in mm: the median over studies of the labelled point minus the labelled canal
point, both in patient space. It is learned fold by fold, so that every training study is located
by offsets that never saw it. Which side a point is on therefore comes from DICOM geometry alone
(ImagePositionPatient, ImageOrientationPatient), never from file order or image halves.

Outputs, under ``OUTPUT/trained_models/localizer/<group>/``: ``offsets.json`` (the offsets of
every fold and of all folds together; written last, it marks the locator finished), and under
``OUTPUT/results/``: ``localizer_<group>_oof.csv`` and ``localizer_<group>_report.json`` (slice
within one of the labelled one, point error in mm per level and side, out of fold).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.constants import GROUPS, REGISTRY, level_title
from spinegrade.data.dicom import DicomReadError, Stack, read_slice
from spinegrade.data.folds import read_folds, write_csv_atomic
from spinegrade.data.index import build_index
from spinegrade.errors import SpinegradeError
from spinegrade.files import write_text_atomic
from spinegrade.layout import RunLayout, remember_folds
from spinegrade.logs import get_logger

log = get_logger(__name__)

ANCHOR_GROUP = "spinal"  # whose located points the offsets start from
MARKER = "offsets.json"


def patient_points(rows: pd.DataFrame) -> pd.DataFrame:
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
        if s is None or not s.has_geometry:  # no patient space to learn an offset in
            continue
        p = s.pixel_to_patient(float(r.x), float(r.y))
        out.append({"study_id": r.study_id, "condition": r.condition, "level": r.level, "px": p[0], "py": p[1], "pz": p[2]})
    return pd.DataFrame(out, columns=["study_id", "condition", "level", "px", "py", "pz"])


def labelled_offsets(data_dir: Path, group: str) -> pd.DataFrame:
    """One row per labelled point of ``group`` whose level also has a labelled canal point: the offset
    from the canal point in patient mm (dx, dy, dz)."""
    table = build_index(data_dir, check_images=False).table
    labelled = table[table["instance_number"].notna() & table["image_path"].notna()]
    canal = patient_points(labelled[labelled["condition"].isin(GROUPS[ANCHOR_GROUP].conditions)])
    points = patient_points(labelled[labelled["condition"].isin(GROUPS[group].conditions)])
    joined = points.merge(canal.drop(columns="condition"), on=["study_id", "level"], suffixes=("", "_canal"))
    return pd.DataFrame({"study_id": joined["study_id"], "condition": joined["condition"], "level": joined["level"],
                         "dx": joined["px"] - joined["px_canal"], "dy": joined["py"] - joined["py_canal"],
                         "dz": joined["pz"] - joined["pz_canal"]})


def _medians(offsets: pd.DataFrame) -> dict[str, dict[str, list[float]]]:
    """condition -> level -> [dx, dy, dz], the median over studies."""
    out: dict[str, dict[str, list[float]]] = {}
    for (condition, level), part in offsets.groupby(["condition", "level"]):
        out.setdefault(condition, {})[level] = [float(part[c].median()) for c in ("dx", "dy", "dz")]
    return out


def train_offsets(data_dir: str | Path, folds_path: str | Path, output_dir: str | Path, group: str) -> dict:
    """Learn the offsets of every fold (from the other folds' studies) and of all folds; write offsets.json."""
    data_dir, layout = Path(data_dir), RunLayout(output_dir)
    remember_folds(layout, Path(folds_path))
    offsets = labelled_offsets(data_dir, group).merge(read_folds(folds_path), on="study_id")
    if offsets.empty:
        raise SpinegradeError(f"{data_dir}: no study has both a labelled {group} point ({GROUPS[group].series}) and "
                              "a labelled spinal canal point (Sagittal T2/STIR) at one level: nothing to learn the "
                              "offsets from")
    info = {"all": _medians(offsets), "per_fold": {}, "studies": int(offsets["study_id"].nunique())}
    for fold in sorted(offsets["fold"].unique()):
        info["per_fold"][str(int(fold))] = _medians(offsets[offsets["fold"] != fold])
    for condition, per_level in info["all"].items():
        log.info(f"{group} offsets, {REGISTRY[condition].side}: " + ", ".join(
            f"{level_title(lv)} x {v[0]:+.1f} y {v[1]:+.1f} z {v[2]:+.1f} mm" for lv, v in per_level.items()))
    folder = layout.localizer_dir(group, existing=False)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / MARKER, json.dumps(info, indent=1))
    return info


@dataclass
class PointOffsets:
    """The learned offsets (all folds, or one fold's for out-of-fold use)."""

    offsets: dict[str, dict[str, list[float]]]  # condition -> level -> [dx, dy, dz] mm

    @classmethod
    def load(cls, root: str | Path, folds: list[int] | None = None) -> PointOffsets:
        path = Path(root) / MARKER
        if not path.is_file():
            raise SpinegradeError(f"{path}: no trained offsets locator (run `spinegrade train-localizer`)")
        info = json.loads(path.read_text())
        if folds is not None and len(folds) == 1 and str(folds[0]) in info["per_fold"]:
            return cls(info["per_fold"][str(folds[0])])
        return cls(info["all"])

    def target(self, condition: str, level: str, canal: np.ndarray) -> np.ndarray | None:
        v = self.offsets.get(condition, {}).get(level)
        return None if v is None else np.asarray(canal, dtype=float) + np.asarray(v)


def find_instance(stacks: list[Stack], instance: int) -> tuple[int, int] | None:
    """(which stack, index in it) of the slice with that instance number in a series' stacks."""
    for j, stack in enumerate(stacks):
        k = stack.index_of_instance(instance)
        if k is not None:
            return j, k
    return None


def write_offset_report(located: pd.DataFrame, stacks: dict[tuple[int, str], list[Stack]], data_dir: Path,
                        output_dir: Path, group: str) -> dict:
    """Out-of-fold located points of ``group`` against the labelled ones: how often the slice is
    within one of the labelled slice (a point placed on another stack or series than the labelled
    one, or not placed at all, is not), and the point error in mm in patient space (so a wrong
    slice counts), per level and side. ``stacks``: (study, series) -> that series' stacks."""
    table = build_index(data_dir, check_images=False).table
    labelled = table[table["condition"].isin(GROUPS[group].conditions) & table["instance_number"].notna()]
    by_key: dict[tuple, list] = {}
    for h in located.itertuples():
        by_key.setdefault((h.study_id, h.condition, h.level), []).append(h)
    rows = []
    for r in labelled.itertuples():
        series = str(Path(r.image_path).parent)
        truth_at = find_instance(stacks.get((r.study_id, series), []), int(r.instance_number))
        if truth_at is None:
            continue  # the labelled slice is not readable: the data report names it
        truth_stack = stacks[(r.study_id, series)][truth_at[0]]
        truth = truth_stack.slices[truth_at[1]].pixel_to_patient(float(r.x), float(r.y))
        hits = by_key.get((r.study_id, r.condition, r.level), [])
        hit = next((h for h in hits if h.series == series), hits[0] if hits else None)
        row = {"study_id": r.study_id, "condition": r.condition, "level": r.level, "series": series,
               "instance_labelled": int(r.instance_number), "x_label": r.x, "y_label": r.y, "located": hit is not None,
               "series_found": None, "instance_found": None, "x": np.nan, "y": np.nan, "slice_offset": np.nan,
               "error_mm": np.nan}
        if hit is not None:
            found_at = find_instance(stacks.get((r.study_id, hit.series), []), int(hit.instance_number))
            if found_at is not None:
                found_slice = stacks[(r.study_id, hit.series)][found_at[0]].slices[found_at[1]]
                same_stack = hit.series == series and found_at[0] == truth_at[0]
                row.update(series_found=hit.series, instance_found=int(hit.instance_number), x=hit.x, y=hit.y,
                           slice_offset=found_at[1] - truth_at[1] if same_stack else np.nan,
                           error_mm=float(np.linalg.norm(found_slice.pixel_to_patient(hit.x, hit.y) - truth)))
        rows.append(row)
    frame = pd.DataFrame(rows)
    results = RunLayout(output_dir).results
    results.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(frame, results / f"localizer_{group}_oof.csv")
    report = {"points": len(frame)}
    if not frame.empty:
        report.update(_summary(frame))
        report["per_level_side"] = {f"{REGISTRY[condition].side} {level}": _summary(part)
                                    for (condition, level), part in frame.groupby(["condition", "level"])}
        log.info(f"{group} locator out of fold over {len(frame)} labelled points: located {report['located']:.1%}; "
                 f"slice within one of the labelled {report['slice_within_one']:.1%} (exact {report['slice_exact']:.1%}); "
                 f"point error median {report['median_mm']:.2f} mm, 90th percentile {report['p90_mm']:.2f} mm")
    write_text_atomic(results / f"localizer_{group}_report.json", json.dumps(report, indent=1))
    return report


def _summary(frame: pd.DataFrame) -> dict:
    """Shares over every labelled point (an unlocated one counts as missed); errors over located ones."""
    offset = frame["slice_offset"]
    return {"points": len(frame), "located": float(frame["located"].mean()),
            "slice_within_one": float((offset.abs() <= 1).mean()), "slice_exact": float((offset == 0).mean()),
            "median_mm": float(frame["error_mm"].median()), "p90_mm": float(frame["error_mm"].quantile(0.9))}
