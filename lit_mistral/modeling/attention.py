"""Attention for packed rows: every example attends only within itself, at the cost of its own length.

transformers isolates examples packed in one row only through a dense (T x T) block-diagonal mask, whose work grows
with the square of the row length, so long packed rows get slower per token. Packed batches here carry
`cu_seq_lens` (the example boundaries) and go to PyTorch's variable-length flash attention
(`torch.nn.attention.varlen`) on CUDA, or to one causal SDPA call per example on CPU.

Outside training, two more cases leave SDPA, whose padding mask with grouped-query heads copies every key and value
head once per query head it serves (transformers' `repeat_kv`) and takes PyTorch's math path:
- padded batches without a cache (validation, the prompts' forward in generation): each row's real tokens are
  packed and go the way packed batches do;
- decoding steps of batched generation (one new token per row, left-padded rows): two batched matmuls over the
  key/value heads, reading the KV cache once.
Everything else (padded training batches, other cache layouts) goes to transformers' own SDPA function, unchanged.

Registered with transformers as the attention implementation `lit_varlen` (with SDPA's mask builder) by
`lit_mistral.modeling.registry`."""

import functools
import inspect

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "lit_varlen"


def _sliding(window: int | None, longest: int) -> int | None:
    """The window that matters for these examples: None when every example fits inside it."""
    return window if window is not None and longest > window else None


@functools.cache
def _varlen_options() -> tuple[bool, bool]:
    """(takes window_size, takes enable_gqa) for this torch's varlen_attn, read once (inspect is slow, and this runs
    per layer)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return "window_size" in params, "enable_gqa" in params


def flash_varlen(q, k, v, cu_seq_lens, max_length, scale, window=None):
    """torch's flash varlen attention, causal (within `window` positions if given), over packed (T, heads, D)
    16-bit tensors; `cu_seq_lens` the examples' int32 offsets on q's device."""
    from torch.nn.attention.varlen import varlen_attn

    takes_window, takes_gqa = _varlen_options()
    if takes_window:  # torch >= 2.12: causal is a window (left, 0)
        extra = {"window_size": (window - 1 if window else -1, 0)}
    elif window is None:  # torch 2.10/2.11
        extra = {"is_causal": True}
    else:
        raise NotImplementedError("sliding-window attention over packed rows needs torch >= 2.12")
    if takes_gqa and q.shape[1] != k.shape[1]:
        extra["enable_gqa"] = True  # newer torch asks for it; older flash kernels take grouped heads as they are
    return varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scale, **extra)


def sdpa_per_example(q, k, v, cu_seq_lens, scale, window):
    # (T, H, D) -> one causal SDPA per example; GQA by repeating K/V heads (what SDPA's enable_gqa does).
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seq_lens.tolist()
    out = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:stop].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, L, D)
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)
        n = stop - start
        if window is not None and n > window:
            i = torch.arange(n, device=q.device)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


def packed_attention(q, k, v, cu_seq_lens, max_length, scale, window):
    """Causal attention within each example of packed (T, H, D) tensors: flash varlen on CUDA, SDPA per example
    elsewhere."""
    if q.is_cuda:
        # flash kernels take bf16/fp16 only; with an fp32 residual stream RoPE hands back fp32 q/k
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else dtype
        cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
        return flash_varlen(q.to(dtype), k.to(dtype), v.to(dtype), cu, max_length, scale, window)
    return sdpa_per_example(q, k, v, cu_seq_lens, scale, window)


def decode_attention(query, key, value, attention_mask, scale):
    """One query position per row against its cache, grouped-query heads without repeating K/V.

    query (B, H, 1, D); key/value (B, H_kv, L, D); attention_mask None, bool (True: attend) or additive float,
    broadcastable to (B, 1, 1, L). Query heads j*G .. j*G+G-1 share key/value head j (G = H / H_kv), as in
    transformers' repeat_kv. Returns (B, 1, H, D)."""
    b, h, _, d = query.shape
    h_kv = key.shape[1]
    q = query.reshape(b, h_kv, h // h_kv, d)  # (B, H_kv, G, D): the G query heads of each K/V head as rows
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # (B, H_kv, G, L)
    if attention_mask is not None:
        mask = attention_mask[..., -1:, -key.shape[2]:]  # (B, 1, 1, L)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).reshape(b, 1, h, d)


def padded_attention(query, key, value, attention_mask, scale, sliding_window):
    """Causal attention over a padded batch without a cache (the prompts' forward in generation, validation):
    the real tokens of each row are packed into one row and attend within their example, as in training.

    SDPA with a padding mask and grouped-query heads takes PyTorch's math path, which builds every (query, key)
    score of the padded batch: time and memory grow with rows x padded length squared.
    query (B, H, T, D), key/value (B, H_kv, T, D), attention_mask (B, 1, T, T) bool with the real tokens of each
    row in one run (left or right padding). Returns (B, T, H, D), zeros at padding."""
    real = attention_mask[:, 0].any(dim=1)  # (B, T): keys that some query may see, i.e. the row's real tokens
    lengths = real.sum(dim=1)
    cu_seq_lens = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=query.device)
    cu_seq_lens[1:] = torch.cumsum(lengths, 0)
    q, k, v = (t.transpose(1, 2)[real] for t in (query, key, value))  # (N, heads, D), row after row
    longest = int(lengths.max())
    window = _sliding(sliding_window, longest)
    packed = packed_attention(q, k, v, cu_seq_lens, longest, scale, window)
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3], dtype=packed.dtype)
    out[real] = packed
    return out


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention function. query (B, H, T, D), key/value (B, H_kv, T, D) -> ((B, T, H, D), None)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if cu_seq_lens_q is None and query.shape[2] == 1 and key.shape[1] < query.shape[1] and not module.training:
        return decode_attention(query, key, value, attention_mask, scale), None
    if (cu_seq_lens_q is None and attention_mask is not None and attention_mask.dtype == torch.bool
            and query.shape[2] > 1 and key.shape[2] == query.shape[2] and not module.training):
        return padded_attention(query, key, value, attention_mask, scale, sliding_window), None
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one row (batch size 1) holding all examples")
    # (T, H, D); squeeze, not [0]: indexing's backward writes the gradient into a zeroed copy of the whole tensor
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))
    window = _sliding(sliding_window, max_length_q)
    return packed_attention(q, k, v, cu_seq_lens_q, max_length_q, scale, window)[None], None


def packed_kwargs(batch: dict, implementation: str) -> dict:
    """The forward arguments that lay out `batch`: its padding mask, or, for a packed row, the example boundaries
    (`position_ids`, and for this module's implementation `cu_seq_lens`)."""
    if "cu_seq_lens" not in batch:
        return {"attention_mask": batch["attention_mask"]}
    kwargs = {"position_ids": batch["position_ids"]}
    if implementation == NAME:
        cu, longest = batch["cu_seq_lens"], batch["max_length"]
        # a 4D mask is taken as already built: transformers neither builds a dense block-diagonal mask we would not
        # use nor inspects one (SDPA's builder asks whether a 2D mask is all ones: a wait for the GPU at every step,
        # for rows shorter than the sliding window or models without one); `varlen_attention` ignores it
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest,
                      attention_mask=batch["input_ids"].new_ones((1, 1, 1, 1), dtype=torch.bool))
    # other implementations isolate examples through transformers' own mask from position_ids
    return kwargs
