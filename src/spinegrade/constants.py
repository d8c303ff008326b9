"""The one place where condition, level, severity and series names live.

The competition spells the same things two ways: ``train.csv`` columns use snake case
(``spinal_canal_stenosis_l4_l5``) while ``train_label_coordinates.csv`` uses Title Case
(``Spinal Canal Stenosis``, ``L4/L5``). Every other module converts through the helpers here,
so a spelling is never re-typed elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from spinegrade.errors import SpinegradeError

COMPETITION = "rsna-2024-lumbar-spine-degenerative-classification"

LEVELS: tuple[str, ...] = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
SEVERITIES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
# Submission column for each severity, in the same order.
PROBABILITY_COLUMNS: tuple[str, ...] = ("normal_mild", "moderate", "severe")
# Sample weights of the competition metric, per severity.
SEVERITY_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0)

SAGITTAL_T1 = "Sagittal T1"
SAGITTAL_T2 = "Sagittal T2/STIR"
AXIAL_T2 = "Axial T2"
SERIES_DESCRIPTIONS: tuple[str, ...] = (SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2)

@dataclass(frozen=True)
class ConditionGroup:
    """One metric group of the competition and how spinegrade reads it: everything a stage needs to
    know of a group comes from here, so a group is added by filling an entry (and its locator)."""

    name: str  # the metric group: the value of --conditions, the folder under trained_models/<backbone>/
    conditions: tuple[str, ...]  # scored together (left and right)
    series_kind: str  # the series description (one of SERIES_DESCRIPTIONS) a radiologist reads it on
    input: str  # default preprocessing: "full" (the whole slice) or "crop" (crop_mm around the point)
    crop_mm: float
    locator: str | None  # what places its points on a study without coordinates; None: none yet (prior rows)
    any_severe_term: str | None = None  # the per-study "any level Severe" term the metric adds, if any
    # Crops of both sides shown in one orientation (each side's lateral edge to the image's right): on an
    # axial slice the two sides are mirror images, so one model grades both from one view of the anatomy.
    turn_by_side: bool = False
    # Slices read as channels by its grading models by default: the labelled one and its neighbours (1, 3, 5).
    slices: int = 1
    # Grade as the mean over the image and its horizontal mirror (test-time augmentation), where the
    # group trains with flips that keep the grade (``flip_keeps_grade``).
    test_time_flip: bool = False


@dataclass(frozen=True)
class Condition:
    name: str  # train.csv's spelling: left_neural_foraminal_narrowing
    group: str
    side: str | None  # the patient's "left" or "right"; None for a midline condition


GROUPS: dict[str, ConditionGroup] = {g.name: g for g in (
    # The published method grades the whole slice; configs choose crops for small CPU backbones.
    ConditionGroup("spinal", ("spinal_canal_stenosis",), SAGITTAL_T2, input="full", crop_mm=48.0,
                   locator="sagittal_levels", any_severe_term="any_severe_spinal"),
    # The recipes below were chosen one setting at a time on the demo's data (docs/training.md, "A recipe
    # per group"): the foramina graded with their mirror too; the recesses on a tighter crop, five slices.
    ConditionGroup("foraminal", ("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"), SAGITTAL_T1,
                   input="crop", crop_mm=40.0, locator="sagittal_foramina", test_time_flip=True),
    ConditionGroup("subarticular", ("left_subarticular_stenosis", "right_subarticular_stenosis"), AXIAL_T2,
                   input="crop", crop_mm=24.0, locator="axial_subarticular", turn_by_side=True, slices=5),
)}
METRIC_GROUPS: tuple[str, ...] = tuple(GROUPS)

CONDITION_SPECS: dict[str, Condition] = {c.name: c for c in (
    Condition("spinal_canal_stenosis", "spinal", None),
    Condition("left_neural_foraminal_narrowing", "foraminal", "left"),
    Condition("right_neural_foraminal_narrowing", "foraminal", "right"),
    Condition("left_subarticular_stenosis", "subarticular", "left"),
    Condition("right_subarticular_stenosis", "subarticular", "right"),
)}
assert all(c in GROUPS[spec.group].conditions for c, spec in CONDITION_SPECS.items())
CONDITIONS: tuple[str, ...] = tuple(CONDITION_SPECS)

# Derived views of the registry, for lookups by condition.
CONDITION_GROUP: dict[str, str] = {c.name: c.group for c in CONDITION_SPECS.values()}
CONDITION_SERIES_KIND: dict[str, str] = {c.name: GROUPS[c.group].series_kind for c in CONDITION_SPECS.values()}


def group_of(condition: str) -> ConditionGroup:
    return GROUPS[CONDITION_SPECS[condition].group]


def check_groups(names) -> list[str]:
    """Group names as given on a command line, checked; in registry order."""
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise SpinegradeError(f"unknown condition group(s) {', '.join(unknown)}: use {', '.join(GROUPS)}")
    return [g for g in GROUPS if g in names]


def label_column(condition: str, level: str) -> str:
    """``train.csv`` column name, e.g. ``spinal_canal_stenosis_l4_l5``."""
    return f"{condition}_{level}"


LABEL_COLUMNS: tuple[str, ...] = tuple(label_column(c, lv) for c in CONDITIONS for lv in LEVELS)


def row_id(study_id: int | str, condition: str, level: str) -> str:
    """Submission ``row_id``: ``{study_id}_{condition}_{level}``."""
    return f"{study_id}_{condition}_{level}"


def parse_row_id(rid: str) -> tuple[int, str, str]:
    """Inverse of :func:`row_id`; study ids contain no underscore, conditions and levels do."""
    study, rest = rid.split("_", 1)
    for condition in CONDITIONS:
        if rest.startswith(condition + "_"):
            level = rest[len(condition) + 1 :]
            if level in LEVELS:
                return int(study), condition, level
    raise ValueError(f"not a competition row_id: {rid!r}")


def condition_title(condition: str) -> str:
    """Coordinate-file spelling: ``Spinal Canal Stenosis``."""
    return condition.replace("_", " ").title()


def level_title(level: str) -> str:
    """Coordinate-file spelling: ``L4/L5``."""
    return level.upper().replace("_", "/")


CONDITION_FROM_TITLE: dict[str, str] = {condition_title(c): c for c in CONDITIONS}
LEVEL_FROM_TITLE: dict[str, str] = {level_title(lv): lv for lv in LEVELS}
SEVERITY_INDEX: dict[str, int] = {s: i for i, s in enumerate(SEVERITIES)}

def flipped_condition(condition: str) -> str:
    """The condition a flip that exchanges the patient's sides turns ``condition`` into: the same group's
    condition on the other side (a midline condition is unchanged)."""
    spec = CONDITION_SPECS[condition]
    if spec.side is None:
        return condition
    other = "right" if spec.side == "left" else "left"
    return next(c for c in GROUPS[spec.group].conditions if CONDITION_SPECS[c].side == other)


def flip_keeps_grade(group: str, input_mode: str) -> bool:
    """Whether a horizontal flip of a ``group`` image keeps its grade: a flip of a whole axial slice shows
    the patient's other side (its label becomes ``flipped_condition``'s grade); a crop centred on one
    side's point still shows that side, and a sagittal flip only swaps front and back."""
    return not (GROUPS[group].series_kind == AXIAL_T2 and input_mode == "full")
