"""Training every group's locator, one call per group, in the registry's order.

What each locator is (``constants.GROUPS[group].locator``):

- ``sagittal_levels`` (spinal): the slice locator of ``localize.py`` on Sagittal T2/STIR, each level
  on its own slice;
- ``sagittal_foramina`` (foraminal): the learned offsets from the canal (``offsets.py``) as the
  starting window and fallback, and the slice locator of ``localize.py`` on Sagittal T1 deciding
  each foramen's slice and point (``head=False``: the offsets alone, for comparison);
- ``axial_subarticular`` (subarticular): the offsets, projected on every axial stack, as the starting
  window and fallback, and the slice locator of ``localize.py`` on Axial T2 deciding each recess's
  slice and point (``subarticular.py``; ``head=False``: the offsets alone).

Every locator is trained on a run's folds, read back by prediction from its folder
(``RunLayout.localizer_dir``), and reported out of fold the same way (``predict.report_locator``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from spinegrade.config import LocalizerConfig
from spinegrade.constants import GROUPS
from spinegrade.layout import RunLayout
from spinegrade.localize import MARKER as SLICE_MARKER
from spinegrade.localize import train_localizer
from spinegrade.logs import get_logger
from spinegrade.offsets import train_offsets
from spinegrade.predict import OFFSET_LOCATORS, SLICE_HEADS, report_locator

log = get_logger(__name__)


def train_locator(group: str, config: LocalizerConfig, data_dir: str | Path, folds_path: str | Path,
                  output_dir: str | Path, device: str | None = None, resume: bool = False, force: bool = False,
                  head: bool = True) -> dict | None:
    """Train ``group``'s locator on every fold and write its out-of-fold report (returned). A group
    whose locator starts from the spinal canal points needs the spinal locator trained first.
    ``head``: train the slice locator of a group placed from the canal (else its offsets alone, and an
    earlier head is removed)."""
    locator = GROUPS[group].locator
    if locator is None:
        log.warning(f"{group}: no locator to train yet; its rows are the training prior at prediction")
        return None
    root = RunLayout(output_dir).localizer_dir(group, existing=False)
    choice = None
    if locator in OFFSET_LOCATORS:
        train_offsets(data_dir, folds_path, output_dir, group)
    if locator in SLICE_HEADS and (head or locator not in OFFSET_LOCATORS):
        choice = train_localizer(config, data_dir, folds_path, output_dir, device=device, resume=resume, force=force,
                                 group=group)
    elif locator in SLICE_HEADS:  # the offsets alone: an earlier head must not be read back
        (root / SLICE_MARKER).unlink(missing_ok=True)
        for fold in root.glob("fold*"):
            shutil.rmtree(fold)
    return report_locator(output_dir, data_dir, group, folds_path, device=device, choice=choice)
