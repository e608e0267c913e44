"""The fsdp_qlora strategy's plan: which modules become FSDP units and what FSDP leaves alone (its multi-process
runs are in test_journey_distributed.py)."""

import pytest
import torch
from conftest import make_module

from lit_mistral.errors import LitMistralError
from lit_mistral.modeling.fsdp import shard_plan


def test_shard_plan_units_and_what_fsdp_leaves_alone(tiny_model_dir):
    """Decoder layers become units; FSDP leaves alone the adapters and the float32 norms beside bfloat16-stored
    4-bit weights (it flattens one dtype per unit); a model naming no decoder layer class is refused."""
    module = make_module(tiny_model_dir, quantization={"storage": "bfloat16"}, compute={"dtype": "bfloat16"})
    module.build(torch.device("cpu"))
    layers, ignored = shard_plan(module)
    assert [type(m).__name__ for m in layers] == ["MistralDecoderLayer"] * 2
    names = {id(p): n for n, p in module.named_parameters()}
    left_out = [names[id(p)] for p in ignored]
    adapters = [n for n in left_out if ".lora_" in n]
    assert len(adapters) == 2 * 7 * 2 == sum(p.requires_grad for p in module.parameters())
    # with fp32_norms, the embeddings, final norm and head are float32 together: the root unit keeps them
    assert sorted(n.rsplit(".", 2)[-2] for n in left_out if ".lora_" not in n) == sorted(
        ["input_layernorm", "post_attention_layernorm"] * 2)

    for m in module.modules():  # transformers' models name their decoder layer class
        if hasattr(m, "_no_split_modules"):
            m._no_split_modules = []
    with pytest.raises(LitMistralError, match="found no decoder layers to shard"):
        shard_plan(module)
