"""A random 4-bit base built layer by layer: every decoder linear layer quantized as the settings say, the rest in
the compute dtype, weights as transformers initializes them and fixed by the seed, the caller's config untouched.
(How the module builds it, and that it trains, is in test_build.py.)"""

import bitsandbytes as bnb
import pytest
import torch
from transformers import BitsAndBytesConfig, Qwen2Config

from lit_mistral.modeling.random_base import _decoder_layer_class, random_quantized_model

# Qwen2: biased q/k/v projections, and `layer_types` in its config
CONFIG = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.05)


def build(seed: int = 0, quant_type: str = "nf4", double_quant: bool = False, storage=torch.uint8):
    config = Qwen2Config(**CONFIG)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                      bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_storage=storage,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    return config, random_quantized_model(config, torch.device("cpu"), dtype=torch.bfloat16,
                                          quantization_config=quantization, seed=seed)


def test_decoder_linear_layers_are_4bit_and_the_rest_in_the_compute_dtype():
    config, model = build(quant_type="fp4", double_quant=True)
    assert config.num_hidden_layers == 3 and len(config.layer_types) == 3  # the caller's config as it was
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 3 * 7  # q, k, v, o, gate, up, down in each layer
    assert all(m.weight.quant_type == "fp4" and m.weight.compress_statistics for m in quantized)
    assert all(m.weight.dtype == torch.uint8 and m.compute_dtype == torch.bfloat16 for m in quantized)
    assert {p.dtype for n, p in model.named_parameters() if "layers" not in n or "norm" in n} == {torch.bfloat16}
    assert type(model.lm_head) is torch.nn.Linear and not model.training
    assert model.is_loaded_in_4bit and model.is_quantized
    assert model.config.quantization_config.bnb_4bit_quant_type == "fp4"
    assert model.hf_quantizer is not None


def test_weights_follow_transformers_initialization_and_the_seed():
    _, model = build()
    std = CONFIG["initializer_range"]
    assert float(model.model.embed_tokens.weight.float().std()) == pytest.approx(std, rel=0.05)
    assert float(model.lm_head.weight.float().std()) == pytest.approx(std, rel=0.05)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert len(norms) == 3 * 2 + 1 and all(bool((p == 1).all()) for p in norms)
    q = model.model.layers[2].self_attn.q_proj
    assert q.bias is not None and bool((q.bias == 0).all())
    assert float(bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float().std()) == pytest.approx(
        std, rel=0.1)  # NF4 keeps the spread

    _, again = build()
    _, other = build(seed=1)
    for name, p in model.state_dict().items():
        if torch.is_tensor(p) and p.dtype in (torch.uint8, torch.bfloat16) and p.numel() > 64:
            assert torch.equal(p, again.state_dict()[name]), name
    assert not torch.equal(q.weight.data, other.model.layers[2].self_attn.q_proj.weight.data)


def test_the_model_runs():
    _, model = build()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2, 7]])).logits
    assert logits.shape == (1, 5, 300) and bool(torch.isfinite(logits).all())


def test_a_family_without_decoder_layers_is_refused():
    class Headless(torch.nn.Module):
        _no_split_modules = ["Block"]

    with pytest.raises(ValueError, match=r"Headless: no decoder layer class found \(_no_split_modules=\[\]\)"):
        _decoder_layer_class(Headless())
