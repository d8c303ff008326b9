"""Samples as dicts (image, level, target, index) from the preprocessing cache; albumentations pipelines.

Augmentation runs on training samples only: horizontal flip and rotation, then normalisation
with the backbone's own mean and std. A horizontal flip of an *axial* image exchanges the
patient's left and right, so a sample carrying a left/right label takes the other side's label
when flipped (the rule lives in :func:`spinegrade.constants.flipped_condition`); flipping a
sagittal image only swaps anterior and posterior, and its label stays.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from spinegrade.constants import AXIAL_T2


def build_transform(mean, std, train: bool, flip_probability: float = 0.5, rotation_degrees: float = 15.0,
                    seed: int | None = None) -> A.Compose:
    steps = []
    if train:
        steps += [
            A.HorizontalFlip(p=flip_probability),
            A.Rotate(limit=rotation_degrees, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0),
        ]
    steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
    return A.Compose(steps, seed=seed, save_applied_params=True)


def flip_applied(result: dict) -> bool:
    return any(name == "HorizontalFlip" for name, _ in result.get("applied_transforms", []))


class LevelDataset(Dataset):
    """One sample per cached image.

    ``targets`` is the grade of each sample; ``flipped_targets`` the grade to use when the image is
    flipped (the mirrored side's grade for axial left/right samples, the same grade otherwise).
    """

    def __init__(self, images: np.ndarray, levels: np.ndarray, targets: np.ndarray, transform: A.Compose,
                 indices: np.ndarray | None = None, flipped_targets: np.ndarray | None = None):
        self.images = images
        self.levels = np.asarray(levels, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.flipped_targets = self.targets if flipped_targets is None else np.asarray(flipped_targets, dtype=np.int64)
        self.indices = np.arange(len(self.targets)) if indices is None else np.asarray(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        k = int(self.indices[i])
        grey = np.asarray(self.images[k])
        result = self.transform(image=np.repeat(grey[:, :, None], 3, axis=2))
        target = self.flipped_targets[k] if flip_applied(result) else self.targets[k]
        image = torch.from_numpy(np.ascontiguousarray(result["image"].transpose(2, 0, 1)))
        return {"image": image, "level": torch.tensor(self.levels[k]), "target": torch.tensor(target),
                "index": torch.tensor(k)}


def mirrored_targets(samples, targets: np.ndarray) -> np.ndarray:
    """Grade each sample would carry if its image were flipped horizontally.

    ``samples`` needs study_id, condition, level and series_description columns; the grade of the
    mirrored condition is looked up among the samples themselves (unknown: the sample's own grade).
    """
    from spinegrade.constants import flipped_condition

    lookup = {(s, c, lv): t for s, c, lv, t in zip(samples["study_id"], samples["condition"], samples["level"], targets)}
    out = []
    for (s, c, lv, d), t in zip(samples[["study_id", "condition", "level", "series_description"]].itertuples(index=False), targets):
        out.append(lookup.get((s, flipped_condition(c), lv), t) if d == AXIAL_T2 else t)
    return np.asarray(out, dtype=np.int64)


def seed_worker(worker_id: int) -> None:
    """Give every DataLoader worker its own augmentation stream, derived from the loader's seed."""
    info = torch.utils.data.get_worker_info()
    seed = int(info.seed % (2**31))
    np.random.seed(seed)
    dataset = info.dataset
    if hasattr(dataset, "transform"):
        dataset.transform.set_random_seed(seed)
