"""Cross-entropy of the language-model head without materializing all logits.

For a packed step of 8k tokens, Mistral's 32k vocabulary makes (8k, 32k) fp32 logits: 1 GiB, plus as much again for
their gradient, most of it for tokens that carry no label. Here only labelled positions go through the head, in
chunks whose logits are recomputed in backward (activation checkpointing) instead of stored. Written by hand
because transformers computes full logits, and Liger's fused kernel (an optional speed-up) has no CPU path."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                reduction: str = "sum") -> torch.Tensor:
    logits = head(hidden).float()  # (n, V) in fp32 for a stable softmax
    return F.cross_entropy(logits, targets, reduction=reduction)


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                         chunk_size: int = 4096, reduction: Literal["sum", "none"] = "sum") -> torch.Tensor:
    """Sum over N positions of CE(head(hidden[i]), targets[i]). hidden (N, H), targets (N,) -> scalar (fp32), or with
    reduction="none" the N losses (fp32), e.g. for per-example validation losses."""
    if hidden.shape[0] <= chunk_size:
        return _chunk_loss(hidden, targets, head, reduction)
    chunks = [checkpoint(_chunk_loss, hidden[start:start + chunk_size], targets[start:start + chunk_size], head,
                         reduction, use_reentrant=False) for start in range(0, hidden.shape[0], chunk_size)]
    if reduction == "none":
        return torch.cat(chunks)
    total = hidden.new_zeros((), dtype=torch.float32)
    for chunk in chunks:
        total = total + chunk
    return total
