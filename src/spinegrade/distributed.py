"""Data-parallel training over several processes, GPUs and machines, through torch.distributed (DDP).

Three ways in, one code path:

* ``spinegrade train --devices N`` on one machine spawns N processes here (gloo on CPUs, NCCL on GPUs);
* ``torchrun --nproc-per-node N ... spinegrade train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
* ``srun spinegrade train ...`` in a SLURM allocation sets SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID
  (``scripts/slurm/train_ddp.sbatch`` exports MASTER_ADDR and MASTER_PORT).

Each process trains on its own shard of every epoch with batch ``batch_size / world_size``, so the global
batch, the learning-rate schedule and the epoch's samples are those of a single-process run; gradients are
averaged by DDP. Validation is sharded too and gathered. Only rank 0 writes files and logs.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from spinegrade.errors import SpinegradeError
from spinegrade.logs import apply_settings, current_settings, get_logger

log = get_logger(__name__)

STRATEGIES = ("auto", "ddp")


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shard(self, items: list) -> list:
        """This rank's share of ``items``: every world_size-th item, padded by wrapping round so every
        rank gets the same count (DDP needs the same number of steps on every rank)."""
        if not self.enabled:
            return items
        if not items:
            raise SpinegradeError("nothing to share between the DDP processes (no samples)")
        per_rank = -(-len(items) // self.world_size)
        padded = (items * self.world_size)[: per_rank * self.world_size]  # cycling: enough even for tiny lists
        return padded[self.rank::self.world_size]


SINGLE = World()


def world_from_environment() -> World:
    """The process's place, as torchrun or SLURM's srun describe it; a single process otherwise."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return SINGLE


def start(world: World, device_type: str) -> None:
    if world.enabled and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if device_type == "cuda":
            torch.cuda.set_device(world.local_rank)
        # Rank 0 alone builds the preprocessing cache while the others wait at a barrier: on the real
        # data that can take far longer than the default collective timeout.
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=world.rank,
                                world_size=world.world_size, timeout=timedelta(hours=6))


def stop(world: World) -> None:
    if world.enabled and dist.is_initialized():
        dist.destroy_process_group()


def check_request(devices: int, num_nodes: int, strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise SpinegradeError(f"--strategy {strategy!r}: supported are {', '.join(STRATEGIES)} (DDP through torch.distributed)")
    if devices < 1 or num_nodes < 1:
        raise SpinegradeError(f"--devices {devices} --num_nodes {num_nodes}: both must be at least 1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, world_size: int, port: int, fn, args, logging_settings: dict) -> None:
    apply_settings(logging_settings, main=local_rank == 0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    if not torch.cuda.is_available():  # CPU processes share the cores instead of each taking them all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        fn(*args)
    except SpinegradeError as exc:  # a user error: one line, like the single-process command
        log.error(f"spinegrade train: error (process {local_rank}): {exc}")
        sys.exit(2)


def launch(fn, args: tuple, devices: int, num_nodes: int, strategy: str) -> None:
    """Run ``fn(*args)`` once per process of the requested world.

    Already inside a launched world (torchrun, srun): run here. One machine, several devices: spawn them.
    Several machines need a launcher on each, which this process cannot start."""
    check_request(devices, num_nodes, strategy)
    launched = world_from_environment()
    if launched.enabled or devices * num_nodes == 1:
        fn(*args)
        return
    if num_nodes > 1:
        raise SpinegradeError(f"--num_nodes {num_nodes}: start one process per device on every machine with torchrun "
                              "or srun (scripts/slurm/train_ddp.sbatch does it on SLURM)")
    if torch.cuda.is_available() and torch.cuda.device_count() < devices:
        raise SpinegradeError(f"--devices {devices}: this machine has {torch.cuda.device_count()} GPU(s)")
    import torch.multiprocessing as mp

    try:
        mp.start_processes(_spawned, args=(devices, free_port(), fn, args, current_settings()), nprocs=devices,
                           start_method="spawn")
    except mp.ProcessExitedException as exc:
        raise SpinegradeError(f"training process {exc.error_index} stopped (exit {exc.exit_code}); "
                              "its message is above") from None
