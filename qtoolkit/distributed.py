"""Scaling sampling out over processes with torch.distributed (launched by torchrun), not a home-made pool.

Work is split by whole batches: rank r draws batches r, r + W, r + 2W, ... and every batch is the same
computation it would be in a single process (its noise depends on the seed and the batch index only),
so the gathered result is identical whatever the number of processes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment; a no-op in a plain single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
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


def gather_batches(mine: dict[int, torch.Tensor], num_batches: int) -> torch.Tensor:
    """Every rank's {batch index: tensor} -> all batches concatenated in order, on every rank."""
    _, world = rank_and_world()
    parts = dict(mine)
    if world > 1:
        gathered: list[dict[int, torch.Tensor]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, {b: t.cpu() for b, t in mine.items()})
        for part in gathered:
            parts.update(part)
    return torch.cat([parts[b] for b in range(num_batches)])
