"""Attention for packed rows and generation: decoding steps without repeated K/V heads, the prompts' forward
packed, and (on a GPU) variable-length flash attention, each equal to SDPA."""

import pytest
import torch
import torch.nn.functional as F

from lit_mistral.modeling import attention
from lit_mistral.modeling.attention import decode_attention, padded_attention
from lit_mistral.modeling.registry import register

register()


def test_decode_attention_equals_sdpa_with_repeated_heads():
    """The decoding-step attention (grouped-query heads without copying K/V) gives SDPA's answer, with a left-padding
    mask as bool or additive float, and with none."""
    from transformers.integrations.sdpa_attention import repeat_kv

    torch.manual_seed(0)
    b, h, h_kv, length, d = 3, 8, 2, 11, 16
    q, k, v = torch.randn(b, h, 1, d), torch.randn(b, h_kv, length, d), torch.randn(b, h_kv, length, d)
    keep = torch.ones(b, 1, 1, length, dtype=torch.bool)
    keep[0, ..., :4] = False  # row 0 is left-padded by 4
    for mask in (keep, torch.zeros(b, 1, 1, length).masked_fill(~keep, float("-inf")), None):
        expected = F.scaled_dot_product_attention(q, repeat_kv(k, h // h_kv), repeat_kv(v, h // h_kv),
                                                  attn_mask=mask, scale=0.3).transpose(1, 2)
        torch.testing.assert_close(decode_attention(q, k, v, mask, 0.3), expected, atol=1e-5, rtol=1e-5)


def test_generation_with_our_attention_equals_sdpa(tiny_model_dir, monkeypatch):
    """Greedy batched generation of left-padded prompts: the same tokens with lit_varlen (decoding steps through
    decode_attention) as with transformers' SDPA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    batch = tokenizer(["Name a fish .", "Which is a species of fish ? Tope or Rope"], return_tensors="pt",
                      padding=True)
    calls = []
    decode = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention", lambda *a: calls.append(1) or decode(*a))
    out = {}
    for impl in ("sdpa", attention.NAME):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl).eval()
        out[impl] = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(out["sdpa"], out[attention.NAME])
    assert len(calls) == 11 * 2  # 11 decoding steps (the 12th token comes from the prompt's forward) x 2 layers


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_attention_equals_sdpa_on_real_tokens(side):
    """The prompts' forward packs each row's real tokens (no (T x T) scores of the padded batch): the same outputs
    as SDPA with the padding mask, at every real token."""
    from transformers.integrations.sdpa_attention import repeat_kv

    torch.manual_seed(0)
    b, h, h_kv, t, d = 3, 8, 2, 9, 16
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, h_kv, t, d), torch.randn(b, h_kv, t, d)
    real = torch.ones(b, t, dtype=torch.bool)
    pads = {0: 4, 2: 1}
    for row, n in pads.items():
        if side == "left":
            real[row, :n] = False
        else:
            real[row, t - n :] = False
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = causal[None, None] & real[:, None, None, :]  # transformers' sdpa mask: causal and padding
    expected = F.scaled_dot_product_attention(q, repeat_kv(k, h // h_kv), repeat_kv(v, h // h_kv), attn_mask=mask,
                                              scale=0.3).transpose(1, 2)
    out = padded_attention(q, k, v, mask, 0.3, None)
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)
    assert not out[~real].any()


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 48])
def test_varlen_flash_attention_equals_sdpa_per_example(window):
    """Packed rows on CUDA go to PyTorch's variable-length flash attention: the same outputs (bf16 tolerance) as one
    causal SDPA per example in float32, with grouped-query heads and a sliding window."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    if window is not None and "window_size" not in inspect.signature(varlen_attn).parameters:
        pytest.skip("sliding-window varlen attention needs torch >= 2.12")
    torch.manual_seed(0)
    lengths = [5, 130, 64, 1, 77]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), h, 64) for h in (8, 2, 2))
    expected = attention.sdpa_per_example(q, k, v, cu, 0.125, window)
    out = attention.packed_attention(*(t.cuda().bfloat16() for t in (q, k, v)), cu.cuda(), max(lengths), 0.125,
                                      window)
    torch.testing.assert_close(out.float().cpu(), expected, atol=2e-2, rtol=2e-2)
