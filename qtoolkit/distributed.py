"""Scaling the job out over processes with torch.distributed (launched by torchrun), not a home-made pool.

Work is split by whole batches: rank r takes batches r, r + W, r + 2W, ... and every batch is the same
computation it would be in a single process (its noise depends on the seed and the batch index only), so
the gathered result is identical whatever the number of processes W. What is summed over batches (bias
correction's channel means, the per-step errors) is gathered per batch and summed in batch order on every
rank, as one process sums it; what is merged (observers) merges exactly. Outside torchrun every helper here
is the single-process case: rank 0 of 1, nothing to gather.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment; a no-op in a plain single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():  # NCCL's collectives run on this process's GPU: cuda:LOCAL_RANK
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def my_batches(num_batches: int) -> range:
    rank, world = rank_and_world()
    return range(rank, num_batches, world)


def gather_objects(mine: object) -> list:
    """Every rank's `mine` (any picklable object), in rank order, on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return [mine]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


def from_main_process(value: object) -> object:
    """Rank 0's `value` on every rank."""
    if rank_and_world()[1] == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_by_batch(mine: dict[int, object]) -> dict[int, object]:
    """Every rank's {batch index: value} merged, on every rank, in batch order."""
    merged: dict[int, object] = {}
    for part in gather_objects(mine):
        merged.update(part)
    return dict(sorted(merged.items()))


def gather_batches(mine: dict[int, torch.Tensor], num_batches: int) -> torch.Tensor:
    """Every rank's {batch index: tensor} -> all batches concatenated in order, on every rank."""
    parts = gather_by_batch({b: t.cpu() for b, t in mine.items()})
    return torch.cat([parts[b] for b in range(num_batches)])
