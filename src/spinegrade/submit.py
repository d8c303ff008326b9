"""The submission: test studies predicted by every fold model of every blended backbone, each group
mixed with its weights from ``oof/blend.json``, checked, written with a manifest of what made it."""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

from spinegrade.blend import blend_info, load_blends
from spinegrade.files import write_text_atomic
from spinegrade.layout import RunLayout
from spinegrade.logs import get_logger
from spinegrade.predict import predict_split

log = get_logger(__name__)


def submit(data_dir: str | Path, output_dir: str | Path, description: str = "blend", device: str | None = None) -> Path:
    layout = RunLayout(output_dir)
    blends = load_blends(output_dir)
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in description)[:60] or "blend"
    folder = layout.submissions
    path = folder / f"submission-{date.today():%Y%m%d}-{slug}.csv"
    _, submission = predict_split(data_dir, "test", output_dir, blends=blends, out=path, device=device)
    shutil.copyfile(path, folder / "submission.csv")
    info = blend_info(output_dir)
    groups = {}
    for group, blend in blends.items():
        used = [n for n, w in zip(blend.backbones, blend.weights) if w > 0]
        groups[group] = {
            "backbones": used, "weights": dict(zip(blend.backbones, map(float, blend.weights))),
            "mode": blend.mode, "temperature": blend.temperature,
            "folds": {n: [p.name for p in layout.finished_fold_dirs(n, group)] for n in used},
            "oof_loss": {"backbones": info[group]["backbone_oof_loss"],
                         "blend_in_sample": info[group]["blend_oof_loss_in_sample"],
                         "blend_nested": info[group]["blend_oof_loss_nested"]}}
    manifest = {"submission": path.name, "rows": len(submission), "data_dir": str(data_dir), "groups": groups}
    write_text_atomic(path.with_suffix(".json"), json.dumps(manifest, indent=1))
    log.info(f"submission: {path} (and {folder / 'submission.csv'}), manifest {path.with_suffix('.json')}")
    return path
