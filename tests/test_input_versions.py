"""A trained model knows what it was fed: the images the graders and the locators read are hashed on a
fixed set of files, and a change to them without a version bump fails here. A bump trains every old
model again (`make train`) and makes prediction refuse the old ones (tests/test_layout.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from dicom_factory import write_mr

from spinegrade.constants import GROUPS
from spinegrade.data.dicom import read_series
from spinegrade.data.preprocess import (
    LOCATOR_INPUT_VERSION,
    PREPROCESS_VERSION,
    PreprocessSettings,
    centre_view,
    prepare_stack,
)
from spinegrade.slice_locator import locator_inputs

RECORDED = Path(__file__).parent / "data" / "input_hashes.json"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# an axial block stored turned 90 degrees and tilted, with one slice of another size: the awkward cases
TURNED_AXIAL = (0.0, 0.9961947, -0.0871557, -1.0, 0.0, 0.0)


def _stacks(root: Path) -> dict[str, object]:
    """A sagittal series (7 slices, running right to left) and a turned axial block (5 slices), their
    pixels a fixed pattern: a smooth field, a bright disc and seeded noise, all in 12 bits."""
    rng = np.random.default_rng(7)
    rows, cols = np.mgrid[0:96, 0:80]
    stacks = {}
    for name, orientation, count, step, description in (
            ("sagittal", (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), 7, (-3.5, 0.0, 0.0), "Sagittal T2/STIR"),
            ("axial", TURNED_AXIAL, 5, (0.0, 0.0, -4.0), "Axial T2")):
        for k in range(count):
            field = 800 + 400 * np.sin(rows / 9.0 + k) * np.cos(cols / 13.0)
            disc = 1500 * (np.hypot(rows - 50 - k, cols - 38) < 12)
            pixels = np.clip(field + disc + rng.normal(0, 60, rows.shape), 0, 4095).astype(np.uint16)
            write_mr(root / name / f"{k + 1}.dcm", pixels, instance=k + 1, orientation=orientation,
                     position=tuple(np.array([10.0, -40.0, 30.0]) + k * np.array(step)), spacing=(0.7, 0.75),
                     description=description)
        stacks[name] = read_series(root / name, with_pixels=False)[0]
    return stacks


def _hash(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def test_model_inputs_change_only_with_a_version_bump(tmp_path):
    stacks = _stacks(tmp_path)
    graders = []
    for group, spec in GROUPS.items():
        stack = stacks["axial" if group == "subarticular" else "sagittal"]
        for condition in spec.conditions:
            for mode, size, crop_mm in (("crop", 48, 30.0), ("full", 48, 30.0)):
                settings = PreprocessSettings(group, mode, size, crop_mm, neighbours=2,
                                              turn_by_side=spec.turn_by_side and mode == "crop")
                canvases = prepare_stack(stack, 2, 37.3, 51.6, settings, condition=condition)
                graders.append(centre_view(canvases, size, 5))
    locators = [locator_inputs(stacks[name], [0, 3, len(stacks[name]) - 1], 64, field)[0]
                for name in ("sagittal", "axial") for field in (None, 90.0)]
    found = {"preprocess_version": PREPROCESS_VERSION, "preprocess_sha256": _hash(graders),
             "locator_input_version": LOCATOR_INPUT_VERSION, "locator_input_sha256": _hash(locators)}
    recorded = json.loads(RECORDED.read_text())
    for kind, constant in (("preprocess", "PREPROCESS_VERSION in data/preprocess.py"),
                           ("locator_input", "LOCATOR_INPUT_VERSION in data/preprocess.py")):
        version, digest = f"{kind}_version", f"{kind}_sha256"
        assert found[version] == recorded[version], (
            f"{constant} is {found[version]}, {RECORDED.name} records {recorded[version]}: write "
            f"{{{version!r}: {found[version]}, {digest!r}: {found[digest]!r}}} there")
        assert found[digest] == recorded[digest], (
            f"the {kind.replace('_', ' ')} images changed while {constant} stayed {found[version]}: models trained "
            f"before would read them without a word. Bump it, and record the new hash {found[digest]!r}")
