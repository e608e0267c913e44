"""Attention for the generation engine: causal attention within each prompt of a packed prefill, and one decoding
step's attention over a paged KV cache.

The paged cache of one layer is a pool of token slots, `(slots, H_kv, D)`, handed out in blocks of `block_size`
consecutive slots; a row's keys and values live in the blocks its line of the block table names, in order, so that
the key at position p sits in slot `table[p // block_size] * block_size + p % block_size`. Rows are handed their
blocks when they start and give them back when they finish, so no row is ever copied or padded to the longest one.

Decoding attention runs a Triton kernel on CUDA (written here because neither PyTorch nor transformers reads a
block-paged cache of this layout in torch 2.11, and a CUDA graph needs one kernel whose grid does not depend on the
rows' lengths) and a torch reference elsewhere (CPU, tests). Triton is imported only when the kernel is first
launched, so the CPU path never needs it."""

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from lit_mistral.modeling.attention import flash_varlen


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _repeat_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    # (H_kv, ...) -> (H, ...): query heads j*G .. j*G+G-1 share key/value head j, as in transformers' repeat_kv
    return t.repeat_interleave(groups, dim=0) if groups > 1 else t


def prefill_bounds(lengths: list[int], device: torch.device) -> torch.Tensor:
    """The int32 offsets (0, l1, l1+l2, ...) of packed prompts, for `prefill_attention` (made once per prefill, not
    once per layer: each is a host-to-device copy)."""
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                      scale: float, bounds: torch.Tensor) -> torch.Tensor:
    """Causal attention within each prompt of a packed row: q (N, H, D), k/v (N, H_kv, D), `lengths` the prompts'
    token counts in order (summing to N), `bounds` their `prefill_bounds` on q's device. Flash varlen on CUDA in
    16-bit; one SDPA per prompt otherwise. Returns (N, H, D)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_varlen(q, k, v, bounds, max(lengths), scale)
    groups = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))  # (heads, n, D)
        o = F.scaled_dot_product_attention(qs[None], _repeat_heads(ks, groups)[None], _repeat_heads(vs, groups)[None],
                                           is_causal=True, scale=scale)
        out.append(o[0].transpose(0, 1))
        start += n
    return torch.cat(out)


def paged_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           row_slots: torch.Tensor, lengths: torch.Tensor, block_size: int, scale: float,
                           max_len: int | None = None) -> torch.Tensor:
    """One query per row against its paged cache, in plain torch (float32 scores).

    q (B, H, D); k_cache/v_cache (slots, H_kv, D); tables (R, W) block ids, one line per row slot; row_slots (B,)
    which table line each row uses; lengths (B,) keys per row (positions 0 .. length-1). `max_len` (optional, a
    bound on `lengths`) limits the blocks gathered. Returns (B, H, D) in q's dtype."""
    b, h, d = q.shape
    h_kv = k_cache.shape[1]
    width = tables.shape[1] if max_len is None else min(tables.shape[1], -(-max_len // block_size))
    blocks = tables[row_slots.long(), :width].long()  # (B, W)
    offsets = torch.arange(block_size, device=q.device)
    slots = (blocks[:, :, None] * block_size + offsets).reshape(b, -1)  # (B, L): slot of each position
    keys, values = k_cache[slots].float(), v_cache[slots].float()  # (B, L, H_kv, D)
    qg = q.float().reshape(b, h_kv, h // h_kv, d)  # (B, H_kv, G, D)
    scores = torch.einsum("bkgd,blkd->bkgl", qg, keys) * scale
    seen = torch.arange(slots.shape[1], device=q.device) < lengths[:, None]  # (B, L)
    scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgl,blkd->bkgd", torch.softmax(scores, dim=-1), values)
    return out.reshape(b, h, d).to(q.dtype)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_kernel(Q, K, V, Out, Tables, RowSlots, Lengths, scale,
                      stride_qb, stride_qh, stride_ob, stride_oh, stride_ks, stride_kh, stride_t,
                      GROUPS: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET_END: tl.constexpr):
        # one program per (row, key/value head): the G query heads of that K/V head are the rows of the q tile, so
        # each key and value is read once for all of them; online softmax over BLOCK_N positions at a time
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        length = tl.load(Lengths + row)
        table = Tables + tl.load(RowSlots + row).to(tl.int64) * stride_t
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM_PAD)
        heads = kv_head * GROUPS + g
        q_mask = (g < GROUPS)[:, None] & (d < HEAD_DIM)[None, :]
        q = tl.load(Q + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
        # compiled: only the row's own blocks. Interpreted (tests): triton 3.6's interpreter cannot take a tensor as
        # a range() bound under numpy >= 2.4, so it walks the whole table, masking positions past the length
        for start in range(0, INTERPRET_END if INTERPRET_END > 0 else length, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            valid = n < length
            block = tl.load(table + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            offsets = (block * BLOCK_SIZE + n % BLOCK_SIZE)[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
            kv_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
            k = tl.load(K + offsets, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale  # (GROUP_PAD, BLOCK_N)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: position 0 is in the first block
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + offsets, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(Out + row * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
                 mask=q_mask)

    return decode_kernel


def _pad(n: int) -> int:
    # tl.arange needs powers of two, tl.dot at least 16 along each side
    return max(16, 1 << (n - 1).bit_length())


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                        row_slots: torch.Tensor, lengths: torch.Tensor, block_size: int, scale: float,
                        block_n: int = 64) -> torch.Tensor:
    """The Triton kernel; arguments as in `paged_decode_reference` (k/v caches contiguous, lengths >= 1)."""
    b, h, d = q.shape
    h_kv = k_cache.shape[1]
    q = q.to(k_cache.dtype).contiguous()
    out = torch.empty_like(q)
    _kernel()[(b, h_kv)](q, k_cache, v_cache, out, tables, row_slots, lengths, scale,
                         q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
                         k_cache.stride(1), tables.stride(0), GROUPS=h // h_kv, GROUP_PAD=_pad(h // h_kv),
                         HEAD_DIM=d, DIM_PAD=_pad(d), BLOCK_SIZE=block_size, BLOCK_N=_pad(block_n),
                         INTERPRET_END=tables.shape[1] * block_size if os.environ.get("TRITON_INTERPRET") == "1" else 0,
                         num_warps=4)
    return out


def paged_decode_attention(q, k_cache, v_cache, tables, row_slots, lengths, block_size: int, scale: float,
                           max_len: int | None = None) -> torch.Tensor:
    """Decoding attention over the paged cache: the Triton kernel on CUDA, the torch reference elsewhere."""
    if q.is_cuda:
        return paged_decode_triton(q, k_cache, v_cache, tables, row_slots, lengths, block_size, scale)
    return paged_decode_reference(q, k_cache, v_cache, tables, row_slots, lengths, block_size, scale, max_len)
