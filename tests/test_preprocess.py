"""The preprocessing cache: built once, shared, never stale, safe against a concurrent builder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from spinegrade.data.index import build_index
from spinegrade.data.preprocess import PreprocessSettings, _write_cache, build_cache

SETTINGS = PreprocessSettings("spinal", "crop", image_size=32, crop_mm=40.0)


def _samples(data_dir):
    t = build_index(data_dir, check_images=False).usable("spinal_canal_stenosis")
    return t.assign(fold=t["study_id"] % 3)


def test_cache_is_reused_and_carries_current_labels_and_folds(synth_dataset, tmp_path):
    samples = _samples(synth_dataset)
    first = build_cache(samples, SETTINGS, tmp_path, workers=1)
    assert len(first) == len(samples) and first.images.shape == (len(samples), 3, 40, 40)  # 3 slices, margin
    assert first.images.std() > 10  # real image content, not zeros
    mtime = (first.directory / "images.npy").stat().st_mtime_ns
    # New folds and a corrected grade: same images, fresh columns.
    changed = samples.assign(fold=(samples["study_id"] + 1) % 3)
    changed.loc[changed.index[0], "severity"] = 2
    second = build_cache(changed, SETTINGS, tmp_path, workers=1)
    assert second.directory == first.directory and (second.directory / "images.npy").stat().st_mtime_ns == mtime
    merged = second.samples.merge(changed, on=["study_id", "condition", "level"], suffixes=("", "_expected"))
    assert (merged["fold"] == merged["fold_expected"]).all() and (merged["severity"] == merged["severity_expected"]).all()
    # Other settings: another cache.
    other = build_cache(samples, PreprocessSettings("spinal", "full", 32, 40.0), tmp_path, workers=1)
    assert other.directory != first.directory and not np.array_equal(other.images, first.images)


def test_a_concurrent_builder_finishing_first_is_not_an_error(synth_dataset, tmp_path):
    samples = _samples(synth_dataset).head(5).reset_index(drop=True)
    cache = build_cache(samples, SETTINGS, tmp_path, workers=1)
    # A second process that started before the first finished renames onto a complete cache.
    _write_cache(samples, SETTINGS, cache.directory, workers=1)
    assert len(build_cache(samples, SETTINGS, tmp_path, workers=1)) == 5
    assert not [p.name for p in tmp_path.rglob(".*")]  # no temporary left behind


def test_unreadable_file_is_named_and_skipped(dataset_copy, tmp_path, logged):
    samples = _samples(dataset_copy)
    victim = samples.iloc[0].image_path
    with open(victim, "wb") as f:
        f.write(b"not dicom")
    cache = build_cache(samples, SETTINGS, tmp_path, workers=1)
    assert len(cache) == len(samples) - int((samples["image_path"] == victim).sum())
    assert any(victim in line and "skipped" in line for line in logged())


def test_canvas_centre_is_what_prediction_sees_and_neighbours_are_other_slices(synth_dataset, tmp_path):
    from spinegrade.data.dicom import read_slice
    from spinegrade.data.preprocess import prepare_image

    samples = _samples(synth_dataset).head(3).reset_index(drop=True)
    cache = build_cache(samples, SETTINGS, tmp_path, workers=1)
    for k, row in cache.samples.iterrows():
        s = read_slice(row.image_path)
        direct = prepare_image(s.pixels, s.pixel_spacing, row.x, row.y, SETTINGS)
        centre = cache.images[k, 1, 4:36, 4:36].astype(int)
        assert np.abs(centre - direct).max() <= 1  # equal up to rounding of the projected point
        assert not np.array_equal(cache.images[k, 0], cache.images[k, 1])


class Interrupt(Exception):
    pass


class _StopAfterThree(logging.Handler):
    """Raises at the third progress line, from inside the build's logging call."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.seen.append(line)
        if line.startswith("cache: decoded 3/"):
            raise Interrupt  # Ctrl-C, or a kill, in the middle of decoding (logging lets it through: emit is ours)


def test_an_interrupted_build_resumes_at_the_first_series_not_decoded(synth_dataset, tmp_path, logged):
    samples = _samples(synth_dataset)
    series = samples["image_path"].map(lambda p: str(Path(p).parent)).nunique()
    stop = _StopAfterThree()  # the `logged` fixture lets INFO records through to it
    logger = logging.getLogger("spinegrade")
    logger.addHandler(stop)
    try:
        with pytest.raises(Interrupt):
            build_cache(samples, SETTINGS, tmp_path / "a", workers=1)
    finally:
        logger.removeHandler(stop)
    assert "ETA" in stop.seen[-1]
    assert not list((tmp_path / "a").glob("spinal*"))  # no assembled cache a later run would trust
    before = len(logged())
    resumed = build_cache(samples, SETTINGS, tmp_path / "a", workers=1)
    lines = logged()[before:]
    assert any(f"3 of {series} series already decoded" in line for line in lines)
    assert sum(line.startswith("cache: decoded") for line in lines) >= 1
    fresh = build_cache(samples, SETTINGS, tmp_path / "b", workers=1)
    np.testing.assert_array_equal(resumed.images, fresh.images)
    assert resumed.samples.equals(fresh.samples)


def test_a_larger_sample_set_decodes_only_the_series_it_adds(synth_dataset, tmp_path, logged):
    samples = _samples(synth_dataset)
    studies = sorted(samples["study_id"].unique())
    small = samples[samples["study_id"].isin(studies[:10])].reset_index(drop=True)
    build_cache(small, SETTINGS, tmp_path, workers=2)
    before = len(logged())
    build_cache(samples, SETTINGS, tmp_path, workers=2)
    lines = logged()[before:]
    added = samples["image_path"].map(lambda p: str(Path(p).parent))[~samples["study_id"].isin(studies[:10])].nunique()
    assert any(f"decoding the other {added}" in line for line in lines), lines
