"""Building the model: NF4/FP4 base with LoRA adapters, random initialization, and the errors a bad base, target
or adapter gets."""

import pytest
import torch
from conftest import make_module

from lit_mistral.errors import LitMistralError


def test_builds_nf4_base_with_lora_adapters(tiny_model_dir):
    import bitsandbytes as bnb

    module = make_module(tiny_model_dir).build(torch.device("cpu"))
    layers = [m for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # every attention and MLP projection of both layers
    assert all(m.weight.quant_type == "nf4" for m in layers)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert module.model.training  # Lightning keeps submodule modes; checkpointing acts only in train mode


def test_fp4_and_random_init(tiny_model_dir, tmp_path):
    """`quantization.method: fp4` quantizes to FP4; `random_init` needs only the config and tokenizer, no weights."""
    import shutil

    config_only = tmp_path / "config-only"
    shutil.copytree(tiny_model_dir, config_only, ignore=shutil.ignore_patterns("*.safetensors"))
    module = make_module(config_only, quantization={"method": "fp4"}, random_init=True).build(torch.device("cpu"))
    layer = module.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert layer.weight.quant_type == "fp4"
    with pytest.raises(LitMistralError, match="could not load"):
        make_module(config_only).build(torch.device("cpu"))


def test_unknown_target_module_names_the_choices(tiny_model_dir):
    with pytest.raises(LitMistralError, match=r"\['qkv'\] match no module .* choose among .*'q_proj'"):
        make_module(tiny_model_dir, lora={"target_modules": ["qkv"]}).build(torch.device("cpu"))


def test_missing_local_model_folder():
    from lit_mistral.module import QLoRAModule

    with pytest.raises(LitMistralError, match="the folder './no-such-model' does not exist"):
        QLoRAModule(name_or_path="./no-such-model")


def test_a_base_too_large_for_the_gpu_names_the_way_to_shard_it(tiny_model_dir, monkeypatch):
    """Out of memory while loading is not a batch-size problem: the error says how to spread the base over GPUs."""
    import transformers

    def too_large(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 448.00 MiB.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", too_large)
    with pytest.raises(LitMistralError) as err:
        make_module(tiny_model_dir).build(torch.device("cpu"))
    assert str(err.value) == (
        f"model.name_or_path: {str(tiny_model_dir)!r} does not fit on cpu while loading (CUDA out of memory. Tried to "
        "allocate 448.00 MiB.). Fix: --trainer.strategy fsdp_qlora --model.load_on cpu on several GPUs "
        "(configs/qlora-fsdp.yaml): each then holds 1/N of the base, and never the whole of it; or a GPU with more "
        "memory.")
