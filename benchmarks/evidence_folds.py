"""Evidence maps from fewer folds: how far they move from all folds' maps, and what they save.

For each study folder of a split, grades it as `spinegrade predict STUDY_DIR` does (the fold models
and their crops kept), then makes each group's Grad-CAM maps from all the heaviest backbone's folds and
from its first 1 and 2 folds, and compares each map with the all-folds one: mean absolute difference
(maps run 0 to 1), correlation, and how far the peak moved (pixels of the crop). Times are summed over
the studies; the ratio is the one to quote. The last line is JSON. Defaults point at `make demo`'s outputs.

    python benchmarks/evidence_folds.py [--data-dir D] [--output-dir OUT] [--studies 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import add_run_arguments, logged_lines, report

from spinegrade.blend import blends_for
from spinegrade.evidence import evidence_maps, heaviest_backbone
from spinegrade.findings import located_in, study_targets
from spinegrade.predict import grade_split
from spinegrade.study import scanner_study
from spinegrade.submit import submission_frame, training_priors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, split=True)
    parser.add_argument("--studies", type=int, default=3)
    args = parser.parse_args()
    device, blends = torch.device("cpu"), blends_for(args.output_dir, None)
    rows: dict[str, dict] = {}
    folders = sorted(p for p in (args.data_dir / f"{args.split}_images").iterdir() if p.is_dir())[:args.studies]
    for folder in folders:
        with logged_lines():
            study, _ = scanner_study(folder)
            grades = grade_split([study], args.output_dir, blends, device, keep=True)
        submission = submission_frame([study.study_id], grades.grades, grades.blends, training_priors(None, args.output_dir))
        graded = {(t["condition"], t["level"]): t["grade"] for t in study_targets(study, grades, submission)
                  if t["source"] == "model"}
        for group, located in located_in(grades, study.study_id).items():
            if located is None or group not in grades.blends:
                continue
            name = heaviest_backbone(grades.blends[group])
            models, inputs = grades.models[(group, name)], grades.inputs[(group, name)]

            def maps(k: int) -> tuple[list, float]:
                started = time.perf_counter()
                made = evidence_maps(located, args.output_dir, group, grades.blends[group], graded, device,
                                     models[:k], inputs)
                return made, time.perf_counter() - started

            full, full_seconds = maps(len(models))
            for k in (1, 2):
                part, seconds = maps(k)
                row = rows.setdefault(f"{group}, {k} of {len(models)} folds", {
                    "maps": 0, "all_folds_seconds": 0.0, "seconds": 0.0, "mean_abs_difference": [],
                    "correlation": [], "peak_shift_px": []})
                row["maps"] += len(full)
                row["all_folds_seconds"] += full_seconds
                row["seconds"] += seconds
                for a, b in zip(full, part):
                    row["mean_abs_difference"].append(float(np.abs(a.heat - b.heat).mean()))
                    row["correlation"].append(float(np.corrcoef(a.heat.ravel(), b.heat.ravel())[0, 1]))
                    peaks = [np.unravel_index(m.heat.argmax(), m.heat.shape) for m in (a, b)]
                    row["peak_shift_px"].append(float(np.hypot(*np.subtract(*peaks))))
    summary = {}
    for key, row in rows.items():
        summary[key] = {"maps": row["maps"], "time_ratio": row["seconds"] / row["all_folds_seconds"],
                        "mean_abs_difference": float(np.mean(row["mean_abs_difference"])),
                        "correlation_median": float(np.nanmedian(row["correlation"])),
                        "peak_shift_px_median": float(np.median(row["peak_shift_px"]))}
        print(f"{key}: {row['maps']} maps, time {summary[key]['time_ratio']:.2f}x all folds', mean |difference| "
              f"{summary[key]['mean_abs_difference']:.3f}, correlation (median) {summary[key]['correlation_median']:.3f}, "
              f"peak moved (median) {summary[key]['peak_shift_px_median']:.1f} px")
    report({"benchmark": "evidence_folds", "studies": len(folders), "rows": summary})


if __name__ == "__main__":
    main()
