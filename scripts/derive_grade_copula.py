"""Derive the synthetic generator's joint grade model from the real train.csv: derived figures only.

Writes ``src/spinegrade/data/grade_copula.json`` (the copula's 25 x 25 latent correlation, which the
generator draws from) and adds the real pairwise Spearman correlations of the 25 targets to
``tests/data/real_label_geometry.json`` (what the tests hold the generator to). No label of any study is
kept. Run again only when the real labels or ``grade_model.GRADE_PRIORS`` change (a few minutes).

    python scripts/derive_grade_copula.py [--real ../shared/data/rsna-2024-metadata]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.data.grade_model import COPULA_FILE, TARGETS, fitted_copula, grade_spearman, label_spearman

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "data" / "rsna-2024-metadata")
    args = parser.parse_args()
    train = pd.read_csv(args.real / "train.csv")
    real = grade_spearman(train)
    latent = fitted_copula(real)
    gap = np.abs(label_spearman(latent, seed=7) - real)[np.triu_indices(len(TARGETS), 1)]
    print(f"{len(train)} studies; the labels' Spearman against the real (20,000 simulated studies): "
          f"median gap {np.median(gap):.3f}, largest {np.nanmax(gap):.3f}")
    COPULA_FILE.write_text(json.dumps({
        "source": f"train.csv of the real RSNA 2024 training set ({len(train)} studies): derived figures only, "
                  "by scripts/derive_grade_copula.py",
        "targets": list(TARGETS),
        "latent_correlation": np.round(latent, 4).tolist(),
    }, indent=1) + "\n")
    geometry_file = ROOT / "tests" / "data" / "real_label_geometry.json"
    geometry = json.loads(geometry_file.read_text())
    geometry["grade_spearman"] = {"targets": list(TARGETS), "studies": len(train),
                                  "spearman": np.round(real, 3).tolist()}
    geometry_file.write_text(json.dumps(geometry, indent=1) + "\n")
    print(f"wrote {COPULA_FILE.relative_to(ROOT)} and the real Spearman matrix to {geometry_file.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
