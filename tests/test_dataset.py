"""Samples, augmentation and the left/right flip rule."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch

from spinegrade.constants import AXIAL_T2, SAGITTAL_T2
from spinegrade.data.dataset import LeanRotate, LevelDataset, build_transform, init_worker, mirrored_targets
from spinegrade.data.preprocess import PreprocessSettings, prepare_image

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(n=4, size=32):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, size, size), dtype=np.uint8)
    images[:, :, : size // 2] = 0  # left half dark: a flip is visible
    return images


def test_augmentation_in_training_only_and_backbone_normalisation():
    import torch

    from spinegrade.models.classifier import LevelClassifier, ModelSpec

    images = _images()
    plain = LevelDataset(images, [0, 1, 2, 3], [0, 0, 1, 2], build_transform(train=False))
    a, b = plain[1]["image"], plain[1]["image"]
    assert a.shape == (1, 32, 32) and a.dtype == torch.uint8 and np.array_equal(a.numpy(), b.numpy())
    assert np.array_equal(a[0].numpy(), images[1])  # no augmentation outside training
    # The model normalises the grey uint8 batch with its backbone's statistics (ImageNet's for resnet18).
    model = LevelClassifier(ModelSpec("resnet18", level_embeddings=8))
    x = model.normalise(a[None]).numpy()[0]
    assert x.shape == (3, 32, 32)
    np.testing.assert_allclose(x[0], (images[1].astype(np.float32) / 255.0 - MEAN[0]) / STD[0], atol=1e-5)
    np.testing.assert_allclose(x[2], (images[1] / 255.0 - MEAN[2]) / STD[2], atol=1e-5)
    augmented = LevelDataset(images, [0, 1, 2, 3], [0, 0, 1, 2], build_transform(train=True, seed=1))
    draws = [augmented[1]["image"].numpy() for _ in range(6)]
    assert any(not np.allclose(draws[0], d) for d in draws[1:])


def test_flip_swaps_left_right_label_on_whole_axial_images_only():
    # The index table holds every condition; a training run samples one condition only.
    labels = pd.DataFrame({
        "study_id": [1, 1, 1, 2],
        "condition": ["left_subarticular_stenosis", "right_subarticular_stenosis", "spinal_canal_stenosis",
                      "left_subarticular_stenosis"],
        "level": ["l4_l5"] * 4,
        "severity": [2, 0, 1, 1],
        "series_description": [AXIAL_T2, AXIAL_T2, SAGITTAL_T2, AXIAL_T2],
    })
    left_only = labels[labels["condition"] == "left_subarticular_stenosis"].reset_index(drop=True)
    # Study 1's right side is graded 0; study 2 has no right-side grade: flipping it is not allowed.
    assert mirrored_targets(left_only, labels, "full").tolist() == [0, -1]
    assert mirrored_targets(left_only, labels, "crop").tolist() == [2, 1]  # a crop stays on its side
    spinal = labels[labels["condition"] == "spinal_canal_stenosis"].reset_index(drop=True)
    assert mirrored_targets(spinal, labels, "full").tolist() == [1]

    images = _images(2)
    targets, flipped = left_only["severity"].to_numpy(), mirrored_targets(left_only, labels, "full")
    always_flip = build_transform(train=True, flip_probability=1.0, rotation_degrees=0, seed=0)
    never_flip = build_transform(train=True, flip_probability=0.0, rotation_degrees=0, seed=0)
    flipping = LevelDataset(images, [3, 3], targets, always_flip, flipped_targets=flipped)
    keeping = LevelDataset(images, [3, 3], targets, never_flip, flipped_targets=flipped)
    assert [int(flipping[i]["target"]) for i in range(2)] == [0, 1]
    assert [int(keeping[i]["target"]) for i in range(2)] == [2, 1]
    # The first image really is mirrored (its dark half moved right); the second, unflippable, is not.
    assert flipping[0]["image"][0, :, -4:].float().mean() < flipping[0]["image"][0, :, :4].float().mean()
    assert flipping[1]["image"][0, :, :4].float().mean() < flipping[1]["image"][0, :, -4:].float().mean()


def test_crop_keeps_physical_scale_and_centres_the_point():
    pixels = np.zeros((200, 300), dtype=np.float32)
    pixels[100, 150] = 1000.0  # one bright pixel at x=150, y=100
    pixels[100, 160] = 1000.0  # another 10 columns right: 5 mm at 0.5 mm between columns
    pixels[110, 150] = 1000.0  # another 10 rows down: 8 mm at 0.8 mm between rows
    settings = PreprocessSettings("spinal", "crop", image_size=41, crop_mm=41.0)
    out = prepare_image(pixels, (0.8, 0.5), 150.0, 100.0, settings)  # (row spacing, column spacing)
    # 1 mm per output pixel: the point at the centre (20, 20), the others 5 pixels right and 8 down.
    assert out[20, 20] > 30 and out[20, 25] > 30 and out[28, 20] > 30
    assert out[20, 28] < 30 and out[25, 20] < 30
    full = prepare_image(pixels, (0.5, 0.5), 150.0, 100.0, PreprocessSettings("spinal", "full", 64, 48.0))
    assert full.shape == (64, 64) and full.dtype == np.uint8


def test_jitter_moves_the_point_and_the_slice_in_training_only():
    from spinegrade.data.dataset import Jitter

    canvases = np.zeros((1, 3, 40, 40), dtype=np.uint8)
    canvases[0, 1, 20, 20] = 255  # the point, on the centre slice
    canvases[0, 0] = 100  # neighbours are uniformly grey
    canvases[0, 2] = 100
    plain = LevelDataset(canvases, [0], [0], build_transform(train=False), image_size=32)
    view = plain._view(0)
    assert view.shape == (32, 32, 1) and view[16, 16, 0] == 255 and view.sum() == 255
    jittered = LevelDataset(canvases, [0], [0], build_transform(train=False), image_size=32,
                            jitter=Jitter(point_sd=2.0, slice_probability=0.5))
    positions, neighbours = set(), 0
    for seed in range(40):
        jittered.set_seed(seed)
        v = jittered._view(0)
        if v.max() == 100:
            neighbours += 1
        else:
            positions.add(tuple(np.argwhere(v[..., 0] == 255)[0]))
    assert 8 <= neighbours <= 32 and len(positions) > 3
    assert all(12 <= r <= 20 and 12 <= c <= 20 for r, c in positions)  # never beyond the 4-pixel margin


def test_lean_rotate_gives_albumentations_rotate_pixels_points_and_boxes():
    """The cheaper rotation must be the same augmentation: same draws, same output to the pixel."""
    rng = np.random.default_rng(1)
    for shape in [(224, 224), (97, 131), (64, 80, 1), (64, 80, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        for seed in range(25):
            outputs = []
            for rotate in (A.Rotate, LeanRotate):
                pipeline = A.Compose([rotate(limit=30, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)],
                                     keypoint_params=A.KeypointParams(format="xy"),
                                     bbox_params=A.BboxParams(format="pascal_voc", label_fields=[]), seed=seed)
                outputs.append(pipeline(image=image, mask=image, keypoints=np.array([[10.0, 20.0], [40.0, 50.0]]),
                                        bboxes=np.array([[10, 10, 50, 40]])))
            ours, theirs = outputs[1], outputs[0]
            assert ours["image"].shape == theirs["image"].shape == image.shape
            assert np.array_equal(ours["image"], theirs["image"]), (shape, seed)
            assert np.array_equal(ours["mask"], theirs["mask"])
            assert np.allclose(ours["keypoints"], theirs["keypoints"]) and np.allclose(ours["bboxes"], theirs["bboxes"])
            assert not np.array_equal(ours["image"], image)  # it did rotate


def test_dataloader_workers_run_opencv_sequentially():
    dataset = LevelDataset(np.zeros((4, 1, 32, 32), np.uint8), np.zeros(4), np.zeros(4), build_transform(True))
    loader = torch.utils.data.DataLoader(_ThreadCount(dataset), batch_size=2, num_workers=1, worker_init_fn=init_worker)
    assert {int(n) for batch in loader for n in batch} == {1}  # cv2 reports 1 when threading is off


class _ThreadCount(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.dataset[i]
        return cv2.getNumThreads()
