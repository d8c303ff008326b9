"""Batches from DataLoader workers through a ring of shared-memory slots, not fresh shared tensors.

PyTorch's DataLoader moves every tensor of every batch from a worker to the training process in
a new shared-memory segment: the worker creates it, the training process receives its file
descriptor over a socket, maps it and faults its pages in, and frees it after the step. For a batch
of 32 grey 224-pixel images with three small label tensors that is about 2.5 ms of the training
process's CPU time per batch on a 2-core machine (``benchmarks/batch_transfer.py``), and on a GPU
the training process is the one launching the model's kernels, so the GPU waits for it.

Here the training process allocates, once, a ring of batch-sized slots in shared memory that the
workers inherit. A worker writes its samples into the slot its batch was given and returns only
(the ring's key, slot, count); the training process copies the slot out (into pinned memory when
batches go to a GPU) and hands the step an ordinary dict of tensors. A slot is reused only after
its batch has been copied out: the DataLoader sends ``workers * prefetch`` batches to the workers
when an epoch starts and one more each time it hands a batch out, in order, so when batch k is
handed out (already copied) the furthest batch sent is k + workers * prefetch, and the ring has one
slot more than that. Across epochs the workers are persistent, and PyTorch's DataLoader lets each
finish the batches it holds before it sends the next epoch's.
"""

from __future__ import annotations

import itertools
import math
import os
import uuid
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from spinegrade.data.dataset import init_worker
from spinegrade.errors import SpinegradeError

# The live rings of this process, by key: a worker's reply names its ring instead of carrying it.
# Weak, so a ring goes with its loader (a run trains many folds in one process).
_RINGS: weakref.WeakValueDictionary[str, BatchRing] = weakref.WeakValueDictionary()


# A grading sample's tensors besides its image: name -> (shape, dtype).
GRADING_FIELDS: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "level": ((), torch.int64), "target": ((), torch.int64), "index": ((), torch.int64)}


class BatchRing:
    """``slots`` batches of uint8 images and of each of ``fields`` (name -> (shape, dtype) of one
    sample's tensor) in shared memory."""

    def __init__(self, slots: int, batch_size: int, image_shape: tuple[int, ...],
                 fields: dict[str, tuple[tuple[int, ...], torch.dtype]] = GRADING_FIELDS):
        self.key = uuid.uuid4().hex
        itemsize = {name: math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                    for name, (shape, dtype) in fields.items()}
        size = slots * batch_size * (math.prod(image_shape) + sum(itemsize.values()))
        advice = "use fewer --num_workers, or give the machine more /dev/shm (docker run --shm-size=2g)"
        free = _free_shared_memory()
        if free is not None and size > free:
            # Checked first: an over-full /dev/shm would only show later, as a worker killed by SIGBUS.
            raise SpinegradeError(f"the loader needs {size / 2**20:.0f} MB of shared memory for its batches and "
                                  f"/dev/shm has {free / 2**20:.0f} MB free; {advice}")
        try:
            self.images = torch.empty((slots, batch_size, *image_shape), dtype=torch.uint8).share_memory_()
            self.fields = {name: torch.empty((slots, batch_size, *shape), dtype=dtype).share_memory_()
                           for name, (shape, dtype) in fields.items()}
        except RuntimeError as exc:
            raise SpinegradeError(f"could not allocate {size / 2**20:.0f} MB of shared memory for the loader's "
                                  f"batches ({exc}); {advice}") from None
        _RINGS[self.key] = self

    def batch(self, slot: int, count: int, pin: bool) -> dict[str, torch.Tensor]:
        """The slot's batch in tensors of its own (the slot is refilled later), in pinned memory if
        asked (from PyTorch's caching host allocator, which reuses the blocks of freed batches). Each
        tensor is contiguous: a copy to the GPU from a strided one would first make it contiguous in
        unpinned memory, and wait."""
        batch = {"image": _copy(self.images[slot, :count], pin)}
        batch.update({name: _copy(tensor[slot, :count], pin) for name, tensor in self.fields.items()})
        return batch


def _free_shared_memory() -> int | None:
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:  # no /dev/shm (not Linux): nothing to check
        return None
    return stats.f_bavail * stats.f_frsize


def _copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin).copy_(tensor)


class SlotReply:
    """What a worker sends back for a batch. The DataLoader's pinning thread calls ``pin_memory``,
    so the copy out of the ring into pinned memory happens there, off the training loop."""

    def __init__(self, key: str, slot: int, count: int):
        self.key, self.slot, self.count = key, slot, count

    def pin_memory(self, device=None) -> dict[str, torch.Tensor]:
        return _RINGS[self.key].batch(self.slot, self.count, pin=True)


class _SlotBatches(Sampler):
    """Batches of the sampler's indices, each with the ring slot it goes to, in turn. The counter runs
    on across epochs: the slot order is that of one long stream of batches."""

    def __init__(self, sampler: Iterable[int], batch_size: int, drop_last: bool, slots: int):
        self.sampler, self.batch_size, self.drop_last, self.slots = sampler, batch_size, drop_last, slots
        self.counter = itertools.count()

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        indices = iter(self.sampler)
        while batch := list(itertools.islice(indices, self.batch_size)):
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield next(self.counter) % self.slots, batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class _FillSlots(Dataset):
    """Runs in the workers: writes a batch's samples into its slot and replies with the slot."""

    def __init__(self, dataset: Dataset, ring: BatchRing):
        self.dataset, self.ring = dataset, ring

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, request: tuple[int, list[int]]) -> SlotReply:
        slot, indices = request
        images = self.ring.images[slot]
        fields = {name: tensor[slot] for name, tensor in self.ring.fields.items()}
        for row, i in enumerate(indices):
            sample = self.dataset[i]
            images[row].copy_(sample["image"])
            for name, tensor in fields.items():
                tensor[row] = sample[name]
        return SlotReply(self.ring.key, slot, len(indices))


def _reply(reply: SlotReply) -> SlotReply:
    return reply


class RingLoader:
    """Iterates dict batches (image and the ring's fields) like a DataLoader over ``dataset``."""

    def __init__(self, loader: DataLoader, ring: BatchRing):
        self.loader, self.ring = loader, ring

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        replies = iter(self.loader)  # now, as a DataLoader would: the workers start on the epoch at once
        # Pinned batches come as dicts from the pinning thread; without pinning, the copy is made here.
        return (reply if isinstance(reply, dict) else self.ring.batch(reply.slot, reply.count, pin=False)
                for reply in replies)


def batch_loader(dataset: Dataset, batch_size: int, sampler: Iterable[int], *, image_shape: tuple[int, ...],
                 workers: int, pin_memory: bool, drop_last: bool = False, prefetch: int = 2,
                 seed: int = 0, fields: dict[str, tuple[tuple[int, ...], torch.dtype]] = GRADING_FIELDS,
                 ) -> Iterable[dict[str, torch.Tensor]]:
    """Batches of ``dataset`` in ``sampler``'s order; each sample is a dict of a uint8 ``image`` of
    ``image_shape`` and one tensor per entry of ``fields`` (a :class:`LevelDataset`'s by default).

    With workers, through a :class:`BatchRing`, with persistent workers (the slot order relies on the
    DataLoader finishing a worker's batches before the next epoch's); without, a plain DataLoader
    (nothing crosses a process).

    The DataLoader draws its workers' base seed from a generator of its own (``seed``): from torch's
    global one, it would draw a different number of times per epoch with workers than without, and
    shift the dropout of the training that follows, so results would depend on ``num_workers``."""
    generator = torch.Generator().manual_seed(seed)
    if workers <= 0:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          pin_memory=pin_memory, generator=generator)
    slots = workers * prefetch + 1
    ring = BatchRing(slots, batch_size, image_shape, fields)
    loader = DataLoader(_FillSlots(dataset, ring), batch_sampler=_SlotBatches(sampler, batch_size, drop_last, slots),
                        collate_fn=_reply, num_workers=workers, prefetch_factor=prefetch, pin_memory=pin_memory,
                        persistent_workers=True, worker_init_fn=init_worker, generator=generator)
    return RingLoader(loader, ring)
