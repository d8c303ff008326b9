"""The submission: test studies predicted by every fold model of every blended backbone, mixed with
the weights of ``oof/blend.json``, checked, written with a manifest of what made it."""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

from spinegrade.blend import load_blend
from spinegrade.files import write_text_atomic
from spinegrade.predict import predict_split


def submit(data_dir: str | Path, output_dir: str | Path, description: str = "blend", device: str | None = None,
           log=print) -> Path:
    output_dir = Path(output_dir)
    blend = load_blend(output_dir)
    used = [n for n, w in zip(blend.backbones, blend.weights) if w > 0]
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in description)[:60] or "blend"
    folder = output_dir / "submissions"
    path = folder / f"submission-{date.today():%Y%m%d}-{slug}.csv"
    _, submission = predict_split(data_dir, "test", output_dir, blend=blend, out=path, device=device, log=log)
    shutil.copyfile(path, folder / "submission.csv")
    blend_info = json.loads((output_dir / "oof" / "blend.json").read_text())
    folds = {name: sorted(p.parent.name for p in (output_dir / "trained_models" / name).glob("fold*/best.safetensors"))
             for name in used}
    manifest = {"submission": path.name, "rows": len(submission), "data_dir": str(data_dir),
                "backbones": used, "weights": dict(zip(blend.backbones, map(float, blend.weights))),
                "mode": blend.mode, "temperature": blend.temperature, "folds": folds,
                "oof_loss": {"backbones": blend_info["backbone_oof_loss"],
                             "blend_in_sample": blend_info["blend_oof_loss_in_sample"],
                             "blend_nested": blend_info["blend_oof_loss_nested"]}}
    write_text_atomic(path.with_suffix(".json"), json.dumps(manifest, indent=1))
    log(f"submission: {path} (and {folder / 'submission.csv'}), manifest {path.with_suffix('.json')}")
    return path
