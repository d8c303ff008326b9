"""How a generated set's labelled points spread over slices, beside the real data's.

The figures of ``spinegrade.data.label_geometry`` (the canal on several sagittal instances across the
levels, the foramina's spread, the left-right foramen gap, the recesses on different axial instances
and series) for a synthetic set made without images (``synthetic.label_records``: seconds) and for the
real ``train_label_coordinates.csv`` when at hand (``--real``, default ``../shared/...``), else the
derived figures committed with the tests. The last line is JSON.

    python benchmarks/label_geometry.py [--studies 300] [--seed 1] [--straight] [--real DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import report
from spinegrade.data.label_geometry import dataset_label_geometry, label_geometry
from spinegrade.data.synthetic import SynthSettings, coordinate_frames, label_records

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--straight", action="store_true", help="the straight twin: no offset, lean, curve or rotation")
    parser.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "data" / "rsna-2024-metadata")
    args = parser.parse_args()
    records = label_records(SynthSettings(studies=args.studies, test_studies=0, seed=args.seed, straight=args.straight))
    generated = label_geometry(coordinate_frames(records)[0])
    if (args.real / "train_label_coordinates.csv").is_file():
        real, source = dataset_label_geometry(args.real), f"{args.real.name}/train_label_coordinates.csv"
    else:
        committed = json.loads((ROOT / "tests" / "data" / "real_label_geometry.json").read_text())
        real, source = {k: v for k, v in committed.items() if k != "source"}, "tests/data/real_label_geometry.json"
    for key in generated:
        print(f"{key:32s} real {real.get(key)!s:>8}   generated {generated[key]!s:>8}")
    report({"benchmark": "label_geometry", "seed": args.seed, "straight": args.straight, "real_source": source,
            "real": real, "generated": generated})


if __name__ == "__main__":
    main()
