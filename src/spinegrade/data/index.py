"""Read the RSNA CSV files into one tidy table and report every problem found in them.

The tidy table has one row per (study, condition, level) with the label, the series the
condition is read on, the labelled instance and point, and the path of that DICOM file. Bad rows
never stop the index: each problem is recorded with the file and CSV line it came from, and the
sample it affects is marked unusable. The index fails (with a message naming the file) only when
a required CSV or column is missing, or when no labelled cell is left at all.
"""

from __future__ import annotations

import difflib
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.constants import (
    CONDITION_FROM_TITLE,
    CONDITION_SERIES_KIND,
    CONDITIONS,
    LABEL_COLUMNS,
    LEVEL_FROM_TITLE,
    LEVELS,
    SERIES_DESCRIPTIONS,
    SEVERITIES,
    SEVERITY_INDEX,
    label_column,
)
from spinegrade.errors import DicomReadError, SpinegradeError

TIDY_COLUMNS = [
    "study_id", "condition", "level", "label", "severity", "series_id", "series_description",
    "instance_number", "x", "y", "image_path", "usable",
]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, traceable to a file and (when it has one) a CSV line."""

    kind: str
    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


@dataclass
class DataIndex:
    data_dir: Path
    split: str
    table: pd.DataFrame  # TIDY_COLUMNS, one row per (study, condition, level)
    series: pd.DataFrame  # study_id, series_id, series_description
    problems: list[Problem] = field(default_factory=list)

    @property
    def study_ids(self) -> list[int]:
        return sorted(self.table["study_id"].unique().tolist())

    def labels_wide(self) -> pd.DataFrame:
        """One row per study, one column per target, severity index (-1 where unlabelled)."""
        wide = self.table.assign(column=self.table["condition"] + "_" + self.table["level"])
        wide = wide.pivot(index="study_id", columns="column", values="severity")
        return wide.reindex(columns=list(LABEL_COLUMNS)).fillna(-1).astype(int)

    def usable(self, condition: str | None = None) -> pd.DataFrame:
        t = self.table[self.table["usable"]]
        return t if condition is None else t[t["condition"] == condition]


def _names(names, limit: int = 6) -> str:
    """A list of column names short enough for a one-line message (train.csv has 26 columns)."""
    names = [str(n) for n in names]
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _looks_like_data(value: str) -> bool:
    """Every competition CSV starts its rows with a numeric study id; a header never does."""
    try:
        float(value)
    except ValueError:
        return False
    return True


def read_csv_checked(path: Path, required: list[str], dtypes: dict | None = None) -> pd.DataFrame:
    """Read a competition CSV, failing with the file's name when it is absent, empty or lacks columns."""
    if not path.is_file():
        raise SpinegradeError(f"{path}: required file not found")
    try:
        df = pd.read_csv(path, dtype=dtypes or {}, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise SpinegradeError(f"{path}: file is empty (expected a header line naming {_names(required)})") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise SpinegradeError(f"{path}: cannot parse as CSV ({str(exc).strip()})") from None
    # A header saved from a spreadsheet often carries stray spaces around the names.
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        if len(missing) == len(required) and _looks_like_data(df.columns[0]):
            with open(path, encoding="utf-8", errors="replace") as f:
                first = f.readline().strip()
            shown = first if len(first) <= 60 else first[:57] + "..."
            raise SpinegradeError(f"{path}:1: no header line: the first line is data ({shown!r}); "
                                  f"it must name the columns {_names(required)}")
        unexpected = {c.lower(): c for c in df.columns if c not in required}
        hints = []
        for column in missing:
            close = difflib.get_close_matches(column.lower(), list(unexpected), n=1, cutoff=0.6)
            if close:
                hints.append(f"is {unexpected[close[0]]!r} meant to be {column!r}?")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise SpinegradeError(f"{path}:1: missing column(s) {_names(missing)}{hint}; found {_names(df.columns)}")
    return df


def _int_ids(df: pd.DataFrame, columns: list[str], path: Path, problems: list[Problem]) -> pd.DataFrame:
    """Keep rows whose id columns are integers; report the others with their CSV line."""
    ok = pd.Series(True, index=df.index)
    for column in columns:
        numeric = pd.to_numeric(df[column], errors="coerce")
        bad = numeric.isna() | (numeric != np.floor(numeric))
        for i in df.index[bad & ok]:
            problems.append(Problem("bad_id", path.name, int(i) + 2, f"{column} {df.at[i, column]!r} is not an integer id; row skipped"))
        ok &= ~bad
        df[column] = numeric
    df = df[ok].copy()
    for column in columns:
        df[column] = df[column].astype(np.int64)
    return df


def _read_series(data_dir: Path, split: str, problems: list[Problem]) -> pd.DataFrame:
    path = data_dir / f"{split}_series_descriptions.csv"
    df = read_csv_checked(path, ["study_id", "series_id", "series_description"])
    df = _int_ids(df, ["study_id", "series_id"], path, problems)
    unknown = ~df["series_description"].isin(SERIES_DESCRIPTIONS)
    for i in df.index[unknown]:
        problems.append(Problem("unknown_series_description", path.name, int(i) + 2,
                                f"series {df.at[i, 'series_id']}: unknown description {df.at[i, 'series_description']!r}"))
    df["line"] = df.index + 2  # the CSV line, kept for messages after rows are dropped
    return df[["study_id", "series_id", "series_description", "line"]].reset_index(drop=True)


def _read_labels(data_dir: Path, problems: list[Problem]) -> pd.DataFrame:
    """train.csv melted to (study_id, condition, level, label, severity)."""
    path = data_dir / "train.csv"
    df = read_csv_checked(path, ["study_id", *LABEL_COLUMNS], dtypes={c: str for c in LABEL_COLUMNS})
    df = _int_ids(df, ["study_id"], path, problems)
    duplicated = df["study_id"].duplicated()
    for i in df.index[duplicated]:
        problems.append(Problem("duplicate_study", path.name, int(i) + 2, f"study {df.at[i, 'study_id']} listed again; row skipped"))
    df = df[~duplicated]
    long = df.melt(id_vars="study_id", value_vars=list(LABEL_COLUMNS), var_name="column", value_name="label")
    long["line"] = long["study_id"].map(pd.Series(df.index.to_numpy() + 2, index=df["study_id"]))
    long["label"] = long["label"].str.strip()
    unknown = long["label"].notna() & ~long["label"].isin(SEVERITIES)
    for _, r in long[unknown].iterrows():
        problems.append(Problem("unknown_label", path.name, int(r.line),
                                f"study {r.study_id} {r.column}: unknown grade {r.label!r} (expected one of {', '.join(SEVERITIES)}); treated as unlabelled"))
    long.loc[unknown, "label"] = np.nan
    split_names = {label_column(c, lv): (c, lv) for c in CONDITIONS for lv in LEVELS}
    long["condition"] = long["column"].map(lambda c: split_names[c][0])
    long["level"] = long["column"].map(lambda c: split_names[c][1])
    long["severity"] = long["label"].map(SEVERITY_INDEX).fillna(-1).astype(int)
    return long[["study_id", "condition", "level", "label", "severity", "line"]]


def _read_coordinates(data_dir: Path, problems: list[Problem], labelled_studies: set[int]) -> pd.DataFrame:
    path = data_dir / "train_label_coordinates.csv"
    required = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    df = read_csv_checked(path, required)
    df = _int_ids(df, ["study_id", "series_id", "instance_number"], path, problems)
    df["line"] = df.index + 2
    df["condition"] = df["condition"].map(lambda s: CONDITION_FROM_TITLE.get(str(s).strip(), None))
    df["level"] = df["level"].map(lambda s: LEVEL_FROM_TITLE.get(str(s).strip().upper(), None))
    for column in ("condition", "level"):
        for i in df.index[df[column].isna()]:
            problems.append(Problem(f"unknown_{column}", path.name, int(df.at[i, "line"]), f"unknown {column}; row skipped"))
    df = df.dropna(subset=["condition", "level"])
    raw = df[["x", "y"]].copy()
    for column in ("x", "y"):
        df[column] = pd.to_numeric(df[column], errors="coerce")
    bad_xy = ~np.isfinite(df["x"]) | ~np.isfinite(df["y"]) | (df["x"] < 0) | (df["y"] < 0)
    for i in df.index[bad_xy]:
        shown = ", ".join("empty" if pd.isna(v) else repr(str(v)) for v in raw.loc[i])
        problems.append(Problem("bad_coordinate", path.name, int(df.at[i, "line"]),
                                f"x/y ({shown}) missing, not a finite number or negative; row skipped"))
    df = df[~bad_xy]
    unknown_study = ~df["study_id"].isin(labelled_studies)
    for i in df.index[unknown_study]:
        problems.append(Problem("coordinate_without_label", path.name, int(df.at[i, "line"]),
                                f"study {df.at[i, 'study_id']} is not in train.csv"))
    df = df[~unknown_study]
    key = ["study_id", "condition", "level"]
    duplicated = df.duplicated(subset=key, keep="first")
    for i in df.index[duplicated]:
        r = df.loc[i]
        problems.append(Problem("duplicate_coordinate", path.name, int(r.line),
                                f"study {r.study_id} {r.condition} {r.level} has a point already; this one ignored"))
    return df[~duplicated]


def group_label_rows(data_dir: Path, conditions: tuple[str, ...]) -> list[pd.DataFrame]:
    """The label rows a group's graders learn from, as written: train.csv's columns of ``conditions``
    and the coordinates of ``conditions`` (read plainly, for a fold's ``labels_digest``: cheap enough
    to check before every finished fold is skipped)."""
    labels = read_csv_checked(data_dir / "train.csv", ["study_id"])
    columns = ["study_id", *(c for c in (label_column(k, lv) for k in conditions for lv in LEVELS) if c in labels.columns)]
    coordinates = read_csv_checked(data_dir / "train_label_coordinates.csv", ["study_id", "condition"])
    mine = coordinates["condition"].map(lambda t: CONDITION_FROM_TITLE.get(str(t).strip())).isin(conditions)
    return [labels[columns], coordinates[mine]]


def _image_path(data_dir: Path, split: str, study_id, series_id, instance) -> str:
    return str(data_dir / f"{split}_images" / str(int(study_id)) / str(int(series_id)) / f"{int(instance)}.dcm")


def _existing_files(paths: list[str]) -> set[str]:
    """Which of ``paths`` exist, listing each series folder once instead of one stat per file."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for p in paths:
        by_dir[os.path.dirname(p)].append(p)
    found: set[str] = set()
    for directory, members in by_dir.items():
        try:
            names = set(os.listdir(directory))
        except OSError:
            continue
        found.update(p for p in members if os.path.basename(p) in names)
    return found


# Below this many files one process reads them all: starting workers costs more than it saves.
PARALLEL_FROM = 256


def _check_chunk(job: tuple[list[str], bool]) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    from spinegrade.data.dicom import read_slice

    paths, decode_pixels = job
    shapes, bad = {}, {}
    for p in paths:
        try:
            shapes[p] = read_slice(p, with_pixels=decode_pixels).shape
        except DicomReadError as exc:
            bad[p] = exc.reason
    return shapes, bad


def _check_readable(paths: list[str], decode_pixels: bool,
                    workers: int | None = None) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """(rows, columns) of each readable DICOM file among ``paths``, and the unreadable ones with the
    reason; headers only unless ``decode_pixels``. Many files are shared out over the cores (reading a
    header is mostly CPU: parsing, not waiting for the disk)."""
    workers = workers or min(8, os.cpu_count() or 1)
    if workers < 2 or len(paths) < PARALLEL_FROM:
        return _check_chunk((paths, decode_pixels))
    from concurrent.futures import ProcessPoolExecutor

    size = max(64, len(paths) // (workers * 8))
    jobs = [(paths[i:i + size], decode_pixels) for i in range(0, len(paths), size)]
    shapes, bad = {}, {}
    with ProcessPoolExecutor(workers) as pool:
        for part_shapes, part_bad in pool.map(_check_chunk, jobs):
            shapes.update(part_shapes)
            bad.update(part_bad)
    return shapes, bad


def _series_files(series: pd.DataFrame, data_dir: Path, split: str) -> dict[str, str]:
    """Every file in every listed series folder of the three kinds, with the series it is in (for messages)."""
    out = {}
    for r in series[series["series_description"].isin(SERIES_DESCRIPTIONS)].itertuples():
        folder = data_dir / f"{split}_images" / str(r.study_id) / str(r.series_id)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # reported as series_folder_missing
        for entry in entries:
            if entry.is_file() and not entry.name.startswith("."):  # hidden files are the file system's, never a slice
                out[entry.path] = f"{r.series_description} series {r.series_id}"
    return out


def _listed_on(points: pd.DataFrame) -> dict[str, str]:
    """For each image path, the coordinate lines that name it, so a file's problem leads back to its rows."""
    out = {}
    for path, lines in points.dropna(subset=["coord_line"]).groupby("image_path")["coord_line"]:
        numbers = sorted({int(v) for v in lines})
        shown = ", ".join(map(str, numbers[:5])) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
        out[path] = f" (train_label_coordinates.csv line{'s' if len(numbers) > 1 else ''} {shown})"
    return out


def build_index(data_dir: str | Path, split: str = "train", check_images: bool = True,
                decode_pixels: bool = False) -> DataIndex:
    """Index ``split`` of the dataset in ``data_dir``.

    ``check_images`` looks for every labelled file and reads the DICOM header of every file in every
    listed series of the three kinds, labelled or not (``decode_pixels`` also decodes the pixels);
    without it only the CSVs are read.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SpinegradeError(f"{data_dir}: data directory not found (run `spinegrade synth` or `make download`)")
    if split not in ("train", "test"):
        raise SpinegradeError(f"unknown split {split!r}: expected train or test")
    problems: list[Problem] = []
    series = _read_series(data_dir, split, problems)
    series_file = f"{split}_series_descriptions.csv"

    if split == "train":
        labels = _read_labels(data_dir, problems)
        coords = _read_coordinates(data_dir, problems, set(labels["study_id"]))
        table = labels.merge(coords.rename(columns={"line": "coord_line"}), on=["study_id", "condition", "level"],
                             how="left", suffixes=("", "_coord"))
        orphan = coords.merge(labels[labels["severity"] < 0][["study_id", "condition", "level"]],
                              on=["study_id", "condition", "level"])
        for _, r in orphan.iterrows():
            problems.append(Problem("coordinate_without_label", "train_label_coordinates.csv", int(r.line),
                                    f"study {r.study_id} {r.condition} {r.level} has a point but no grade"))
        no_point = (table["severity"] >= 0) & table["series_id"].isna()
        for _, r in table[no_point].iterrows():
            problems.append(Problem("label_without_coordinates", "train.csv", int(r.line),
                                    f"study {r.study_id} {r.condition} {r.level}: graded but has no coordinate"))
        table = table.drop(columns="line")
    else:
        studies = sorted(series["study_id"].unique())
        table = pd.DataFrame(
            [(s, c, lv) for s in studies for c in CONDITIONS for lv in LEVELS], columns=["study_id", "condition", "level"]
        )
        table["label"], table["severity"] = np.nan, -1
        for column in ("series_id", "instance_number", "x", "y", "coord_line"):
            table[column] = np.nan

    # Which series each condition is read on: the coordinate's series when there is one, else the
    # study's first series with the expected description.
    expected = {(r.study_id, r.series_description): r.series_id
                for r in series.drop_duplicates(["study_id", "series_description"]).itertuples()}
    descriptions = dict(zip(series["series_id"], series["series_description"]))
    table["expected_description"] = table["condition"].map(CONDITION_SERIES_KIND)
    fallback = [expected.get((s, d), np.nan) for s, d in zip(table["study_id"], table["expected_description"])]
    table["series_id"] = table["series_id"].fillna(pd.Series(fallback, index=table.index))
    table["series_description"] = table["series_id"].map(descriptions)

    studies_with = series.groupby("study_id")["series_description"].agg(set).to_dict()
    for study_id in sorted(table["study_id"].unique()):
        present = studies_with.get(study_id, set())
        for description in SERIES_DESCRIPTIONS:
            if description not in present:
                problems.append(Problem("missing_series", series_file, None,
                                        f"study {study_id} has no {description} series"))
    labelled_points = table[table["instance_number"].notna()]
    unlisted = labelled_points["series_description"].isna()
    for _, r in labelled_points[unlisted].drop_duplicates(["study_id", "series_id"]).iterrows():
        problems.append(Problem("series_not_listed", series_file, None,
                                f"study {r.study_id}: series {int(r.series_id)} has label points but is not listed"))
    mismatch = labelled_points["series_description"].notna() & (
        labelled_points["series_description"] != labelled_points["expected_description"])
    for (study_id, condition, description), _ in labelled_points[mismatch].groupby(
            ["study_id", "condition", "series_description"]):
        problems.append(Problem("unexpected_series", "train_label_coordinates.csv", None,
                                f"study {study_id}: {condition} points lie on a {description} series (kept)"))

    # Image files.
    has_point = table["instance_number"].notna()
    table["image_path"] = None
    table.loc[has_point, "image_path"] = [
        _image_path(data_dir, split, s, se, i)
        for s, se, i in zip(table.loc[has_point, "study_id"], table.loc[has_point, "series_id"],
                            table.loc[has_point, "instance_number"])
    ]
    readable = has_point.copy()
    if check_images:
        from spinegrade.data.dicom import MIN_IMAGE_SIDE

        listed = series.apply(lambda r: data_dir / f"{split}_images" / str(r.study_id) / str(r.series_id), axis=1)
        for (r, folder) in zip(series.itertuples(), listed):
            if not folder.is_dir():
                problems.append(Problem("series_folder_missing", series_file, int(r.line),
                                        f"{folder.relative_to(data_dir)}: listed but absent"))
        paths = sorted(set(table.loc[has_point, "image_path"]))
        existing = _existing_files(paths)
        listed_on = _listed_on(table[has_point])
        for p in paths:
            if p not in existing and Path(p).parent.is_dir():
                problems.append(Problem("image_missing", str(Path(p).relative_to(data_dir)), None,
                                        f"labelled instance file is absent{listed_on.get(p, '')}"))
        in_series = _series_files(series, data_dir, split)
        shapes, unreadable = _check_readable(sorted(existing | set(in_series)), decode_pixels)
        for p, reason in sorted(unreadable.items()):
            if p in existing:
                problems.append(Problem("unreadable_dicom", str(Path(p).relative_to(data_dir)), None,
                                        f"{reason}{listed_on.get(p, '')}"))
            else:  # nobody labelled it, but prediction may read any slice of a stack
                problems.append(Problem("unreadable_file", str(Path(p).relative_to(data_dir)), None,
                                        f"{reason} (unlabelled file of {in_series[p]})"))
        too_small = {p: shape for p, shape in shapes.items() if min(shape) < MIN_IMAGE_SIDE}
        for p, (rows, cols) in sorted(too_small.items()):
            what = ("its samples are skipped" if p in existing
                    else f"unlabelled file of {in_series[p]}, never read as a slice")
            problems.append(Problem("image_too_small", str(Path(p).relative_to(data_dir)), None,
                                    f"{rows}x{cols} pixels (rows x columns) is too small to grade{listed_on.get(p, '')}; "
                                    f"{what}"))
        readable = table["image_path"].isin(existing - set(unreadable) - set(too_small))
        # A point outside its image would be graded on an empty (black) crop.
        rows_of = table["image_path"].map(lambda p: shapes[p][0] if p in shapes else np.nan)
        columns_of = table["image_path"].map(lambda p: shapes[p][1] if p in shapes else np.nan)
        outside = readable & ((table["y"] >= rows_of) | (table["x"] >= columns_of))
        for _, r in table[outside].iterrows():
            rows, cols = shapes[r.image_path]
            problems.append(Problem("coordinate_outside_image", "train_label_coordinates.csv", int(r.coord_line),
                                    f"study {r.study_id} {r.condition} {r.level}: point ({r.x:g}, {r.y:g}) lies outside "
                                    f"{Path(r.image_path).relative_to(data_dir)} ({rows}x{cols} pixels, rows x columns); "
                                    "sample skipped"))
        readable &= ~outside
    table["usable"] = (table["severity"] >= 0) & readable if split == "train" else readable
    table["instance_number"] = table["instance_number"].astype("Int64")
    table["series_id"] = table["series_id"].astype("Int64")
    table = table[TIDY_COLUMNS].sort_values(["study_id", "condition", "level"], key=_order_key).reset_index(drop=True)
    if split == "train" and not (table["severity"] >= 0).any():
        raise SpinegradeError(f"{data_dir / 'train.csv'}: no labelled cell left after removing the problems reported")
    return DataIndex(data_dir, split, table, series, problems)


def _order_key(column: pd.Series) -> pd.Series:
    """Sort conditions and levels in competition order rather than alphabetically."""
    if column.name == "condition":
        return column.map({c: i for i, c in enumerate(CONDITIONS)})
    if column.name == "level":
        return column.map({lv: i for i, lv in enumerate(LEVELS)})
    return column


def format_report(index: DataIndex, examples: int = 5) -> str:
    """The data report: counts, label balance, usable samples, and problems grouped by kind."""
    t, s = index.table, index.series
    lines = [f"Data report: {index.data_dir} ({index.split})",
             f"  studies: {t['study_id'].nunique()}   series: {len(s)}"]
    per_type = s["series_description"].value_counts()
    lines.append("  series per type: " + ", ".join(f"{d} {int(per_type.get(d, 0))}" for d in SERIES_DESCRIPTIONS))
    if index.split == "train":
        lines.append("  labels per condition and level (Normal/Mild / Moderate / Severe / unlabelled):")
        counts = t.groupby(["condition", "level", "severity"]).size()
        for condition in CONDITIONS:
            cells = []
            for level in LEVELS:
                c = [int(counts.get((condition, level, k), 0)) for k in (0, 1, 2, -1)]
                cells.append(f"{level} {c[0]}/{c[1]}/{c[2]}/{c[3]}")
            lines.append(f"    {condition:34s} " + "  ".join(cells))
        totals = t.groupby("condition")["severity"].value_counts().unstack(fill_value=0)
        lines.append("  totals (Normal/Mild, Moderate, Severe):")
        for condition in CONDITIONS:
            row = totals.loc[condition] if condition in totals.index else pd.Series(dtype=int)
            c = [int(row.get(k, 0)) for k in (0, 1, 2)]
            n = max(sum(c), 1)
            lines.append(f"    {condition:34s} {c[0]:6d} {c[1]:6d} {c[2]:6d}   "
                         f"({100 * c[0] / n:.1f}% / {100 * c[1] / n:.1f}% / {100 * c[2] / n:.1f}%)")
        lines.append(f"  unlabelled cells: {int((t['severity'] < 0).sum())} in {t[t['severity'] < 0]['study_id'].nunique()} studies")
    usable = t[t["usable"]].groupby("condition").size()
    lines.append("  usable samples (label, point and readable image): "
                 + ", ".join(f"{c} {int(usable.get(c, 0))}" for c in CONDITIONS))
    by_kind = Counter(p.kind for p in index.problems)
    if not by_kind:
        lines.append("  problems: none")
    else:
        lines.append(f"  problems: {len(index.problems)} (affected samples are skipped)")
        for kind, n in by_kind.most_common():
            lines.append(f"    {kind}: {n}")
            for p in [p for p in index.problems if p.kind == kind][:examples]:
                lines.append(f"      {p}")
            if n > examples:
                lines.append(f"      ... and {n - examples} more")
    return "\n".join(lines)
