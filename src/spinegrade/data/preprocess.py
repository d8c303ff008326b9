"""Decode each needed DICOM slice once into model-ready 8-bit images, cached on disk.

Training never touches DICOM: every sample's image (the whole slice resized, or a crop of fixed
physical size around the labelled point) is computed once and stored in one memory-mapped array
per cache key. Each sample keeps its neighbouring slices too, and a crop keeps a margin around
it, so that training can shift the point and the slice the way a localiser's errors would
without decoding anything again. The key covers everything that changes the bytes (condition, input mode, image
size, crop size, the samples and their points, the preprocessing version), so folds and backbones
sharing those settings share the cache, and a changed setting can never read a stale one. A cache
is written to a temporary folder and renamed into place: a killed build leaves nothing trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from spinegrade.constants import LEVELS
from spinegrade.data.dicom import Stack, read_series
from spinegrade.errors import DicomReadError

PREPROCESS_VERSION = 2
# Intensity window: robust to the scanner's arbitrary scale and to a few hot pixels.
LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.5


@dataclass(frozen=True)
class PreprocessSettings:
    condition: str
    input: str  # "full" or "crop"
    image_size: int
    crop_mm: float
    neighbours: int = 1  # slices cached on each side of the labelled one
    margin: float = 0.25  # a crop's cached canvas is this much larger, for point jitter

    @classmethod
    def from_config(cls, config) -> "PreprocessSettings":
        return cls(config.condition, config.input, config.image_size, config.crop_mm)

    @property
    def canvas_size(self) -> int:
        """Side of a cached image: the model's input plus an even margin (crops only)."""
        if self.input != "crop":
            return self.image_size
        return self.image_size + 2 * int(round(self.image_size * self.margin / 2))

    @property
    def mm_per_pixel(self) -> float:
        return self.crop_mm / self.image_size


def window_to_uint8(pixels: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(pixels, [LOW_PERCENTILE, HIGH_PERCENTILE])
    scaled = (pixels.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1e-6))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def prepare_image(pixels: np.ndarray, pixel_spacing: tuple[float, float], x: float, y: float,
                  settings: PreprocessSettings, size: int | None = None) -> np.ndarray:
    """The model's input for one point on one slice: a ``size`` square of uint8 (``image_size`` by
    default; a crop keeps the scale of ``crop_mm`` over ``image_size`` whatever ``size`` is)."""
    image = window_to_uint8(pixels)
    size = size or settings.image_size
    if settings.input == "full":
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    row_spacing, col_spacing = pixel_spacing
    mm_per_output_pixel = settings.mm_per_pixel
    sx, sy = col_spacing / mm_per_output_pixel, row_spacing / mm_per_output_pixel
    if sx < 1 or sy < 1:
        # Shrinking: average pixels first (INTER_AREA) so the crop does not alias, then crop at scale 1.
        h, w = image.shape
        new_w, new_h = max(1, round(w * sx)), max(1, round(h * sy))
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        x, y = (x + 0.5) * new_w / w - 0.5, (y + 0.5) * new_h / h - 0.5
        sx, sy = 1.0, 1.0
    # Output pixel u shows input point x + (u - (size - 1) / 2) / sx: the point lands in the centre.
    centre = (size - 1) / 2
    matrix = np.array([[sx, 0.0, centre - sx * x], [0.0, sy, centre - sy * y]])
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


# What identifies a sample's image; labels and folds are deliberately not part of it (see build_cache).
SAMPLE_KEY = ["study_id", "condition", "level"]


def prepare_stack(stack: Stack, index: int, x: float, y: float, settings: PreprocessSettings) -> np.ndarray:
    """Canvases (2 * neighbours + 1, C, C) for slice ``index`` of ``stack`` and its neighbours, each
    centred on the same patient-space point (projected on the neighbour's own geometry); at the
    ends of the stack the nearest slice repeats."""
    point = stack.slices[index].pixel_to_patient(x, y)
    out = []
    for offset in range(-settings.neighbours, settings.neighbours + 1):
        s = stack.slices[min(max(index + offset, 0), len(stack) - 1)]
        px, py, _ = s.patient_to_pixel(point)
        out.append(prepare_image(s.pixels, s.pixel_spacing, px, py, settings, size=settings.canvas_size))
    return np.stack(out)


@dataclass
class SampleCache:
    """Cached canvases (N, slices, C, C) uint8, memory-mapped, and their samples table (row i <-> i)."""

    directory: Path
    images: np.ndarray
    samples: pd.DataFrame

    def __len__(self) -> int:
        return len(self.samples)


def cache_key(settings: PreprocessSettings, samples: pd.DataFrame) -> str:
    identity = samples[["study_id", "condition", "level", "image_path", "x", "y"]].astype(str).to_csv(index=False)
    payload = json.dumps({"settings": asdict(settings), "version": PREPROCESS_VERSION}, sort_keys=True) + identity
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _prepare_series(args) -> tuple[list[int], list[np.ndarray], list[str]]:
    """All samples on one series: it is decoded once, whatever the number of levels read on it."""
    series_dir, rows, settings = args
    errors: list[DicomReadError] = []
    stacks = read_series(series_dir, errors=errors)
    problems = [f"skipped slice: {e}" for e in errors]
    indices, images = [], []
    for i, path, instance, x, y in rows:
        found = [(st, st.index_of_instance(instance)) for st in stacks]
        found = [(st, k) for st, k in found if k is not None]
        if not found:
            reason = next((str(e) for e in errors if Path(e.path) == Path(path)), f"{path}: file not found")
            problems.append(f"skipped sample: {reason}")
            continue
        stack, k = found[0]
        if min(stack.slices[k].shape) < 8:
            problems.append(f"skipped sample: {path}: image of {stack.slices[k].shape} pixels is too small to grade")
            continue
        indices.append(i)
        images.append(prepare_stack(stack, k, x, y, settings))
    return indices, images, problems


def build_cache(samples: pd.DataFrame, settings: PreprocessSettings, cache_root: str | Path,
                workers: int = 0, log=print) -> SampleCache:
    """Cache the images of ``samples`` (usable rows of the tidy index) or reuse a cache with the same key.

    Samples whose file turns out unreadable are dropped (and logged with the file's path). The
    returned table carries the *current* columns of ``samples`` (grade, fold...), never those of the
    run that built the cache: only the images are cached, so a corrected label or a new folds file
    can never be served stale.
    """
    samples = samples.reset_index(drop=True)
    key = cache_key(settings, samples)
    directory = Path(cache_root) / f"{settings.condition}-{settings.input}-{settings.image_size}-{key}"
    if not _complete(directory):
        _write_cache(samples, settings, directory, workers, log)
    cache = open_cache(directory)
    cached = cache.samples[SAMPLE_KEY + ["level_index"]]
    current = cached.merge(samples, on=SAMPLE_KEY, how="left", validate="one_to_one")
    return SampleCache(cache.directory, cache.images, current)


def _complete(directory: Path) -> bool:
    return (directory / "samples.csv").is_file() and (directory / "images.npy").is_file()


def _write_cache(samples: pd.DataFrame, settings: PreprocessSettings, directory: Path, workers: int, log) -> None:
    series_dirs = samples["image_path"].map(lambda p: str(Path(p).parent))
    jobs = [
        (directory, [(int(i), r.image_path, int(r.instance_number), float(r.x), float(r.y)) for i, r in group.iterrows()],
         settings)
        for directory, group in samples.groupby(series_dirs, sort=True)
    ]
    workers = workers or min(8, os.cpu_count() or 1)
    c = settings.canvas_size
    images = np.zeros((len(samples), 2 * settings.neighbours + 1, c, c), dtype=np.uint8)
    ok = np.zeros(len(samples), dtype=bool)
    if workers > 1 and len(jobs) > 4:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_prepare_series, jobs, chunksize=max(1, len(jobs) // (workers * 8))))
    else:
        results = [_prepare_series(job) for job in jobs]
    for indices, prepared, problems in results:
        for problem in problems:
            log(problem)
        for i, image in zip(indices, prepared):
            images[i] = image
            ok[i] = True
    kept = samples[ok].reset_index(drop=True)
    kept = kept.assign(level_index=kept["level"].map({lv: i for i, lv in enumerate(LEVELS)}))
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        np.save(tmp / "images.npy", images[ok])
        kept[SAMPLE_KEY + ["level_index", "image_path", "x", "y"]].to_csv(tmp / "samples.csv", index=False)
        (tmp / "settings.json").write_text(json.dumps({**asdict(settings), "version": PREPROCESS_VERSION}, indent=1))
        tmp.chmod(0o755)
        os.replace(tmp, directory)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(directory):  # not another process finishing the same cache first
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size_mb = (directory / "images.npy").stat().st_size / 1e6
    log(f"cache: {len(kept)} samples from {len(jobs)} series in {directory} ({size_mb:.1f} MB, "
        f"{size_mb * 1000 / max(kept['study_id'].nunique(), 1):.0f} kB per study)")


def open_cache(directory: str | Path) -> SampleCache:
    directory = Path(directory)
    images = np.load(directory / "images.npy", mmap_mode="r")
    samples = pd.read_csv(directory / "samples.csv")
    return SampleCache(directory, images, samples)
