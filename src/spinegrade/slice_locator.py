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
  axial slice shows one level, so its heatmaps are the patient's sides, not the levels. The window: the
  slices around the one nearest the level's canal point, along the stack's own normal.

Every slice a locator reads is first turned to its plane's one orientation from its geometry
(``preprocess.canonical_turn``: on an axial slice the patient's left to the image's right, posterior
down), and its neighbours are its channels in one anatomical order (``preprocess.neighbour_indices``),
the same two rules the graders' crops follow: a heatmap means one side, and a channel one neighbour,
whichever way a series was stored (turned, transposed, mirrored, running either way).

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
from spinegrade.data.dicom import DicomReadError, Stack, load_pixels
from spinegrade.data.preprocess import (
    LOCATOR_INPUT_VERSION,
    SquareView,
    anatomical_position,
    canonical_turn,
    neighbour_indices,
    refuse_other_inputs,
    turn,
    turned_spacing,
    unturn_point,
)
from spinegrade.device import autocast, select_device
from spinegrade.errors import SpinegradeError
from spinegrade.models.classifier import load_state, weights_loaded_after
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


def locator_inputs(stack: Stack, indices: list[int], size: int, field_mm: float | None,
                   context: int = CONTEXT) -> tuple[np.ndarray, list[SquareView | None]]:
    """What a locator reads for each slice of ``indices``: (len, 2 * context + 1, size, size) uint8, the
    slice between its neighbours (``neighbour_indices``' order), each turned to its plane's one
    orientation (``canonical_turn``) and rendered in its square view of ``field_mm``; and each slice's
    view (None, and black channels, where it cannot be decoded: an undecodable neighbour is replaced
    by the slice itself). Only these slices are decoded."""
    rendered: dict[int, tuple[np.ndarray, SquareView] | None] = {}
    around = {k: neighbour_indices(stack, k, context) for k in indices}
    for k in sorted({j for js in around.values() for j in js}):
        s = stack.slices[k]
        how = canonical_turn(s)
        try:
            pixels = turn(load_pixels(s), *how)
        except DicomReadError:
            rendered[k] = None
            continue
        view = (SquareView.fitted(pixels, turned_spacing(s.pixel_spacing, how), size, field_mm)
                if field_mm else SquareView.squashed(pixels.shape, size))
        rendered[k] = (view.render(pixels), view)
    blank = np.zeros((size, size), np.uint8)
    images, views = [], []
    for k in indices:
        own = rendered[k]
        views.append(own[1] if own else None)
        channels = [rendered.get(j) or own for j in around[k]]
        images.append(np.stack([c[0] if c else blank for c in channels]))
    return np.ascontiguousarray(np.stack(images)), views


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
        self.models, self.size, fields, presence, slices = [], None, set(), set(), set()
        for folder in folders:
            spec = json.loads((folder / "localizer.json").read_text())
            refuse_other_inputs(spec, "locator_input_version", LOCATOR_INPUT_VERSION, folder)
            with weights_loaded_after():
                model = SliceLocatorNet(SliceLocatorSpec(spec["backbone"], spec.get("channels", 64),
                                                     num_points=spec.get("num_points", len(LEVELS)),
                                                     feature_levels=spec.get("feature_levels", 3)))
            load_state(model, folder / "best.safetensors")
            self.models.append(model.to(self.device).eval())
            self.size = int(spec["image_size"])
            fields.add(spec.get("field_mm"))  # absent: a locator that saw each slice squashed
            presence.add(bool(spec.get("presence", False)))  # absent: one slice per study, no presence
            slices.add(int(spec.get("slices", 1)))  # absent: the slice alone
        if len(fields) > 1:
            raise SpinegradeError(f"{root}: fold locators were trained on different fields ({sorted(map(str, fields))} mm); "
                                  "train the locator again")
        self.field_mm = fields.pop()
        self.presence = all(presence)
        if len(slices) > 1:
            raise SpinegradeError(f"{root}: fold locators read different numbers of slices; train the locator again")
        self.context = (slices.pop() - 1) // 2
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
        """The geometric choice: the middle slice moved by the most common labelled offset, counted the
        anatomical way (``anatomical_position``: a series stored the other way round gets the same slice)."""
        position = int(np.clip(middle_index(len(stack)) + self.offset, 0, len(stack) - 1))
        return anatomical_position(stack, position)  # its own inverse

    def score(self, stack: Stack, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """For each slice of ``indices``: the presence probability of each heatmap (len, P: the levels,
        or the sides on an axial slice) (NaN where the slice cannot be decoded, or the models have no
        presence head) and each heatmap's point (len, P, 2) in that slice's pixels as stored. Only these
        slices are decoded."""
        return self.score_many([(stack, indices)])[0]

    def score_many(self, requests: list[tuple[Stack, list[int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`score` for several (stack, indices) at once (a study's levels): one forward pass per
        fold model for all their slices, since a small locator's pass costs mostly its fixed overhead."""
        made = [locator_inputs(stack, indices, self.size, self.field_mm, self.context) for stack, indices in requests]
        if not made:
            return []
        tensor = torch.from_numpy(np.concatenate([images for images, _ in made]))  # uint8 (n, slices, S, S): the model normalises
        points, presence = [], []
        with torch.inference_mode(), autocast(self.device):
            for m in self.models:
                logits = m.heatmaps(tensor.to(self.device))
                points.append(soft_argmax(logits).float().cpu().numpy())
                presence.append(torch.sigmoid(presence_logits(logits).float()).cpu().numpy())
        units, probabilities = np.mean(points, axis=0), np.mean(presence, axis=0)
        out, start = [], 0
        for (stack, indices), (_, views) in zip(requests, made):
            unit, probability = units[start:start + len(indices)], probabilities[start:start + len(indices)].copy()
            start += len(indices)
            pixels = np.full(unit.shape, np.nan)
            for i, (k, view) in enumerate(zip(indices, views)):
                if view is not None:
                    x, y = unturn_point(*view.to_pixels(unit[i, :, 0], unit[i, :, 1]), canonical_turn(stack.slices[k]),
                                        stack.slices[k].shape)
                    pixels[i] = np.stack([x, y], axis=1)
            probability[[v is None for v in views]] = np.nan
            if not self.presence:
                probability[:] = np.nan
            out.append((probability, pixels))
        return out

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
