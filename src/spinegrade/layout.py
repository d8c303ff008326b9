"""Where a run keeps what it makes: the one object every stage asks for its paths.

    OUTPUT/
      folds.csv                               the folds the run's models were trained on (a copy)
      spinegrade.log                          every command's log lines, appended
      trained_models/<name>/<group>/fold<k>/  one fold of one backbone on one condition group
      trained_models/localizer/<group>/       the group's locator, fold by fold
      trained_models/priors.csv               the class prior of every target (for kernels)
      oof/<name>/<group>/fold<k>.csv          out-of-fold predictions (the blend's: oof/blend/<group>/)
      oof/blend.json                          blend weights per group
      oof/localised/<group>/<name>.csv        out-of-fold predictions at the locators' points
      results/  plots/  report.html           evaluation
      submissions/  predictions/  kernels/    prediction and the Kaggle kernel
      predictions/<split>_sr/<study_id>.dcm   a split's structured reports (predict --sr)
      cache/                                  decoded images, keyed by preprocessing

Runs written before condition groups existed kept one group, spinal canal stenosis, one level up
(``trained_models/<name>/fold<k>/``, ``oof/<name>/fold<k>.csv``, ``trained_models/localizer/fold<k>/``);
the lookups here fall back on those folders for the spinal group, so such runs still predict,
evaluate and build kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from spinegrade.constants import GROUPS
from spinegrade.data.folds import read_folds, write_csv_atomic
from spinegrade.errors import SpinegradeError

LEGACY_GROUP = "spinal"  # what a run from before condition groups holds
LOCALIZER_NAME = "localizer"
BLEND_NAME = "blend"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path = "."):
        object.__setattr__(self, "root", Path(root))

    # --- top-level folders and files -----------------------------------------------------------
    @property
    def trained_models(self) -> Path:
        return self.root / "trained_models"

    @property
    def oof(self) -> Path:
        return self.root / "oof"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def submissions(self) -> Path:
        return self.root / "submissions"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    def structured_reports(self, split: str) -> Path:
        """Where ``predict --split SPLIT --sr`` writes one DICOM Structured Report per study."""
        return self.predictions / f"{split}_sr"

    @property
    def kernels(self) -> Path:
        return self.root / "kernels"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def folds(self) -> Path:
        return self.root / "folds.csv"

    @property
    def log_file(self) -> Path:
        return self.root / "spinegrade.log"

    @property
    def priors(self) -> Path:
        return self.trained_models / "priors.csv"

    @property
    def blend_json(self) -> Path:
        return self.oof / "blend.json"

    # --- per backbone and group ----------------------------------------------------------------
    def model_dir(self, name: str, group: str, existing: bool = True) -> Path:
        """``trained_models/<name>/<group>/``; with ``existing`` (reading), a pre-group run's
        ``trained_models/<name>/`` for the spinal group when that is what is there. Training always
        writes the new place."""
        new = self.trained_models / name / group
        if (existing and group == LEGACY_GROUP and not new.is_dir()
                and any((self.trained_models / name).glob("fold*/model.json"))):
            return self.trained_models / name
        return new

    def fold_dir(self, name: str, group: str, fold: int, existing: bool = True) -> Path:
        return self.model_dir(name, group, existing) / f"fold{fold}"

    def finished_fold_dirs(self, name: str, group: str) -> list[Path]:
        """Folds with a done.json (one still training, or killed, has none), in fold order (fold2 before fold10)."""
        folders = [p.parent for p in self.model_dir(name, group).glob("fold*/done.json")]
        return sorted(folders, key=lambda f: (int(f.name[4:]) if f.name[4:].isdigit() else 1 << 30, f.name))

    def oof_dir(self, name: str, group: str, existing: bool = True) -> Path:
        new = self.oof / name / group
        if existing and group == LEGACY_GROUP and not new.is_dir() and any((self.oof / name).glob("fold*.csv")):
            return self.oof / name
        return new

    def oof_file(self, name: str, group: str, fold: int, existing: bool = True) -> Path:
        return self.oof_dir(name, group, existing) / f"fold{fold}.csv"

    def located_oof_file(self, name: str, group: str) -> Path:
        return self.oof / "localised" / group / f"{name}.csv"

    def locator_dir(self, group: str, existing: bool = True) -> Path:
        """``trained_models/localizer/<group>/``, or a pre-group run's ``trained_models/localizer/`` (spinal)."""
        new = self.trained_models / LOCALIZER_NAME / group
        old = self.trained_models / LOCALIZER_NAME
        if existing and group == LEGACY_GROUP and not new.is_dir() and (old / "slice_choice.json").is_file():
            return old
        return new

    def locator_report(self, group: str) -> Path:
        """The group's locator judged out of fold (``locator_report.py``), kept with the locator."""
        return self.locator_dir(group, existing=False) / "oof_report.json"

    def locator_oof(self, group: str) -> Path:
        """Every labelled point of the group and where its locator put it, out of fold."""
        return self.locator_dir(group, existing=False) / "oof_points.csv"

    # --- what is there --------------------------------------------------------------------------
    def backbones(self) -> list[str]:
        """Backbones with at least one finished fold of any group."""
        if not self.trained_models.is_dir():
            return []
        return sorted(p.name for p in self.trained_models.iterdir()
                      if p.is_dir() and p.name != LOCALIZER_NAME and any(self.groups_of(p.name)))

    def groups_of(self, name: str) -> list[str]:
        """The groups of one backbone with at least one finished fold, in registry order."""
        return [g for g in GROUPS if self.finished_fold_dirs(name, g)]

    def oof_names(self, group: str) -> list[str]:
        """Names (backbones, the blend) with OOF files for ``group``."""
        if not self.oof.is_dir():
            return []
        return sorted(p.name for p in self.oof.iterdir() if p.is_dir() and p.name != "localised"
                      and any(self.oof_dir(p.name, group).glob("fold*.csv")))


def remember_folds(layout: RunLayout, folds_path: Path) -> None:
    """Copy the folds file into the run (``OUTPUT/folds.csv``), so that evaluation and blending use the
    folds the models were trained on; a run trained on other folds is refused (their OOF rows would
    mix studies each model has seen)."""
    folds_path = Path(folds_path)
    if layout.folds.is_file():
        if layout.folds.resolve() != folds_path.resolve() and not same_folds(layout.folds, folds_path):
            raise SpinegradeError(f"{folds_path}: differs from the folds this run was trained on ({layout.folds}); "
                                  "use another --output-dir, or the same folds file")
        return
    write_csv_atomic(read_folds(folds_path), layout.folds)


def same_folds(a: Path, b: Path) -> bool:
    def canonical(path: Path) -> pd.DataFrame:
        return read_folds(path).sort_values("study_id").reset_index(drop=True)[["study_id", "fold"]]

    return canonical(a).equals(canonical(b))


def run_folds(layout: RunLayout, folds_path: str | Path | None) -> Path:
    """The folds file of a run: the one given (checked against the run's copy when there is one), else
    the copy the run made at training."""
    if folds_path is None:
        if not layout.folds.is_file():
            raise SpinegradeError(f"{layout.folds}: this run has no copy of its folds (trained before runs kept "
                                  "one); give --folds FILE")
        return layout.folds
    folds_path = Path(folds_path)
    if layout.folds.is_file() and folds_path.resolve() != layout.folds.resolve() and not same_folds(layout.folds, folds_path):
        raise SpinegradeError(f"{folds_path}: differs from the folds this run's models were trained on "
                              f"({layout.folds}); leave out --folds to use those")
    return folds_path
