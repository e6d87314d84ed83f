"""Several processes (torchrun / DDP): process-group set-up and the block sampler sharded per rank.

Sharding rule: every rank computes the same global epoch order (``BlockShuffleSampler`` seeded by seed and
epoch), cuts it into global batches of ``batch_size`` scenes, and takes the ``rank``-th contiguous slice of
``batch_size / world_size`` scenes of each. So a step sees the same scenes whatever the number of
processes, each rank's slice comes from the same few chunks (reads stay sequential), and resuming at step
s skips the same global batches on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from softcon.models.data import BlockShuffleSampler


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job (world_size 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """True when ``init_distributed`` created the process group (and ``close`` should destroy it)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_type: str) -> DistributedContext:
    """Join the torchrun job described by WORLD_SIZE / RANK / LOCAL_RANK (NCCL on CUDA, gloo on CPU).

    Without those variables (or WORLD_SIZE=1) this is a single process and nothing is initialised.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        owns = True
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, owns_group=owns)


def rank_batch_size(batch_size: int, world_size: int) -> int:
    """Scenes per rank and step; the global batch must split evenly."""
    if batch_size % world_size:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the {world_size} processes; "
            f"use a multiple of {world_size} (batch_size is the global batch over all ranks)"
        )
    return batch_size // world_size


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's share of the global batches of one epoch, from ``first_batch`` on.

    Args:
        sampler: the epoch order (its ``set_epoch`` must have been called).
        batch_size: global batch size (all ranks together).
        rank, world_size: this process and the number of processes.
        first_batch: global batches to skip (a resumed run's position in the epoch).
        max_batches: stop after this many batches (the run's remaining steps).
    """

    def __init__(
        self,
        sampler: BlockShuffleSampler,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        first_batch: int = 0,
        max_batches: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.sampler = sampler
        self.batch_size = batch_size
        self.per_rank = rank_batch_size(batch_size, world_size)
        self.rank = rank
        self.first_batch = first_batch
        self.max_batches = max_batches

    def batches(self) -> list[list[int]]:
        order = self.sampler.order()  # (N,) the same on every rank
        n_global = len(order) // self.batch_size  # drop_last: every step has batch_size scenes
        stop = n_global if self.max_batches is None else min(n_global, self.first_batch + self.max_batches)
        start_in_batch = self.rank * self.per_rank
        return [
            order[b * self.batch_size + start_in_batch : b * self.batch_size + start_in_batch + self.per_rank].tolist()
            for b in range(self.first_batch, stop)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())
