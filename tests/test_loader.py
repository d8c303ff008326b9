"""The ring of shared slots must deliver exactly the batches PyTorch's DataLoader delivers."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from spinegrade.data import loader as ring_loader
from spinegrade.data.dataset import LevelDataset, build_transform, init_worker
from spinegrade.data.loader import batch_loader
from spinegrade.errors import SpinegradeError
from spinegrade.train import EpochSampler, SeededDataset

N, CANVAS, SIZE = 70, 40, 32


def _dataset() -> SeededDataset:
    images = np.random.default_rng(0).integers(0, 256, (N, 3, CANVAS, CANVAS), dtype=np.uint8)
    return SeededDataset(LevelDataset(images, np.arange(N) % 5, np.arange(N) % 3, build_transform(True),
                                      image_size=SIZE), seed=7)


def _epochs(loader, sampler: EpochSampler, epochs: int) -> list[dict]:
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches += list(loader)  # kept as handed out: no copy of our own
    return batches


@pytest.mark.parametrize("drop_last", [False, True])
def test_ring_batches_equal_dataloader_batches_over_epochs(drop_last):
    dataset = _dataset()
    theirs_sampler, ours_sampler = EpochSampler(N, 7, shuffle=True), EpochSampler(N, 7, shuffle=True)
    theirs = DataLoader(dataset, batch_size=8, sampler=theirs_sampler, drop_last=drop_last, num_workers=2,
                        persistent_workers=True, worker_init_fn=init_worker)
    ours = batch_loader(dataset, 8, ours_sampler, image_shape=(1, SIZE, SIZE), workers=2, pin_memory=False,
                        drop_last=drop_last)
    assert len(ours) == len(theirs) == (8 if drop_last else 9)
    expected, got = _epochs(theirs, theirs_sampler, 3), _epochs(ours, ours_sampler, 3)
    # 27 batches through a ring of 2 * 2 + 1 slots: every slot was refilled several times while the
    # batches taken earlier were still held, and they must not have changed.
    assert len(got) == len(expected) == 3 * len(theirs)
    for mine, reference in zip(got, expected):
        assert mine.keys() == reference.keys()
        for key in reference:
            assert mine[key].dtype == reference[key].dtype and mine[key].is_contiguous()
            assert torch.equal(mine[key], reference[key]), key
    assert len({int(b["image"].float().sum()) for b in got}) > 20  # real, varied images


def test_without_workers_it_is_a_plain_dataloader():
    loader = batch_loader(_dataset(), 8, list(range(N)), image_shape=(1, SIZE, SIZE), workers=0, pin_memory=False)
    assert isinstance(loader, DataLoader)
    assert [len(b["target"]) for b in loader] == [8] * 8 + [6]


def test_a_ring_is_freed_with_its_loader():
    loader = batch_loader(_dataset(), 8, list(range(16)), image_shape=(1, SIZE, SIZE), workers=1, pin_memory=False)
    key = loader.ring.key
    assert [len(b["target"]) for b in loader] == [8, 8]
    assert key in ring_loader._RINGS
    del loader
    gc.collect()
    assert key not in ring_loader._RINGS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_pinned_batches_are_pinned_and_equal():
    dataset, sampler = _dataset(), list(range(N))
    theirs = DataLoader(dataset, batch_size=8, sampler=sampler)
    ours = batch_loader(dataset, 8, sampler, image_shape=(1, SIZE, SIZE), workers=2, pin_memory=True)
    for mine, reference in zip(ours, theirs):
        assert all(t.is_pinned() and t.is_contiguous() for t in mine.values())
        assert all(torch.equal(mine[k], reference[k]) for k in reference)


def test_too_little_shared_memory_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(ring_loader, "_free_shared_memory", lambda: 2**20)  # 1 MB free in /dev/shm
    with pytest.raises(SpinegradeError, match=r"needs \d+ MB of shared memory.*1 MB free.*--shm-size"):
        batch_loader(_dataset(), 64, list(range(N)), image_shape=(1, 224, 224), workers=8, pin_memory=False)
