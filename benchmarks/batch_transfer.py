"""What a batch costs the training process to receive from DataLoader workers: PyTorch's DataLoader
against spinegrade's ring of shared-memory slots (``spinegrade.data.loader``).

On a GPU the training process launches the model's kernels one by one; CPU time it spends taking a
batch from the workers is time the GPU waits. This times that CPU time alone (``time.thread_time`` of
the training thread), on batches the workers have already made, so the workers' own speed does not
enter: per round (an epoch of as many batches as the workers queue ahead), the workers make every
batch while the training thread sleeps, then the thread takes them. Same samples, same augmentation, same batches both ways (the test
suite checks they are equal). Without a GPU there is no pinning thread, so the figures are the
training thread's own work; with one, the same work runs in the pinning thread of the same process,
which holds the same interpreter lock. Three figures: PyTorch's DataLoader; the ring as CPU training
uses it (each batch copied out into fresh tensors); the ring copied into one reused buffer, a CPU
stand-in for the GPU path's copy into cached pinned memory.
Medians over --rounds; the ratio is taken within one run. The last line is JSON.

    python benchmarks/batch_transfer.py [--model-size 224] [--batch-size 32] [--workers 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from common import add_data_arguments, benchmark_data, report
from spinegrade.config import TrainConfig
from spinegrade.constants import GROUPS
from spinegrade.data.dataset import LevelDataset, build_transform, init_worker
from spinegrade.data.index import build_index
from spinegrade.data.loader import batch_loader
from spinegrade.data.preprocess import PreprocessSettings, build_cache
from spinegrade.train import SeededDataset

GROUP = TrainConfig().group  # what the models grade
SPINAL = GROUPS[GROUP].conditions[0]  # its condition


def received_cpu_us(epoch, batches: int, rounds: int, settle: float) -> list[float]:
    """Training-thread CPU microseconds per batch, one figure per round. A round is an epoch of exactly
    as many batches as the workers queue ahead: they make them all while the thread sleeps, and none is
    left to make while it takes them, so the workers never compete with the thread being timed."""
    figures = []
    for _ in range(rounds + 1):  # the first round starts the workers
        batches_of_epoch = epoch()
        time.sleep(settle)
        started = time.thread_time()
        taken = sum(1 for _ in batches_of_epoch)
        figures.append((time.thread_time() - started) / taken * 1e6)
        assert taken == batches
    return figures[1:]


def copied_into_one_buffer(loader):
    """The ring's replies copied into one reused buffer. On a GPU the pinning thread copies each batch
    into pinned memory from PyTorch's caching host allocator, which hands back the blocks of freed
    batches, so no new pages; a reused buffer is this CPU's stand-in for that (an estimate, not the GPU
    path itself). On a CPU the ring's batches are fresh tensors, and a fresh tensor of a few MB costs
    its page faults; that is the "ring" figure."""
    ring, replies = loader.ring, iter(loader.loader)
    images = torch.empty_like(ring.images[0])
    fields = {name: torch.empty_like(tensor[0]) for name, tensor in ring.fields.items()}

    def copied(reply):
        images[:reply.count].copy_(ring.images[reply.slot, :reply.count])
        for name, buffer in fields.items():
            buffer[:reply.count].copy_(ring.fields[name][reply.slot, :reply.count])
        return {"image": images[:reply.count], **{name: b[:reply.count] for name, b in fields.items()}}

    return (copied(reply) for reply in replies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, studies=12)
    parser.add_argument("--model-size", dest="image_size", type=int, default=224, help="model input, pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=4, help="batches queued per worker")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--settle", type=float, default=1.5, help="seconds the workers get to fill the queue")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = benchmark_data(args, Path(tmp))
        samples = build_index(data_dir, check_images=False).usable(SPINAL).reset_index(drop=True)
        cache = build_cache(samples, PreprocessSettings(GROUP, "full", args.image_size, 48.0), Path(tmp) / "cache")
        levels, targets = cache.samples["level_index"].to_numpy(), cache.samples["severity"].to_numpy()
        dataset = SeededDataset(LevelDataset(cache.images, levels, targets, build_transform(True)), seed=0)
        queued = args.workers * args.prefetch
        figures = {}
        sampler = [i % len(dataset) for i in range(queued * args.batch_size)]
        for name in ("dataloader", "ring", "ring_reused_buffer"):
            if name == "dataloader":
                loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                                    prefetch_factor=args.prefetch, persistent_workers=True, worker_init_fn=init_worker)
            else:
                loader = batch_loader(dataset, args.batch_size, sampler, image_shape=(1, args.image_size, args.image_size),
                                      workers=args.workers, pin_memory=False, prefetch=args.prefetch)
            epoch = partial(copied_into_one_buffer if name == "ring_reused_buffer" else iter, loader)
            figures[name] = statistics.median(received_cpu_us(epoch, queued, args.rounds, args.settle))
        print(f"training-thread CPU per batch: DataLoader {figures['dataloader']:7.0f} us   "
              f"ring {figures['ring']:7.0f} us   ring into a reused buffer {figures['ring_reused_buffer']:7.0f} us",
              flush=True)
        report({"benchmark": "batch_transfer", "batch_size": args.batch_size, "image_size": args.image_size,
                "workers": args.workers, "rounds": args.rounds, "dataloader_us_per_batch": figures["dataloader"],
                "ring_us_per_batch": figures["ring"], "ring_reused_buffer_us_per_batch": figures["ring_reused_buffer"],
                "dataloader_over_ring": figures["dataloader"] / figures["ring"],
                "dataloader_over_ring_reused_buffer": figures["dataloader"] / figures["ring_reused_buffer"]})


if __name__ == "__main__":
    main()
