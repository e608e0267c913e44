"""The engine's attention: causal attention within each prompt of a packed prefill, and one decoding step over a
block-paged KV cache (the torch reference against plain SDPA, the Triton kernel against the reference)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lit_mistral.generation import paged_attention
from lit_mistral.generation.paged_attention import (
    _pad,
    paged_decode_attention,
    paged_decode_reference,
    prefill_attention,
    prefill_bounds,
)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_prefill_bounds_are_int32_offsets():
    bounds = prefill_bounds([3, 5, 1], torch.device("cpu"))
    assert bounds.dtype == torch.int32 and bounds.tolist() == [0, 3, 8, 9]


def test_prefill_attends_within_each_prompt_causally():
    """A packed row of prompts of 3, 5 and 1 tokens, 6 query heads on 2 key/value heads: equal to attention over the
    whole row with a block-diagonal causal mask, and the first prompt's output is that of the prompt alone."""
    g = torch.Generator().manual_seed(0)
    lengths, heads, kv_heads, dim = [3, 5, 1], 6, 2, 8
    q = torch.randn(9, heads, dim, generator=g)
    k, v = (torch.randn(9, kv_heads, dim, generator=g) for _ in range(2))
    out = prefill_attention(q, k, v, lengths, 0.3, prefill_bounds(lengths, q.device))
    assert out.shape == (9, heads, dim)
    prompt = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    position = torch.arange(9)
    allowed = (prompt[:, None] == prompt[None, :]) & (position[None, :] <= position[:, None])  # (N, N)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(3, 1).transpose(0, 1),
                                              v.repeat_interleave(3, 1).transpose(0, 1), attn_mask=allowed,
                                              scale=0.3).transpose(0, 1)
    torch.testing.assert_close(out, expected)
    first = prefill_attention(q[:3], k[:3], v[:3], [3], 0.3, prefill_bounds([3], q.device))
    torch.testing.assert_close(out[:3], first)
    torch.testing.assert_close(out[8], v[8].repeat_interleave(3, 0))  # one token sees only itself


def test_triton_tiles_are_powers_of_two_of_at_least_16():
    assert [_pad(n) for n in (1, 3, 16, 17, 64, 80, 128)] == [16, 16, 16, 32, 64, 128, 128]


def paged_case(dtype=torch.float32, groups=3, head_dim=24, block_size=4, seed=0):
    """A cache of 30 blocks, 4 row slots with shuffled blocks, 3 rows of lengths 1, 4 (one full block) and 23."""
    g = torch.Generator().manual_seed(seed)
    h_kv = 2
    k = torch.randn(30 * block_size, h_kv, head_dim, generator=g).to(dtype)
    v = torch.randn(30 * block_size, h_kv, head_dim, generator=g).to(dtype)
    tables = (torch.randperm(29, generator=g)[:24] + 1).reshape(4, 6).to(torch.int32)
    row_slots, lengths = torch.tensor([2, 0, 3]), torch.tensor([1, block_size, 23])
    q = torch.randn(3, h_kv * groups, head_dim, generator=g).to(dtype)
    return q, k, v, tables, row_slots, lengths, block_size


def test_paged_reference_equals_sdpa_over_the_gathered_cache():
    q, k, v, tables, row_slots, lengths, bs = paged_case()
    out = paged_decode_reference(q, k, v, tables, row_slots, lengths, bs, scale=0.2)
    for row in range(3):
        slots = [int(tables[row_slots[row], p // bs]) * bs + p % bs for p in range(int(lengths[row]))]
        keys, values = (t[slots].transpose(0, 1)[None] for t in (k, v))  # (1, H_kv, L, D)
        expected = F.scaled_dot_product_attention(q[row][None, :, None], keys, values, scale=0.2, enable_gqa=True)
        torch.testing.assert_close(out[row], expected[0, :, 0])
    bounded = paged_decode_reference(q, k, v, tables, row_slots, lengths, bs, scale=0.2, max_len=23)
    torch.testing.assert_close(bounded, out)


INTERPRETED = """
import sys, torch
from lit_mistral.generation.paged_attention import paged_decode_triton
cases = torch.load(sys.argv[1])
torch.save([paged_decode_triton(*case, 0.2, block_n=8) for case in cases], sys.argv[2])
"""


@needs_triton
def test_triton_kernel_equals_reference_interpreted(tmp_path):
    # in a fresh process: TRITON_INTERPRET must be set before anything imports triton (transformers and peft may)
    cases = [paged_case(torch.float32), paged_case(torch.float16)]  # the 3.6 interpreter's bf16 tl.dot is broken
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", INTERPRETED, tmp_path / "cases.pt", tmp_path / "out.pt"], env=env,
                   check=True, timeout=120)
    for case, out, atol in zip(cases, torch.load(tmp_path / "out.pt"), (1e-5, 2e-3)):
        torch.testing.assert_close(out, paged_decode_reference(*case, 0.2), atol=atol, rtol=1e-3)


def test_decode_on_the_cpu_is_the_reference():
    case = paged_case()
    torch.testing.assert_close(paged_decode_attention(*case, 0.2), paged_decode_reference(*case, 0.2), rtol=0, atol=0)


# ---- GPU ----


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups,head_dim,block_size", [(4, 128, 16), (1, 64, 16), (3, 80, 8)])
def test_triton_kernel_equals_reference_on_gpu(dtype, groups, head_dim, block_size):
    g = torch.Generator().manual_seed(0)
    h_kv, rows, slots, width = 8, 37, 50, 24  # up to 24 blocks per row: several BLOCK_N steps of the kernel
    blocks = slots * width + 1
    k, v = (torch.randn(blocks * block_size, h_kv, head_dim, generator=g).to("cuda", dtype) for _ in range(2))
    tables = (torch.randperm(blocks - 1, generator=g) + 1).reshape(slots, width).to("cuda", torch.int32)
    row_slots = torch.randperm(slots, generator=g)[:rows].cuda()
    lengths = torch.randint(1, width * block_size + 1, (rows,), generator=g)
    lengths[0], lengths[1] = 1, width * block_size
    q = torch.randn(rows, h_kv * groups, head_dim, generator=g).to("cuda", dtype)
    out = paged_attention.paged_decode_triton(q, k, v, tables, row_slots, lengths.cuda(), block_size,
                                              head_dim ** -0.5)
    expected = paged_decode_reference(q, k, v, tables, row_slots, lengths.cuda(), block_size, head_dim ** -0.5)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
