"""Folding the adapter into the base: the same model, plain weights."""

import pytest
import torch
from conftest import adapted

from lit_mistral.modeling.merge import merge_adapter

IDS = torch.tensor([[1, 10, 20, 30, 40, 50, 60], [1, 7, 8, 9, 3, 3, 3]])


@pytest.mark.parametrize("quantize,tolerance", [("nf4", 1e-4), (None, 1e-5)])
def test_merged_model_computes_what_base_plus_adapter_computes(tiny_model_dir, quantize, tolerance):
    """4-bit base: the merged weight is dequantize(W) + scale * B @ A, so logits agree to float32 rounding of the
    summation order (stated tolerance 1e-4 absolute); an unquantized base merges exactly up to 1e-5."""
    module = adapted(tiny_model_dir, quantization={"method": quantize})
    with torch.no_grad():
        reference = module.model(input_ids=IDS).logits
        with module.model.disable_adapter():
            base = module.model(input_ids=IDS).logits
        merged = merge_adapter(module.model, torch.float32)
        assert not any("Linear4bit" in type(m).__name__ or "lora" in type(m).__module__ for m in merged.modules())
        # exactly the parameters of a plain model of this architecture: nothing left behind by the adapter
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert set(merged.state_dict()) == set(plain.state_dict())
        logits = merged(input_ids=IDS).logits
    assert (reference - base).abs().max() > 100 * tolerance  # the adapter matters
    torch.testing.assert_close(logits, reference, atol=tolerance, rtol=0)


@pytest.mark.gpu
def test_merged_model_on_a_gpu_computes_what_base_plus_adapter_computes(tiny_model_dir):
    """On CUDA in bfloat16 (how predict merges there): the merged logits agree with the 4-bit base + adapter's to
    bf16 rounding."""
    module = adapted(tiny_model_dir, "cuda", compute={"dtype": "bfloat16", "gradient_checkpointing": False})
    ids = IDS.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        reference = module.model(input_ids=ids).logits.float()
        merged = merge_adapter(module.model, torch.bfloat16)(input_ids=ids).logits.float()
    torch.testing.assert_close(merged, reference, atol=0.05, rtol=0.05)
