"""Whole-slice inputs see millimetres, not pixels: the same anatomy stored on another matrix looks the same
to the grading models and is found in the same place by the locator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from spinegrade.data.dicom import main_stack, read_series
from spinegrade.data.preprocess import (
    PreprocessSettings,
    SquareView,
    content_box,
    percentiles,
    prepare_image,
    window_limits,
)
from spinegrade.data.restore import IN_PLANE, Storage, restore
from spinegrade.layout import RunLayout
from spinegrade.slice_locator import SliceLocator


def _disc_phantom(shape, spacing, centre_mm, radius_mm=12.0) -> np.ndarray:
    """A bright disc of ``radius_mm`` at ``centre_mm`` (column, row in mm from the first pixel's centre)."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    distance = np.hypot(cols * spacing[1] - centre_mm[0], rows * spacing[0] - centre_mm[1])
    return np.where(distance < radius_mm, 1000.0, 100.0).astype(np.float32)


def test_square_view_shows_the_same_millimetres_whatever_the_matrix():
    field, size = 240.0, 64
    # The same 240 x 240 mm of anatomy: 480 x 480 at 0.5 mm, and 200 x 400 at 1.2 x 0.6 mm.
    square = SquareView.of((480, 480), (0.5, 0.5), size, field)
    oblong = SquareView.of((200, 400), (1.2, 0.6), size, field)
    a = square.render(_disc_phantom((480, 480), (0.5, 0.5), (150.0, 90.0)))
    b = oblong.render(_disc_phantom((200, 400), (1.2, 0.6), (150.0, 90.0)))
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 4  # only resampling differs
    squashed = SquareView.squashed((200, 400), size).render(_disc_phantom((200, 400), (1.2, 0.6), (150.0, 90.0)))
    assert np.abs(a.astype(int) - squashed.astype(int)).mean() < 4  # 240 x 240 mm: squashing changes nothing here
    # Half the field of view, padded to 4:3: the anatomy keeps its size and the slice's centre stays the square's.
    small = SquareView.of((240, 320), (0.5, 0.5), size, field)
    assert (small.width, small.height) == (43, 32) and (small.left, small.top) == (10, 16)
    c = small.render(_disc_phantom((240, 320), (0.5, 0.5), (80.0, 60.0)))
    disc_a, disc_c = (a > 128).sum(), (c > 128).sum()
    assert abs(disc_a - disc_c) <= 0.15 * disc_a
    # Larger than the field: cut on every side, never an error.
    big = SquareView.of((1000, 600), (0.5, 0.5), size, field)
    assert big.top < 0 and big.left < 0 and big.render(np.ones((1000, 600), np.float32)).shape == (size, size)


def test_whole_slice_input_keeps_the_slice_shape():
    """``input: full`` (the published method's whole slice) letterboxes a 4:3 slice instead of squashing it."""
    settings = PreprocessSettings("spinal", "full", 64, 0.0)
    pixels = _disc_phantom((300, 400), (0.5, 0.5), (100.0, 75.0), radius_mm=30.0)
    image = prepare_image(pixels, (0.5, 0.5), 0.0, 0.0, settings)
    assert image.shape == (64, 64)
    assert (image[:8] == 0).all() and (image[-8:] == 0).all() and image[8:-8].max() == 255  # bars above and below
    disc = np.argwhere(image > 128)
    height, width = np.ptp(disc, axis=0) + 1
    assert abs(int(height) - int(width)) <= 1  # still a disc, not an ellipse


def test_black_bands_on_one_side_do_not_move_the_anatomy():
    rng = np.random.default_rng(0)
    anatomy = _disc_phantom((60, 80), (0.5, 0.5), (25.0, 12.0), radius_mm=8.0)
    slice_ = anatomy + rng.normal(0, 5, anatomy.shape).astype(np.float32)  # noise everywhere, as in any real image
    padded = np.pad(slice_, ((5, 0), (30, 0)))  # black bands on the top and the left
    assert content_box(padded) == (5, 65, 30, 110) and content_box(slice_) == (0, 60, 0, 80)
    a = SquareView.fitted(slice_, (0.5, 0.5), 64, field_mm=50.0)
    b = SquareView.fitted(padded, (0.5, 0.5), 64, field_mm=50.0)
    x, y = np.array([0.0, 40.0, 79.0]), np.array([0.0, 30.0, 59.0])
    np.testing.assert_allclose(a.to_unit(x, y), b.to_unit(x + 30, y + 5), atol=1 / 64)
    shown = [a.render(slice_).astype(int), b.render(padded, window_limits(slice_)).astype(int)]
    assert np.abs(shown[0] - shown[1]).mean() < 3  # the same picture, but for resampling


def test_square_view_coordinates_round_trip():
    view = SquareView.of((200, 400), (1.2, 0.6), 64, 300.0)
    x, y = np.array([0.0, 123.4, 399.0]), np.array([0.0, 77.7, 199.0])
    u, v = view.to_unit(x, y)
    assert ((u > 0) & (u < 1) & (v > 0) & (v < 1)).all()
    back = view.to_pixels(u, v)
    np.testing.assert_allclose(back, (x, y), atol=1e-9)
    # The pixel centres of the slice's corners sit half a pixel inside its edges in the square.
    edges = view.to_unit(np.array([-0.5, 399.5]), np.array([-0.5, 199.5]))
    np.testing.assert_allclose(np.array(edges) * 64, [[view.left, view.left + view.width],
                                                      [view.top, view.top + view.height]])


def test_points_stay_put_when_the_slices_are_stored_on_another_matrix(trained_run, tmp_path):
    """Every test study's sagittal T2 series re-stored with a sixth of its width of black added on
    each side (4:3 in millimetres), its rows resampled to 0.75 of their number (pixels 1.33 times
    taller than wide), inverted as MONOCHROME1 and kept as signed values with a slope and intercept.
    A locator that squashed each slice into its square would see the anatomy 25% narrower; one
    that sees millimetres finds the same points."""
    data = trained_run["data"]
    slice_locator = SliceLocator(RunLayout(trained_run["out"]).locator_dir("spinal"))
    series = pd.read_csv(data / "test_series_descriptions.csv")
    series = series[series["series_description"] == "Sagittal T2/STIR"]
    shifts, same_slice = [], 0
    for row in series.itertuples():
        folder = data / "test_images" / str(row.study_id) / str(row.series_id)
        copy = tmp_path / str(row.series_id)
        storage = Storage(pad_columns=(1 / 6, 1 / 6), row_scale=0.75, monochrome1=True, rescale=(0.5, 1024.0))
        for path in sorted(folder.iterdir()):
            restore(path, copy / path.name, storage)
        stacks = [main_stack(read_series(f, with_pixels=False)) for f in (folder, copy)]
        rows, cols = stacks[1].slices[0].shape
        assert cols > 1.6 * rows  # really stored on another matrix
        found = [slice_locator.locate(stack) for stack in stacks]
        # each level's slice: the same, or a neighbour where the presence of two slices was nearly tied
        assert (np.abs(found[0].slice_index - found[1].slice_index) <= 1).all()
        same_slice += int((found[0].slice_index == found[1].slice_index).sum())
        for k0, k1, (x0, y0), (x1, y1) in zip(found[0].slice_index, found[1].slice_index, found[0].points, found[1].points):
            if k0 != k1:
                continue
            a = stacks[0].slices[k0].pixel_to_patient(x0, y0)
            b = stacks[1].slices[k1].pixel_to_patient(x1, y1)
            shifts.append(float(np.linalg.norm(a - b)))
    assert len(shifts) == same_slice >= 0.8 * 5 * len(series) and len(series) > 0
    # The 64-pixel input is about 4 mm a pixel: resampling alone moves a point by about 1.5 mm
    # (median). Squashing each slice into the square instead moved them by about 4 mm.
    assert np.median(shifts) < 2.5, shifts


def test_restored_files_keep_the_anatomy_in_patient_space(tmp_path):
    from dicom_factory import write_mr

    from spinegrade.data.dicom import read_slice

    pixels = np.full((40, 30), 100, np.uint16)
    pixels[25, 7] = 3000  # one bright pixel: where it is in patient space must not change
    original = read_slice(write_mr(tmp_path / "a.dcm", pixels, instance=1, position=(3.0, -20.0, 40.0)))
    bright = original.pixel_to_patient(7, 25)
    for storage in (Storage(pad_columns=(0.25, 0.1)), Storage(row_scale=0.5), Storage(monochrome1=True, rescale=(0.5, 1024.0)),
                    Storage(bits=8), Storage(pad_columns=(0.2, 0.2), row_scale=2.0, monochrome1=True),
                    *(Storage(in_plane=how) for how in IN_PLANE), Storage(in_plane="turned", row_scale=0.5)):
        s = read_slice(restore(original.path, tmp_path / "b.dcm", storage))
        row, col = np.unravel_index(np.argmax(s.pixels), s.pixels.shape)
        moved = np.linalg.norm(s.pixel_to_patient(col, row) - bright)
        assert moved <= max(s.pixel_spacing) / 2 + 1e-6, (storage, moved)
        if storage.in_plane in ("turned", "transposed"):
            assert s.shape[1] == round(40 * storage.row_scale)  # really stored another way round
        elif storage.row_scale == 1.0:
            assert s.shape[0] == 40 and (s.pixels == s.pixels.max()).sum() == 1  # still one bright pixel
        if storage.rescale is not None:
            assert pydicom.dcmread(tmp_path / "b.dcm").pixel_array.min() < 0  # really signed values on disk
    # A file that is itself MONOCHROME1 with a rescale is read for what it means before it is stored again.
    odd = read_slice(write_mr(tmp_path / "c.dcm", pixels.max() - pixels, instance=1, position=(3.0, -20.0, 40.0),
                              monochrome1=True, rescale=(2.0, 5.0)))
    again = read_slice(restore(odd.path, tmp_path / "d.dcm", Storage()))
    np.testing.assert_allclose(again.pixels, odd.pixels)
    assert np.unravel_index(np.argmax(again.pixels), again.shape) == (25, 7)


def test_one_slice_with_a_wrong_pixel_spacing_does_not_set_the_field(dataset_copy, logged):
    """The field is a high percentile of the slices' sizes, not the largest: a slice whose PixelSpacing
    claims 5 mm pixels would otherwise shrink every other slice's anatomy to a fifth."""
    from spinegrade.slice_locator_training import prepare_slice_data, slice_targets

    targets = slice_targets(dataset_copy, "spinal")
    odd = targets.iloc[0]
    for path in Path(odd["series_dir"]).iterdir():
        ds = pydicom.dcmread(path)
        ds.PixelSpacing = [5 * float(v) for v in ds.PixelSpacing]
        ds.save_as(path)
    data = prepare_slice_data(targets, 64)
    lines = logged()
    meta = data.meta
    sides = np.maximum(meta["rows"] * meta["row_spacing"], meta["cols"] * meta["col_spacing"])
    normal = sides[meta["study_id"] != odd["study_id"]]
    assert normal.max() * 0.9 <= data.field_mm <= normal.max()
    assert any(f"study {odd['study_id']}" in line and "outside the locator's" in line for line in lines), lines
    kept = (meta["study_id"] != odd["study_id"]).to_numpy()[:, None] & (data.presence == 1)
    assert kept.sum() >= 5 * 15 and np.isfinite(data.points[kept]).all()  # nothing else cut


def test_the_windows_percentiles_are_numpys_to_the_last_bit(monkeypatch):
    """Counted per grey level for integer pixels, numpy's partition otherwise: the same floats either way,
    so a window (and every uint8 image made with it) is what ``np.percentile`` gave."""
    rng = np.random.default_rng(0)
    for i in range(400):
        dtype = [np.uint16, np.int16, np.uint8, np.int32, np.float32][i % 5]  # float32: the pixels as read
        top = {np.uint8: 255, np.int16: 4000}.get(dtype, [7, 4095, 30000][i % 3])
        low = -top // 2 if dtype in (np.int16, np.int32, np.float32) and i % 8 < 4 else 0
        size = int(rng.integers(1, 5000))
        drawn = rng.integers(low, top + 1, size) if i % 3 else rng.gamma(2.0, top / 10, size).clip(low, top).round()
        values = drawn.astype(dtype)
        qs = (1.0, 99.5) if i % 2 else tuple(rng.uniform(0, 100, 3))
        expected = [float(v) for v in np.percentile(values, qs)]
        with monkeypatch.context() as m:  # counted, not numpy's own: whole numbers never reach np.percentile
            m.setattr(np, "percentile", lambda *a, **k: pytest.fail("np.percentile was called"))
            assert percentiles(values, qs) == expected, (dtype, size, qs)
    floats = rng.normal(size=(40, 40)).astype(np.float32)  # a fractional rescale: numpy itself
    assert percentiles(floats, (1.0, 99.5)) == [float(v) for v in np.percentile(floats, (1.0, 99.5))]
    floats[3, 4] = np.nan
    assert np.isnan(percentiles(floats, (1.0, 99.5))).all()


def test_a_hot_pixel_on_a_flat_slice_is_not_content():
    flat = np.zeros((512, 512), np.float32)
    flat[100, 200] = 4000.0
    assert content_box(flat) == (0, 512, 0, 512)
    view = SquareView.fitted(flat, (0.5, 0.5), 64)
    assert (view.width, view.height) == (64, 64)  # the whole slice, not a 1-pixel field blown up


def test_slice_locators_from_before_field_mm_still_see_the_squashed_slice():
    view = SquareView.squashed((300, 400), 64)
    u, v = np.array([0.0, 0.5, 1.0]), np.array([0.25, 0.5, 0.75])
    np.testing.assert_allclose(view.to_pixels(u, v), (u * 400 - 0.5, v * 300 - 0.5))  # the old mapping
