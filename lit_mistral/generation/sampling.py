"""Sampling for the engine: reproducible whatever rows share a batch."""

import torch


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # a 32-bit integer hash (Wellons' lowbias32 shape) in int64 arithmetic; constants < 2**31 so nothing overflows
    m = 0xFFFFFFFF
    x = x & m
    x = (x ^ (x >> 16)) * 0x7FEB352D & m
    x = (x ^ (x >> 15)) * 0x5BD1E995 & m
    return x ^ (x >> 16)


def sample(logits: torch.Tensor, seed: int, rows: torch.Tensor, steps: torch.Tensor, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """One token per row from (B, V) logits, by the Gumbel-max trick: argmax(logits / T + Gumbel noise) samples
    softmax(logits / T) exactly. The noise is a hash of (seed, row key, step, token id), not a random generator's
    stream, so a prompt's answer depends on the seed, its key (`rows`: the prompt's index) and its own step only,
    whatever rows share its batch. Returns (B,) token ids."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # tokens after the smallest set reaching top_p (the first stays)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    key = _mix32(_mix32(_mix32(torch.full_like(rows, seed)) ^ rows) ^ steps)  # (B,)
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    bits = _mix32(_mix32(key[:, None] ^ vocab[None, :]) + key[:, None])  # (B, V)
    uniform = ((bits >> 8).float() + 0.5) / 2**24  # in (0, 1)
    return torch.argmax(logits - torch.log(-torch.log(uniform)), dim=-1)
