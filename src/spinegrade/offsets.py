"""Points placed at learned offsets from the spinal canal, in patient space: the locators of the groups
read beside the canal (``sagittal_foramina`` in ``foramina.py``, ``axial_subarticular`` in
``subarticular.py``).

Each level's spinal canal point, found on the Sagittal T2/STIR by the level locator, is carried
into patient space (``Slice.pixel_to_patient``). A foramen or a lateral recess lies at an offset
from it: mostly along the patient's x axis (+x is the patient's left), a little forward or back
and up. The offset is learned per condition (so per side) and level from the training folds'
labelled points, in mm: the median over studies of the labelled point minus the labelled canal
point, both in patient space. It is learned fold by fold, so that every training study is located
by offsets that never saw it. Which side a point is on therefore comes from DICOM geometry alone
(ImagePositionPatient, ImageOrientationPatient), never from file order or image halves.

Outputs, under ``OUTPUT/trained_models/localizer/<group>/``: ``offsets.json`` (the offsets of
every fold and of all folds together; written last, it marks the locator finished). The offsets are
where a locator starts and what it falls back on; the foramina's slice locator (``slice_locator.py``)
reads the image around them. The out-of-fold report is ``locator_report.py``'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.constants import GROUPS, CONDITION_SPECS, level_title
from spinegrade.data.dicom import DicomReadError, Stack, read_slice
from spinegrade.data.folds import read_folds
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
        raise SpinegradeError(f"{data_dir}: no study has both a labelled {group} point ({GROUPS[group].series_kind}) and "
                              "a labelled spinal canal point (Sagittal T2/STIR) at one level: nothing to learn the "
                              "offsets from")
    info = {"all": _medians(offsets), "per_fold": {}, "studies": int(offsets["study_id"].nunique())}
    for fold in sorted(offsets["fold"].unique()):
        info["per_fold"][str(int(fold))] = _medians(offsets[offsets["fold"] != fold])
    for condition, per_level in info["all"].items():
        log.info(f"{group} offsets, {CONDITION_SPECS[condition].side}: " + ", ".join(
            f"{level_title(lv)} x {v[0]:+.1f} y {v[1]:+.1f} z {v[2]:+.1f} mm" for lv, v in per_level.items()))
    folder = layout.locator_dir(group, existing=False)
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


def find_instance(stacks: list[Stack], instance: int, frame: int = 0) -> tuple[int, int] | None:
    """(which stack, index in it) of the slice with that instance number (and frame, in a multi-frame
    file) in a series' stacks."""
    for j, stack in enumerate(stacks):
        k = stack.index_of_instance(instance, frame)
        if k is not None:
            return j, k
    return None
