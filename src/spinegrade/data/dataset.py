"""Samples as dicts (image, level, target, index) from the preprocessing cache; albumentations pipelines.

An image is the labelled slice alone, or with its neighbours as channels (``slices``: 3 or 5, in the
anatomical order the cache keeps, ``preprocess.neighbour_indices``): augmentation treats such a stack
as one image, the same flip and rotation for every channel, and a locator's slice error moves the
whole stack by one slice.
Augmentation runs on training samples only: horizontal flip and rotation of the uint8 grey image;
the model normalises whole batches with its backbone's mean and std. A horizontal flip of an *axial* image exchanges the
patient's left and right, so a sample carrying a left/right label takes the other side's label
when flipped (the rule lives in :func:`spinegrade.constants.flipped_condition`); flipping a
sagittal image only swaps anterior and posterior, and its label stays.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from spinegrade.constants import CONDITION_GROUP, flip_keeps_grade, flipped_condition


class LeanRotate(A.Rotate):
    """``A.Rotate`` with its matrices built in plain arithmetic and the image warped by one OpenCV call.

    Same random draw, same matrices (to rounding), same pixels, same handling of masks, boxes and
    key points (inherited). ``A.Rotate`` builds each matrix from six numpy 3x3 products and checks it
    against the identity with ``np.allclose``: about 170 us per sample on a 224-pixel image, close to the
    cost of the warp itself and more than the rest of the sample. ``crop_border`` and images of more
    than 4 channels take the inherited path."""

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        if self.crop_border:
            return super().get_params_dependent_on_data(params, data)
        angle = self.py_random.uniform(*self.limit)
        height, width = params["shape"][:2]
        return {"x_min": -1, "x_max": -1, "y_min": -1, "y_max": -1,
                "matrix": rotation_matrix(angle, width / 2 - 0.5, height / 2 - 0.5),
                "bbox_matrix": rotation_matrix(angle, width / 2, height / 2)}

    def apply(self, img: np.ndarray, matrix: np.ndarray, x_min: int, x_max: int, y_min: int, y_max: int,
              **params) -> np.ndarray:
        if matrix[0, 0] == 1.0 and matrix[0, 1] == 0.0:  # no rotation: the image as it is, as A.Rotate does
            return img
        channels = 1 if img.ndim == 2 else img.shape[-1]
        if self.crop_border or channels > 4 or not np.isscalar(self.fill):
            return super().apply(img, matrix, x_min, x_max, y_min, y_max, **params)
        height, width = params["shape"][:2]
        out = cv2.warpAffine(img, matrix[:2], (width, height), flags=self.interpolation,
                             borderMode=self.border_mode, borderValue=(self.fill,) * 4)
        return out[..., None] if img.ndim == 3 and out.ndim == 2 else out


def rotation_matrix(degrees: float, centre_x: float, centre_y: float) -> np.ndarray:
    """The 3x3 matrix of albumentations' rotation by ``degrees`` about (centre_x, centre_y)."""
    radians = math.radians(degrees % 360)
    c, s = math.cos(radians), math.sin(radians)
    return np.array([[c, s, centre_x - c * centre_x - s * centre_y],
                     [-s, c, centre_y + s * centre_x - c * centre_y],
                     [0.0, 0.0, 1.0]])


def build_transform(train: bool, flip_probability: float = 0.5, rotation_degrees: float = 15.0,
                    seed: int | None = None) -> A.Compose:
    """Flip and rotation on the grey uint8 image (training only). Normalisation is the model's
    (:meth:`LevelClassifier.normalise`): per sample it would triple the pixels and quadruple the bytes."""
    steps = []
    if train:
        steps += [
            A.HorizontalFlip(p=flip_probability),
            LeanRotate(limit=rotation_degrees, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0),
        ]
    return A.Compose(steps, seed=seed, save_applied_params=True)


def flip_applied(result: dict) -> bool:
    return any(name == "HorizontalFlip" for name, _ in result.get("applied_transforms", []))


@dataclass(frozen=True)
class Jitter:
    """Location errors simulated in training: the point moves by a Gaussian of ``point_sd``
    output pixels (clipped to the cached margin) and, with ``slice_probability``, the image comes
    from a neighbouring slice."""

    point_sd: float = 0.0
    slice_probability: float = 0.0


class LevelDataset(Dataset):
    """One sample per cached image.

    ``targets`` is the grade of each sample; ``flipped_targets`` the grade to use when the image is
    flipped (see :func:`mirrored_targets`). Where that grade is unknown (-1) a drawn flip is undone
    after the other transforms, which leaves a plain (mirror-rotated) augmentation of the original.
    """

    def __init__(self, images: np.ndarray, levels: np.ndarray, targets: np.ndarray, transform: A.Compose,
                 indices: np.ndarray | None = None, flipped_targets: np.ndarray | None = None,
                 image_size: int | None = None, jitter: Jitter = Jitter(), slices: int = 1):
        # images: (N, H, W), or (N, cached slices, C, C) canvases from the cache (centre slice in the middle).
        self.images = images if images.ndim == 4 else images[:, None]
        self.image_size = image_size or self.images.shape[-1]
        self.slices = slices
        if slices % 2 != 1 or slices > self.images.shape[1]:
            raise ValueError(f"{slices} slices as channels: an odd number, at most the {self.images.shape[1]} cached")
        self.jitter = jitter
        self.rng = np.random.default_rng(0)
        self.levels = np.asarray(levels, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.flipped_targets = self.targets if flipped_targets is None else np.asarray(flipped_targets, dtype=np.int64)
        self.indices = np.arange(len(self.targets)) if indices is None else np.asarray(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def set_seed(self, seed: int) -> None:
        """Seed this sample's draws: jitter and the transforms share one generator (seeding each
        transform separately costs more than the flip it seeds)."""
        self.rng = np.random.default_rng(seed)
        self.transform.set_random_state(self.rng, random.Random(seed))

    def _view(self, k: int) -> np.ndarray:
        """The model-sized image of sample ``k`` (H, W, slices): the centre slices and centre crop, or
        jittered ones (the whole stack moved by one slice, the point by a few pixels)."""
        cached, canvas = self.images.shape[1], self.images.shape[-1]
        centre = cached // 2
        if cached > self.slices and self.jitter.slice_probability > 0 and self.rng.random() < self.jitter.slice_probability:
            centre += int(self.rng.choice([-1, 1]))
        margin = (canvas - self.image_size) // 2
        dx = dy = 0
        if margin > 0 and self.jitter.point_sd > 0:
            dx, dy = np.clip(np.round(self.rng.normal(0, self.jitter.point_sd, 2)), -margin, margin).astype(int)
        top, left = margin + dy, margin + dx
        half = self.slices // 2
        stack = self.images[k, centre - half:centre + half + 1, top: top + self.image_size, left: left + self.image_size]
        return np.ascontiguousarray(np.moveaxis(np.asarray(stack), 0, -1))

    def __getitem__(self, i: int) -> dict:
        """``image``: uint8 (slices, H, W), grey; the model normalises it."""
        k = int(self.indices[i])
        result = self.transform(image=self._view(k))
        image, target = result["image"], self.targets[k]
        if image.ndim == 2:  # albumentations may hand a one-channel image back without its channel axis
            image = image[:, :, None]
        if flip_applied(result):
            if self.flipped_targets[k] >= 0:
                target = self.flipped_targets[k]
            else:
                image = image[:, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))
        return {"image": image, "level": torch.tensor(self.levels[k]), "target": torch.tensor(target),
                "index": torch.tensor(k)}


def mirrored_targets(samples: pd.DataFrame, labels: pd.DataFrame, input_mode: str) -> np.ndarray:
    """Grade each sample must carry if its image is flipped horizontally; -1 where it is unknown.

    Only a whole axial slice (``input_mode == "full"``) changes side when flipped: its label becomes
    the mirrored condition's grade, looked up in ``labels`` (the full index table, every condition).
    A crop centred on one side's point still shows that side's anatomy, and a sagittal flip swaps
    front and back only: those keep their grade.
    """
    own = samples["severity"].to_numpy().astype(np.int64)
    swaps = np.array([not flip_keeps_grade(CONDITION_GROUP[c], input_mode) for c in samples["condition"]], dtype=bool)
    if not swaps.any():
        return own
    grade = {(s, c, lv): g for s, c, lv, g in labels[["study_id", "condition", "level", "severity"]].itertuples(index=False)}
    out = own.copy()
    for i in np.flatnonzero(swaps):
        r = samples.iloc[i]
        out[i] = grade.get((r.study_id, flipped_condition(r.condition), r.level), -1)
    return out


def init_worker(worker_id: int) -> None:
    """DataLoader workers run OpenCV on one thread each. The workers already share out the cores;
    OpenCV's own pool inside each of them would put several threads on every core, and the process
    that drives the GPU, which launches the model's kernels one by one, would wait for a core."""
    cv2.setNumThreads(0)  # 0: run sequentially (1 can deadlock in a forked worker with OpenCV 5)
