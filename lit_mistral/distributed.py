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
