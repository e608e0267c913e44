"""Building the model: NF4/FP4 base with LoRA adapters, random initialization, and the errors a bad base, target
or adapter gets."""

import os
import shutil

import pytest
import torch
from conftest import adapted, make_module

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


def test_random_4bit_base_is_built_layer_by_layer_like_a_loaded_one(tiny_model_dir, tmp_path, monkeypatch):
    """`random_init` with a 4-bit base writes nothing to disk (no random checkpoint to load: a 70B base would be 140
    GB) and builds one decoder layer at a time, quantizing each as it is made; the result is what loading gives —
    the same module types, parameter names, shapes and dtypes, 4-bit flags — and it trains with LoRA."""
    import bitsandbytes as bnb
    from transformers import AutoConfig

    import lit_mistral.modeling.build as build_module
    import lit_mistral.modeling.random_base as random_base

    monkeypatch.setattr(build_module, "random_init_folder", lambda *a, **k: pytest.fail("wrote a random checkpoint"))
    made, cls = [], random_base._decoder_layer_class
    monkeypatch.setattr(random_base, "_decoder_layer_class",
                        lambda model: (lambda config, i: made.append(i) or cls(model)(config, i)))
    ours = make_module(tiny_model_dir, random_init=True, compute={"dtype": "float32"}).build(torch.device("cpu"))
    loaded = make_module(tiny_model_dir, compute={"dtype": "float32"}).build(torch.device("cpu"))
    assert made == [0, 1] == [layer.self_attn.layer_idx for layer in ours.model.get_base_model().model.layers]

    def layout(module):
        return ({n: (tuple(p.shape), p.dtype, type(p).__name__) for n, p in module.model.named_parameters()},
                sorted(type(m).__name__ for m in module.model.modules()))

    assert layout(ours) == layout(loaded)
    base = ours.model.get_base_model()
    assert base.is_loaded_in_4bit and base.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert base.config.num_hidden_layers == AutoConfig.from_pretrained(tiny_model_dir).num_hidden_layers == 2
    assert all(m.weight.quant_state is not None for m in base.modules() if isinstance(m, bnb.nn.Linear4bit))
    weights = base.model.layers[1].mlp.down_proj.weight
    assert 0.01 < float(bnb.functional.dequantize_4bit(weights.data, weights.quant_state).std()) < 0.04  # std 0.02
    batch = {"input_ids": torch.tensor([[1, 5, 9, 2, 7, 3]]), "attention_mask": torch.ones(1, 6, dtype=torch.long),
             "labels": torch.tensor([[-100, 5, 9, 2, 7, 3]])}
    loss, count = ours.loss_sum(batch)
    loss.backward()
    assert torch.isfinite(loss) and count == 5
    assert all(p.grad is not None for n, p in ours.named_parameters() if "lora_A" in n)


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


def test_a_quantized_base_is_kept_and_loaded_again(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """The first build quantizes the 16-bit weights and keeps the 4-bit copy; the next loads that copy: the same 4-bit
    weights and logits. A changed base gets a copy of its own; `cache: false` neither writes nor reads one; only
    process 0 writes."""
    from lightning.pytorch.utilities import rank_zero_only
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LIT_MISTRAL_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    loads = []
    load = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, folder, **kw: loads.append(str(folder)) or load(cls, folder, **kw)))
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])

    def build_and_run(**settings):
        module = adapted(base, **settings)
        with torch.no_grad():
            logits = module.model(input_ids=ids).logits
        return module, logits

    first, logits = build_and_run()
    copies = sorted((tmp_path / "cache").glob("quantized-base-*"))
    assert len(copies) == 1 and (copies[0] / "config.json").is_file() and loads == [str(base)]
    with caplog.at_level("INFO"):
        second, again = build_and_run()
    assert loads[1:] == [str(copies[0])] and f"from its 4-bit copy kept in {copies[0]}" in caplog.text
    torch.testing.assert_close(again, logits, rtol=0, atol=0)
    packed = {n: p for n, p in first.model.named_parameters() if p.dtype == torch.uint8}
    assert len(packed) == 14 and all(torch.equal(p, dict(second.model.named_parameters())[n])
                                     for n, p in packed.items())
    from lit_mistral.modeling.merge import merge_adapter

    merge_adapter(second.model, torch.float32).save_pretrained(tmp_path / "merged")  # export saves what it loaded
    assert (tmp_path / "merged" / "model.safetensors").is_file()

    weights = base / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # the base changed
    build_and_run()
    assert loads[2:] == [str(base)] and len(list((tmp_path / "cache").glob("quantized-base-*"))) == 2
    build_and_run(quantization={"cache": False})
    assert loads[3:] == [str(base)]

    shutil.rmtree(tmp_path / "cache")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    build_and_run()
    assert not list((tmp_path / "cache").glob("quantized-*"))


def test_no_copy_kept_without_room_on_disk(tiny_model_dir, tmp_path, monkeypatch, caplog):
    import collections

    from lit_mistral import sources

    monkeypatch.setenv("LIT_MISTRAL_CACHE", str(tmp_path / "cache"))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sources.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))
    with caplog.at_level("INFO"):
        adapted(tiny_model_dir)
    assert "Not keeping a 4-bit copy of the base" in caplog.text and "--model.quantization.cache false" in caplog.text
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("quantized-")]


def test_a_validation_leaves_the_4bit_layout_and_the_gradients_alone(tiny_model_dir):
    """On CPUs with AVX512-BF16 bitsandbytes would repack 4-bit weights at the first eval forward without
    gradients, for a bf16 kernel with no backward (seen here: no gradient reached the input afterwards). The build
    turns that off: a training step after a validation gets the gradients of one without it."""
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    grads = []
    for validate_first in (False, True):
        module = adapted(tiny_model_dir, quantization={"method": "nf4"})
        layers = [m for m in module.model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
        assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
        if validate_first:
            module.model.eval()
            with torch.no_grad():
                module.model(input_ids=ids)
        module.model.train()
        module.model(input_ids=ids).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in module.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0)
