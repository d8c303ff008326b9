"""The level locator network: where are the five disc levels on a sagittal slice?

A timm backbone's last four feature maps (strides 4 to 32, through timm's uniform
``forward_intermediates``) are projected, brought to stride 4 and summed, and one heatmap per level
comes out. A soft-argmax turns each heatmap into a point, so the network is trained directly on
coordinates (normalised to [0, 1] of the input) and its output needs no peak-picking. The same
heatmap also says whether the slice shows the level at all: the softmax ignores the logits' overall
height, so their log-mean-exp is free to be trained as a presence score (``presence_logits``), high
on the level's own slice and low two slices away. Scored over neighbouring slices, it picks each
level's slice. Like the
grading model, it takes uint8 grey images and normalises them itself (``normalise_input``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from spinegrade.constants import LEVELS
from spinegrade.models.classifier import create_backbone, input_statistics, normalise_input


@dataclass
class SliceLocatorSpec:
    backbone: str = "efficientnet_lite0"
    channels: int = 64
    num_points: int = len(LEVELS)
    # Feature maps fused: the backbone's last four (strides 4 to 32), so heatmaps have a quarter of
    # the input's resolution.
    feature_levels: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


class SliceLocatorNet(nn.Module):
    def __init__(self, spec: SliceLocatorSpec):
        super().__init__()
        self.spec = spec
        self.backbone = create_backbone(spec.backbone)
        mean, std = input_statistics(self.backbone)
        # Not saved with the weights: they follow from the backbone's name.
        self.register_buffer("input_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.feature_levels = spec.feature_levels
        in_channels = [info["num_chs"] for info in self.backbone.feature_info][-self.feature_levels:]
        self.lateral = nn.ModuleList(nn.Conv2d(c, spec.channels, 1) for c in in_channels)
        self.head = nn.Sequential(
            nn.Conv2d(spec.channels, spec.channels, 3, padding=1), nn.GroupNorm(8, spec.channels), nn.GELU(),
            nn.Conv2d(spec.channels, spec.num_points, 1),
        )

    def heatmaps(self, image: torch.Tensor) -> torch.Tensor:
        """(B, points, H/4, W/4) logits; ``image`` uint8 grey (B, 1, H, W), or float already normalised."""
        image = normalise_input(image, self.input_mean, self.input_std)
        features = self.backbone.forward_intermediates(image, indices=self.feature_levels, intermediates_only=True)
        size = features[0].shape[-2:]
        fused = sum(F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
                    for conv, f in zip(self.lateral, features))
        return self.head(fused)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, points, 2): x, y in [0, 1] of the input image (0 = left/top edge, 1 = right/bottom edge)."""
        return soft_argmax(self.heatmaps(image))


def soft_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Expected (x, y) in [0, 1] under each heatmap's softmax."""
    b, k, h, w = logits.shape
    weights = torch.softmax(logits.flatten(2).float(), dim=2).view(b, k, h, w)
    xs = (torch.arange(w, device=logits.device, dtype=torch.float32) + 0.5) / w
    ys = (torch.arange(h, device=logits.device, dtype=torch.float32) + 0.5) / h
    x = (weights.sum(dim=2) * xs).sum(dim=2)
    y = (weights.sum(dim=3) * ys).sum(dim=2)
    return torch.stack([x, y], dim=2)


def presence_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, points): each heatmap's log-mean-exp, a logit of "this slice shows this point"."""
    b, k, h, w = logits.shape
    return torch.logsumexp(logits.flatten(2).float(), dim=2) - math.log(h * w)


def presence_loss(logits: torch.Tensor, present: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of :func:`presence_logits` against ``present`` (0 or 1) where ``known``."""
    loss = F.binary_cross_entropy_with_logits(presence_logits(logits), present.float(), reduction="none")
    mask = known.float()
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def heatmap_loss(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor, sigma_cells: float = 1.0) -> torch.Tensor:
    """Cross-entropy between each heatmap's softmax and a Gaussian around its labelled point.

    It gives the heatmaps a strong signal from the first step, where the soft-argmax's L1 alone
    starts from a flat map and learns slowly."""
    b, k, h, w = logits.shape
    xs = (torch.arange(w, device=logits.device, dtype=torch.float32) + 0.5) / w
    ys = (torch.arange(h, device=logits.device, dtype=torch.float32) + 0.5) / h
    dx = (xs.view(1, 1, 1, w) - target[..., 0].view(b, k, 1, 1)) * w
    dy = (ys.view(1, 1, h, 1) - target[..., 1].view(b, k, 1, 1)) * h
    gaussian = torch.exp(-(dx**2 + dy**2) / (2 * sigma_cells**2)).flatten(2)
    gaussian = gaussian / gaussian.sum(dim=2, keepdim=True).clamp_min(1e-12)
    ce = -(gaussian * torch.log_softmax(logits.flatten(2).float(), dim=2)).sum(dim=2)
    mask = known.float()
    return (ce * mask).sum() / mask.sum().clamp_min(1)
