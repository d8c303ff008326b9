"""Find each level (or side) where this patient has it, from the images: the slice and the point.

One kind of model serves the sagittal groups: a :class:`~spinegrade.models.slice_locator_net.SliceLocatorNet`
reads one whole slice, with its two neighbours as the other input channels (so it can tell whether the
structure is fuller on a neighbour), and gives, per level, a heatmap (its soft-argmax is the point) and
a presence score (the heatmap's log-mean-exp: whether this slice is the level's own). Scored over a
window of neighbouring slices, the slice where a level's presence is highest is that level's slice.
So every level gets its own slice, and a spine that curves or leans, or a patient off the stack's
centre, moves the slices with it.

- spinal (``sagittal_levels``): the spinal canal on Sagittal T2/STIR. The window: the stack's middle
  slice moved by the training folds' most common offset, +- ``SEARCH_SLICES``.
- foraminal (``sagittal_foramina``): each foramen on Sagittal T1 (``foramina.py``): the slices of its
  own side (from geometry) around the point at the learned offset from the canal (``offsets.py``).
- subarticular (``axial_subarticular``): both lateral recesses on Axial T2 (``subarticular.py``). An
  axial slice shows one level, so its heatmaps are the patient's sides, not the levels: each slice is
  first turned to one orientation from its geometry (the patient's left to the image's right, posterior
  down), so a heatmap means one side whichever way the series was stored. The window: the slices
  around the one nearest the level's canal point, along the stack's own normal.

A level whose best presence is under the threshold chosen out of fold is *unsure*: it falls back on
the geometric choice (the middle slice; the offset), and its located row's ``source`` says so.

The models are trained by ``slice_locator_training.py``; this half only reads them, so prediction and
the Kaggle kernel import no training code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spinegrade.constants import GROUPS, LEVELS, CONDITION_SPECS
from spinegrade.data.dicom import DicomReadError, Slice, Stack, load_pixels
from spinegrade.data.preprocess import SquareView
from spinegrade.device import autocast, select_device
from spinegrade.errors import SpinegradeError
from spinegrade.models.classifier import load_state
from spinegrade.models.slice_locator_net import SliceLocatorNet, SliceLocatorSpec, presence_logits, soft_argmax

MARKER = "slice_choice.json"  # written last by a slice locator's training
SEARCH_SLICES = 3  # the spinal window: this many slices either side of the middle one
CONTEXT = 1  # neighbours on each side given as input channels: the slice and its two neighbours
AXIAL_LOCATORS = {"axial_subarticular"}  # slice locators whose heatmaps are sides on a turned slice


def reads_axial(group: str) -> bool:
    return GROUPS[group].locator in AXIAL_LOCATORS


def point_names(group: str) -> tuple[str, ...]:
    """What a group's slice locator finds on a slice, one heatmap each: the levels on a sagittal
    slice; on an axial slice (one level) the patient's sides, in the group's condition order."""
    if reads_axial(group):
        return tuple(CONDITION_SPECS[c].side for c in GROUPS[group].conditions)
    return tuple(LEVELS)


def canonical_flips(s: Slice) -> tuple[bool, bool]:
    """(flip columns, flip rows) that turn an axial slice to one orientation: the patient's left (+x)
    to the image's right, posterior (+y) down. From ImageOrientationPatient alone, so a series stored
    either way reaches the model the same way (and each side's heatmap keeps its side)."""
    return bool(s.row_direction[0] < 0), bool(s.column_direction[1] < 0)


def runs_backwards(stack: Stack) -> bool:
    """Whether the stack's slices, in its order (along its normal), run against the patient axis the
    normal is nearest (towards the patient's right, front or feet). The neighbours given as input
    channels are then read in reverse, so the channels run one anatomical way (left, back, head last)
    whichever way a series was stored: the same anatomy reaches the model as the same input."""
    normal = stack.normal
    return bool(normal[int(np.argmax(np.abs(normal)))] < 0)


def turned(pixels: np.ndarray, flips: tuple[bool, bool]) -> np.ndarray:
    """``pixels`` with :func:`canonical_flips`' flips applied."""
    if flips[0]:
        pixels = pixels[:, ::-1]
    if flips[1]:
        pixels = pixels[::-1, :]
    return np.ascontiguousarray(pixels)


def turn_point(x, y, flips: tuple[bool, bool], shape: tuple[int, int]):
    """A pixel point mapped through :func:`turned` (its own inverse: the same call maps it back)."""
    rows, cols = shape
    return (cols - 1 - x if flips[0] else x), (rows - 1 - y if flips[1] else y)


def middle_index(n: int) -> int:
    return (n - 1) // 2


@dataclass
class LocatedLevels:
    """Where each level is on a stack: its slice (index in the stack), (x, y) in that slice's pixels,
    its presence score, and whether the model was sure (else the geometric fallback placed it)."""

    slice_index: np.ndarray  # (5,) int, in LEVELS order
    points: np.ndarray  # (5, 2)
    score: np.ndarray  # (5,) presence probability of the chosen slice (NaN: no presence head)
    sure: np.ndarray  # (5,) bool


class SliceLocator:
    """Every fold's slice locator of a group, averaged: the same models whatever study comes."""

    def __init__(self, root: str | Path, device=None, folds: list[int] | None = None, choice: dict | None = None):
        """``root``: the locator's folder (``RunLayout.locator_dir``); ``folds`` restricts the ensemble
        to those fold models (for out-of-fold use); ``choice``: what ``slice_choice.json`` holds, when
        it is not written yet (the out-of-fold report that chooses the threshold)."""
        root = Path(root)
        found = sorted(p.parent for p in root.glob("fold*/best.safetensors"))
        folders = [f for f in found if folds is None or int(f.name.removeprefix("fold")) in folds]
        if not folders:
            raise SpinegradeError(f"{root}: no trained locator (run `spinegrade train-localizer` / `make train-localizer`)")
        self.device = select_device(device)
        self.models, self.size, fields, presence, slices, turned_ = [], None, set(), set(), set(), set()
        for folder in folders:
            spec = json.loads((folder / "localizer.json").read_text())
            model = SliceLocatorNet(SliceLocatorSpec(spec["backbone"], spec.get("channels", 64),
                                                 num_points=spec.get("num_points", len(LEVELS)),
                                                 feature_levels=spec.get("feature_levels", 3)))
            load_state(model, folder / "best.safetensors")
            self.models.append(model.to(self.device).eval())
            self.size = int(spec["image_size"])
            fields.add(spec.get("field_mm"))  # absent: a locator that saw each slice squashed
            presence.add(bool(spec.get("presence", False)))  # absent: one slice per study, no presence
            slices.add(int(spec.get("slices", 1)))  # absent: the slice alone
            turned_.add(bool(spec.get("turned", False)))  # absent: slices read as stored
        if len(fields) > 1:
            raise SpinegradeError(f"{root}: fold locators were trained on different fields ({sorted(map(str, fields))} mm); "
                                  "train the locator again")
        self.field_mm = fields.pop()
        self.presence = all(presence)
        if len(slices) > 1:
            raise SpinegradeError(f"{root}: fold locators read different numbers of slices; train the locator again")
        self.context = (slices.pop() - 1) // 2
        self.turned = all(turned_)
        if choice is None:
            marker = root / MARKER
            if not marker.is_file():
                raise SpinegradeError(f"{root}: the locator's training did not finish (no {MARKER})")
            choice = json.loads(marker.read_text())
        self.offset = choice.get("offset_from_middle", 0)
        if folds is not None and len(folds) == 1:  # out of fold: the offset those training folds gave
            self.offset = choice.get("offset_from_middle_per_fold", {}).get(str(folds[0]), self.offset)
        self.threshold = float(choice.get("threshold", 0.5))

    def choose_slice(self, stack: Stack) -> int:
        """The geometric choice: the middle slice moved by the most common labelled offset."""
        return int(np.clip(middle_index(len(stack)) + self.offset, 0, len(stack) - 1))

    def score(self, stack: Stack, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """For each slice of ``indices``: the presence probability of each heatmap (len, P: the levels,
        or the sides on an axial slice) (NaN where the slice cannot be decoded, or the models have no
        presence head) and each heatmap's point (len, P, 2) in that slice's pixels as stored. Only these
        slices are decoded."""
        rendered: dict[int, tuple[np.ndarray, SquareView] | None] = {}
        flips = {k: canonical_flips(s) if self.turned else (False, False) for k, s in enumerate(stack.slices)}
        for k in sorted({j for k in indices for j in range(k - self.context, k + self.context + 1)
                         if 0 <= j < len(stack)}):
            s = stack.slices[k]
            try:
                pixels = turned(load_pixels(s), flips[k])
            except DicomReadError:
                rendered[k] = None
                continue
            view = (SquareView.fitted(pixels, s.pixel_spacing, self.size, self.field_mm) if self.field_mm
                    else SquareView.squashed(pixels.shape, self.size))
            rendered[k] = (view.render(pixels), view)
        blank = np.zeros((self.size, self.size), np.uint8)
        backwards = runs_backwards(stack)
        images, views = [], []
        for k in indices:
            own = rendered[k]
            views.append(own[1] if own else None)
            around = range(k - self.context, k + self.context + 1)
            channels = [rendered.get(j) or own for j in (reversed(around) if backwards else around)]
            images.append(np.stack([c[0] if c else blank for c in channels]))
        good = [v is not None for v in views]
        tensor = torch.from_numpy(np.ascontiguousarray(np.stack(images)))  # uint8 (n, slices, S, S): the model normalises
        points, presence = [], []
        with torch.inference_mode(), autocast(self.device):
            for m in self.models:
                logits = m.heatmaps(tensor.to(self.device))
                points.append(soft_argmax(logits).float().cpu().numpy())
                presence.append(torch.sigmoid(presence_logits(logits).float()).cpu().numpy())
        unit, probability = np.mean(points, axis=0), np.mean(presence, axis=0)
        pixels = np.full(unit.shape, np.nan)
        for i, (k, view) in enumerate(zip(indices, views)):
            if view is not None:
                x, y = turn_point(*view.to_pixels(unit[i, :, 0], unit[i, :, 1]), flips[k], stack.slices[k].shape)
                pixels[i] = np.stack([x, y], axis=1)
        probability[~np.array(good)] = np.nan
        if not self.presence:
            probability[:] = np.nan
        return probability, pixels

    def locate(self, stack: Stack, threshold: float | None = None) -> LocatedLevels:
        """Each level's slice and point: the slice of the window around the geometric choice whose
        presence is highest, where it reaches ``threshold`` (default: the one chosen out of fold);
        else the geometric choice. Raises DicomReadError when the geometric slice cannot be decoded."""
        threshold = self.threshold if threshold is None else threshold
        start = self.choose_slice(stack)
        window = list(range(max(0, start - SEARCH_SLICES), min(len(stack), start + SEARCH_SLICES + 1)))
        if not self.presence:
            window = [start]
        probability, pixels = self.score(stack, window)
        at_start = window.index(start)
        if not np.isfinite(pixels[at_start]).all():
            raise DicomReadError(f"{stack.slices[start].path}: cannot decode its pixels")
        best = np.nan_to_num(probability, nan=-1.0).argmax(axis=0)
        score = probability[best, np.arange(len(LEVELS))]
        on_image = np.array([stack.slices[window[b]].shows(*pixels[b, k]) if np.isfinite(pixels[b, k]).all() else False
                             for k, b in enumerate(best)])
        sure = np.isfinite(score) & (score >= threshold) & on_image  # a point off the image: unsure
        chosen = np.where(sure, best, at_start)
        points = pixels[chosen, np.arange(len(LEVELS))]
        return LocatedLevels(np.array(window)[chosen], points, score, sure)
