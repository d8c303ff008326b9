"""The one place where condition, level, severity and series names live.

The competition spells the same things two ways: ``train.csv`` columns use snake case
(``spinal_canal_stenosis_l4_l5``) while ``train_label_coordinates.csv`` uses Title Case
(``Spinal Canal Stenosis``, ``L4/L5``). Every other module converts through the helpers here,
so a spelling is never re-typed elsewhere.
"""

from __future__ import annotations

COMPETITION = "rsna-2024-lumbar-spine-degenerative-classification"

CONDITIONS: tuple[str, ...] = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
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

# Which series a radiologist marks each condition on.
CONDITION_SERIES: dict[str, str] = {
    "spinal_canal_stenosis": SAGITTAL_T2,
    "left_neural_foraminal_narrowing": SAGITTAL_T1,
    "right_neural_foraminal_narrowing": SAGITTAL_T1,
    "left_subarticular_stenosis": AXIAL_T2,
    "right_subarticular_stenosis": AXIAL_T2,
}

# Metric groups: left and right are scored together.
CONDITION_GROUP: dict[str, str] = {
    "spinal_canal_stenosis": "spinal",
    "left_neural_foraminal_narrowing": "foraminal",
    "right_neural_foraminal_narrowing": "foraminal",
    "left_subarticular_stenosis": "subarticular",
    "right_subarticular_stenosis": "subarticular",
}
METRIC_GROUPS: tuple[str, ...] = ("spinal", "foraminal", "subarticular")


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

# A horizontal flip of an image exchanges the patient's left and right.
_SIDE_SWAP = {"left_": "right_", "right_": "left_"}


def flipped_condition(condition: str) -> str:
    """The condition a horizontal flip turns ``condition`` into (left <-> right; spinal unchanged)."""
    for prefix, other in _SIDE_SWAP.items():
        if condition.startswith(prefix):
            return other + condition[len(prefix) :]
    return condition
