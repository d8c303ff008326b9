"""Storage invariance: the same test studies stored as other scanners might, graded again.

Rewrites every test-split DICOM file of DATA (`spinegrade.data.restore`) in several ways that keep
the anatomy where it is in patient space: another aspect ratio, non-square pixels, MONOCHROME1 with
signed rescaled values, 8 bits, and every slice turned 90 degrees in plane, transposed or
mirrored (ImageOrientationPatient following). Each variant is predicted with OUTPUT's models (the blend when
there is one) and compared with the files as stored: how far the locator's points moved (mm, in
patient space; median and 90th percentile), the largest change in any probability, and the spinal
score when the answers are known (a synthetic set's `<data>-answers/test.csv`). Figures describe
these models on this data; the last line is JSON. Defaults point at `make demo`'s outputs.

    python benchmarks/storage_invariance.py [--data-dir D] [--output-dir OUT] [--answers A/test.csv]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from common import add_run_arguments, report
from spinegrade.blend import load_blends
from spinegrade.constants import PROBABILITY_COLUMNS
from spinegrade.data.dicom import main_stack, read_series
from spinegrade.data.restore import Storage, restore_split
from spinegrade.layout import RunLayout
from spinegrade.slice_locator import SliceLocator
from spinegrade.submit import predict_split, score_submission

VARIANTS = {
    "4:3, centred": Storage(pad_columns=(1 / 6, 1 / 6)),
    "4:3, off-centre": Storage(pad_columns=(0.0, 1 / 3)),
    "pixels 1.33x taller": Storage(row_scale=0.75),
    "MONOCHROME1, signed, rescaled": Storage(monochrome1=True, rescale=(0.5, 1024.0)),
    "8 bits": Storage(bits=8),
    "turned 90 degrees": Storage(in_plane="turned"),
    "transposed": Storage(in_plane="transposed"),
    "mirrored": Storage(in_plane="mirrored"),
}


def located_points(data_dir: Path, slice_locator: SliceLocator) -> dict[int, np.ndarray]:
    """(5, 3) patient-space points per test study, from its Sagittal T2/STIR series."""
    series = pd.read_csv(data_dir / "test_series_descriptions.csv")
    series = series[series["series_description"] == "Sagittal T2/STIR"]
    out = {}
    for row in series.itertuples():
        stack = main_stack(read_series(data_dir / "test_images" / str(row.study_id) / str(row.series_id),
                                       with_pixels=False))
        if stack is None:
            continue
        found = slice_locator.locate(stack)
        out[row.study_id] = np.stack([stack.slices[k].pixel_to_patient(x, y)
                                      for k, (x, y) in zip(found.slice_index, found.points)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--answers", type=Path, default=None, help="test labels (default: <data>-answers/test.csv if present)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    answers = args.answers or args.data_dir.with_name(args.data_dir.name + "-answers") / "test.csv"
    layout = RunLayout(args.output_dir)
    blends = load_blends(args.output_dir) if layout.blend_json.is_file() else None
    backbones = None if blends else layout.backbones()
    slice_locator = SliceLocator(layout.locator_dir("spinal"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def run(name: str, data: Path) -> dict:
            _, submission = predict_split(data, "test", args.output_dir, backbones, blends=blends, out=tmp / f"{name}.csv",
                                          predictions_dir=tmp / name)
            scores = score_submission(submission, answers) if answers.is_file() else {}
            return {"submission": submission.set_index("row_id")[list(PROBABILITY_COLUMNS)],
                    "points": located_points(data, slice_locator), "spinal": scores.get("spinal")}

        base = run("as-stored", args.data_dir)
        rows.append({"variant": "as stored", "studies": len(base["points"]), "shift_median_mm": 0.0,
                     "shift_p90_mm": 0.0, "max_probability_change": 0.0, "spinal": base["spinal"]})
        for k, name in enumerate(args.variants):
            data = restore_split(args.data_dir, tmp / f"variant{k}", VARIANTS[name])
            got = run(f"variant{k}", data)
            shifts = np.concatenate([np.linalg.norm(got["points"][s] - p, axis=1) for s, p in base["points"].items()
                                     if s in got["points"]])
            change = (got["submission"].loc[base["submission"].index] - base["submission"]).abs().to_numpy().max()
            rows.append({"variant": name, "studies": len(got["points"]), "shift_median_mm": float(np.median(shifts)),
                         "shift_p90_mm": float(np.percentile(shifts, 90)), "max_probability_change": float(change),
                         "spinal": got["spinal"]})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    models = {group: blend.backbones for group, blend in blends.items()} if blends else backbones
    report({"benchmark": "storage_invariance", "models": models, "rows": rows})


if __name__ == "__main__":
    main()
