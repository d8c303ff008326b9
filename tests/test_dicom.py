"""The DICOM layer on real files: geometry ordering, rescale, MONOCHROME1, compression, stacks, errors."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from dicom_factory import AXIAL, ramp, write_mr
from spinegrade.data.dicom import main_stack, read_series, read_slice
from spinegrade.errors import DicomReadError


def test_series_ordered_by_position_not_instance_or_name(tmp_path):
    # Instance numbers start at 5031 and run against the slice positions (right-to-left series).
    xs = [12.0, 8.0, 4.0, 0.0]
    for k, x in enumerate(xs):
        write_mr(tmp_path / f"{5031 + k}.dcm", ramp(offset=k), instance=5031 + k, position=(x, -50.0, 60.0))
    stack = main_stack(read_series(tmp_path))
    # Sagittal normal is -x, so ascending distance means descending x.
    assert [s.position[0] for s in stack.slices] == sorted(xs, reverse=True)
    assert [s.instance_number for s in stack.slices] == [5031, 5032, 5033, 5034]
    distances = [s.distance for s in stack.slices]
    assert distances == sorted(distances)


def test_reversed_positions_give_reversed_order(tmp_path):
    for k, x in enumerate([0.0, 4.0, 8.0]):
        write_mr(tmp_path / f"{k + 1}.dcm", ramp(), instance=k + 1, position=(x, 0.0, 0.0))
    stack = main_stack(read_series(tmp_path))
    assert [s.instance_number for s in stack.slices] == [3, 2, 1]


def test_two_axial_stacks_in_one_series_and_different_sizes(tmp_path):
    tilted = (1.0, 0.0, 0.0, 0.0, np.cos(0.2), np.sin(0.2))
    for k in range(3):
        write_mr(tmp_path / f"{k + 1}.dcm", ramp(24, 20), instance=k + 1, position=(0, 0, 10.0 * k), orientation=AXIAL,
                 description="Axial T2")
    for k in range(2):
        write_mr(tmp_path / f"{k + 4}.dcm", ramp(30, 28), instance=k + 4, position=(0, 0, 100 + 10.0 * k),
                 orientation=tilted, description="Axial T2")
    stacks = read_series(tmp_path)
    assert sorted(len(s) for s in stacks) == [2, 3]
    shapes = {s.pixels.shape for st in stacks for s in st.slices}
    assert shapes == {(24, 20), (30, 28)}


def test_rescale_and_monochrome1(tmp_path):
    raw = ramp()
    plain = read_slice(write_mr(tmp_path / "a.dcm", raw, instance=1))
    scaled = read_slice(write_mr(tmp_path / "b.dcm", raw, instance=1, rescale=(2.0, -100.0)))
    inverted = read_slice(write_mr(tmp_path / "c.dcm", raw, instance=1, monochrome1=True))
    np.testing.assert_allclose(plain.pixels, raw)
    np.testing.assert_allclose(scaled.pixels, raw * 2.0 - 100.0)
    # MONOCHROME1: high values are dark, so the brightest pixel becomes the darkest.
    assert inverted.pixels.argmax() == raw.argmin() and inverted.pixels.argmin() == raw.argmax()


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_files_we_write_decode_losslessly(tmp_path, syntax):
    raw = (ramp(32, 32) * 7) % 4000
    s = read_slice(write_mr(tmp_path / "x.dcm", raw, instance=1, compress=syntax))
    np.testing.assert_array_equal(s.pixels, raw)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_pydicom_reference_files_decode_like_the_uncompressed_one(name):
    reference = read_slice(get_testdata_file("MR_small.dcm"))
    compressed = read_slice(get_testdata_file(name))
    np.testing.assert_array_equal(compressed.pixels, reference.pixels)
    assert compressed.pixel_spacing == reference.pixel_spacing


def test_jpeg_baseline_colour_file_reads_one_plane():
    s = read_slice(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    assert s.pixels.ndim == 2 and s.pixels.shape == s.shape


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "series" / "7.dcm"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a dicom file" * 10)
    with pytest.raises(DicomReadError, match="7.dcm"):
        read_slice(bad)
    with pytest.raises(DicomReadError, match="MR_truncated.dcm"):
        read_slice(get_testdata_file("MR_truncated.dcm"))
    # A series with one bad file: raises by default, or collects it and keeps the rest.
    write_mr(tmp_path / "series" / "1.dcm", ramp(), instance=1)
    with pytest.raises(DicomReadError):
        read_series(tmp_path / "series")
    errors = []
    stacks = read_series(tmp_path / "series", errors=errors)
    assert len(errors) == 1 and errors[0].path == bad
    assert len(main_stack(stacks)) == 1


def test_pixel_to_patient_round_trip(tmp_path):
    s = read_slice(write_mr(tmp_path / "a.dcm", ramp(), instance=1, position=(3.0, -40.0, 80.0), spacing=(0.7, 0.9)))
    point = s.pixel_to_patient(5.5, 11.0)
    x, y, d = s.patient_to_pixel(point)
    assert (round(x, 6), round(y, 6), round(d, 6)) == (5.5, 11.0, 0.0)
    np.testing.assert_allclose(point, [3.0, -40.0 + 5.5 * 0.9, 80.0 - 11.0 * 0.7])


def test_malformed_header_is_a_named_read_error(tmp_path):
    path = write_mr(tmp_path / "9.dcm", ramp(), instance=1)
    raw = path.read_bytes()
    # InstanceNumber (0020,0013), VR IS, length 2, value "1 ": make it a word no scanner should write.
    tag = bytes.fromhex("20001300") + b"IS" + (2).to_bytes(2, "little")
    assert raw.count(tag + b"1 ") == 1
    path.write_bytes(raw.replace(tag + b"1 ", tag + b"x1"))
    with pytest.raises(DicomReadError, match="9.dcm.*InstanceNumber"):
        read_slice(path)


def test_an_enhanced_mr_file_gives_every_frame_its_own_geometry_rescale_and_contrast(tmp_path, monkeypatch):
    """A true Enhanced MR file whose frames are stored against their anatomical order, the spacing
    shared and overridden by two frames' own groups, a rescale and TE per frame: each frame comes back
    a slice of its own, ordered by geometry, and the file is decoded once for all of them."""
    import spinegrade.data.dicom as dicom
    from dicom_factory import write_enhanced_mr

    frames = [ramp(24, 20, offset=100 * k) for k in range(4)]
    xs = [4.0, 12.0, 0.0, 8.0]
    write_enhanced_mr(tmp_path / "series" / "1.dcm", frames, [(x, -50.0, 60.0) for x in xs],
                      spacing=(0.8, 0.8), frame_spacing={1: (0.5, 0.6)}, slopes=[1.0, 2.0, 0.5, 1.5],
                      echo_times=[90.0, 91.0, 92.0, 93.0])
    opened = []
    real_open = dicom._open
    monkeypatch.setattr(dicom, "_open", lambda path, with_pixels: opened.append(with_pixels) or real_open(path, with_pixels))
    dicom._DECODED.clear()
    stack = main_stack(read_series(tmp_path / "series", with_pixels=False))
    assert len(stack) == 4 and all(s.has_geometry for s in stack.slices)
    assert [s.position[0] for s in stack.slices] == [12.0, 8.0, 4.0, 0.0]  # the sagittal normal is -x
    assert [s.frame for s in stack.slices] == [2, 4, 1, 3]
    by_frame = {s.frame: s for s in stack.slices}
    assert by_frame[2].pixel_spacing == (0.5, 0.6) and by_frame[1].pixel_spacing == (0.8, 0.8)  # the frame's own wins
    assert by_frame[3].echo_time == 92.0 and by_frame[3].repetition_time == 600.0
    for s in stack.slices:
        np.testing.assert_allclose(dicom.load_pixels(s), frames[s.frame - 1] * [1.0, 2.0, 0.5, 1.5][s.frame - 1] - 10.0)
    assert opened == [False, True]  # the headers once, the pixels once for all four frames
    assert stack.index_of_instance(1, frame=4) == 1 and stack.index_of_instance(1) is None


def test_a_legacy_converted_series_reads_as_its_single_frame_files(synth_dataset, tmp_path):
    """Each series of a synthetic study (its axial one holds tilted blocks) converted to one Legacy
    Converted Enhanced MR file, as PACS exports make them: the same stacks, geometry and pixels."""
    from spinegrade.data.multiframe import to_multiframe

    study = next(study for study in sorted((synth_dataset / "train_images").iterdir())
                 if any(len(read_series(series, with_pixels=False)) > 1 for series in study.iterdir()))
    tilted = 0
    for series in sorted(study.iterdir()):
        single = read_series(series)
        to_multiframe(series, tmp_path / series.name)
        multi = read_series(tmp_path / series.name)
        assert len(list((tmp_path / series.name).iterdir())) == 1
        assert [len(st) for st in single] == [len(st) for st in multi]
        tilted += len(single) > 1
        for a_stack, b_stack in zip(single, multi):
            for a, b in zip(a_stack.slices, b_stack.slices):
                np.testing.assert_allclose(b.position, a.position, atol=1e-4)
                np.testing.assert_allclose(b.orientation, a.orientation, atol=1e-6)
                assert b.pixel_spacing == a.pixel_spacing and b.frame > 0 and a.frame == 0
                assert (b.repetition_time, b.echo_time) == (a.repetition_time, a.echo_time)
                np.testing.assert_array_equal(b.pixels, a.pixels)
    assert tilted, "the study's axial series should hold blocks at different angles"


@pytest.mark.parametrize("syntax, bits, error", [
    ("1.2.840.10008.1.2.1.99", 16, 0),  # deflated explicit VR
    ("1.2.840.10008.1.2.4.80", 16, 0),  # JPEG-LS lossless
    ("1.2.840.10008.1.2.4.70", 16, 0),  # JPEG lossless, process 14, selection value 1
    ("1.2.840.10008.1.2.4.57", 16, 0),  # JPEG lossless, process 14
    ("1.2.840.10008.1.2.4.51", 16, 0.02),  # JPEG extended, 12 bits, quality 90
    ("1.2.840.10008.1.2.4.50", 8, 0.02),  # JPEG baseline, 8 bits, quality 90
    ("1.2.840.10008.1.2.4.91", 16, 0.02),  # JPEG 2000, ratio 10
])
def test_every_transfer_syntax_written_reads_back(tmp_path, syntax, bits, error):
    """Each syntax ``restore.encode`` writes is read: the lossless ones to the pixel, the lossy ones within
    2 % of the range (median error)."""
    import pydicom

    from spinegrade.data.restore import Storage, restore

    rows, cols = np.mgrid[0:48, 0:40]
    raw = (1500 + 1000 * np.sin(rows / 5.0) * np.cos(cols / 7.0)).astype(np.uint16)  # smooth, as anatomy is
    original = write_mr(tmp_path / "a.dcm", raw, instance=1)
    written = restore(original, tmp_path / "b.dcm", Storage(bits=bits, syntax=syntax))
    assert pydicom.dcmread(written).file_meta.TransferSyntaxUID == syntax
    got, want = read_slice(written).pixels, read_slice(original).pixels
    if bits == 8:  # stored on 0..255 over the range: compare on that scale
        want = (want - want.min()) * (255.0 / np.ptp(want))
    span = np.ptp(want)
    if error == 0:
        np.testing.assert_allclose(got, want, atol=1e-3)
    else:
        assert np.median(np.abs(got - want)) <= error * span and not np.array_equal(got, want)
