"""Keeping processes in step. Under FSDP every forward pass is a collective that all processes must join, so work
split across processes (validation batches, prompts to answer) is padded to the same count on every process with
items that count for nothing; results are gathered so that every process holds all of them."""

from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def in_step(shares: Sequence[Sequence[T]], rank: int, filler: T) -> list[T]:
    """This process's share, padded with `filler` to the longest share, so every process runs as many items."""
    mine = list(shares[rank])
    return mine + [filler] * (max(len(s) for s in shares) - len(mine))


def gather_objects(obj: T, world_size: int) -> list[T]:
    """Every process's `obj`, in rank order, on every process (just `[obj]` with one process)."""
    if world_size == 1:
        return [obj]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def reduce_queued(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """`tensor` reduced over all processes (`op`: "sum" or "max"), in place, queued on the device like any kernel:
    the CPU goes on at once. Lightning's `strategy.reduce` puts a barrier first, which makes every process's CPU wait
    for its GPU (with NCCL); a step's scalars read back later (`step_scalars.py`) need no such wait. One process:
    the tensor as it is."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor
