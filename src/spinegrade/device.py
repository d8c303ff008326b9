"""Where models run and in what precision: one place for training and inference alike, and nothing
else, so that prediction (and the Kaggle kernel) needs no training module to pick its device."""

from __future__ import annotations

import torch


def select_device(requested: str | None = None, local_rank: int | None = None) -> torch.device:
    """The requested device, else a GPU when there is one; ``local_rank``: this process's GPU under
    data-parallel training (``distributed.World.local_rank`` when it is enabled)."""
    device = torch.device(requested) if requested else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return device


def autocast(device: torch.device):
    """bf16 autocast on a GPU (the method's mixed precision), nothing on a CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
