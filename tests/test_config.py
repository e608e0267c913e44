"""The model's setting groups: each checks its own values; every renamed option names an option that exists."""

import pytest

from lit_mistral.config import RENAMED, Compute, Generation, LoRA, Optimization


def test_each_group_names_what_is_wrong_with_it():
    assert LoRA(r=0, dropout=1.0).problems() == ["model.lora.r=0: expected >= 1",
                                                 "model.lora.dropout=1.0: expected 0 <= dropout < 1"]
    assert LoRA().problems() == []
    assert Compute(dtype="float16").problems(quantized=True)[0].startswith("model.compute.dtype=float16 with 4-bit")
    assert Compute(dtype="float16").problems(quantized=False) == []
    assert "needs model.compute.gradient_checkpointing true or auto" in Compute(
        gradient_checkpointing=False, checkpoint_layers=4).problems(quantized=True)[0]
    assert Optimization(learning_rate=0, warmup_ratio=1.5).problems() == [
        "model.optimization.learning_rate=0: expected > 0",
        "model.optimization.warmup_steps=0, model.optimization.warmup_ratio=1.5: expected warmup_steps >= 0 and "
        "0 <= warmup_ratio < 1"]
    assert Generation(max_new_tokens=0).problems() == ["model.generation.max_new_tokens=0: expected >= 1"]


def test_dropout_masks_are_drawn_again_where_memory_decides_the_speed():
    """Without a memory plan (no GPU to measure): `auto` settings are their plain values (every layer recomputes,
    none offloads, whole batches), and masks are drawn again where some layers keep their activations beside
    others that recompute or offload."""
    assert not Compute(gradient_checkpointing=False).regenerate_dropout()  # the throughput mode: keep them
    assert not Compute().regenerate_dropout()  # every layer recomputes: a layer's masks live only in its backward
    assert Compute(checkpoint_layers=20).regenerate_dropout()
    assert Compute(offload_layers=4).regenerate_dropout()
    assert not Compute(checkpoint_layers=20, dropout_masks="keep").regenerate_dropout()
    assert Compute(gradient_checkpointing=False, dropout_masks="regenerate").regenerate_dropout()
    assert not Compute(checkpoint_layers=20, fused_lora=False).regenerate_dropout()
    plain = Compute().plain()
    assert (plain.gradient_checkpointing, plain.checkpoint_layers, plain.offload_layers, plain.micro_batch_tokens,
            plain.keep_dequantized) == (True, None, 0, None, False)
    assert Compute(gradient_checkpointing=False).plain().offload_layers == 0
    assert Compute().auto() == set(Compute.PLANNED)
    assert Compute(keep_dequantized=False, micro_batch_tokens=None).auto() == set(Compute.PLANNED) - {
        "keep_dequantized", "micro_batch_tokens"}
    assert Compute(fused_lora=False, dropout_masks="regenerate").problems(quantized=True) == [
        ("model.compute.dropout_masks=regenerate: needs model.compute.fused_lora=true (the fused forward draws the "
         "masks again); set it, or dropout_masks keep")]


def test_lora_settings_are_peft_arguments():
    from peft import LoraConfig

    lora = LoRA(r=4, alpha=8, dropout=0.1, target_modules=["q_proj"])
    config = LoraConfig(task_type="CAUSAL_LM", **lora.peft_kwargs())
    assert (config.r, config.lora_alpha, config.lora_dropout, config.target_modules) == (4, 8, 0.1, {"q_proj"})


def test_generation_settings_give_greedy_answers_when_asked():
    settings = Generation(max_new_tokens=64, do_sample=True, temperature=0.5)
    assert settings.sampling() == dict(max_new_tokens=64, do_sample=True, temperature=0.5, top_p=0.95, top_k=50)
    assert settings.sampling(greedy=True, max_new_tokens=8)["do_sample"] is False
    assert settings.sampling(greedy=True, max_new_tokens=8)["max_new_tokens"] == 8
    # temperature 0 samples from a distribution with all its mass on the argmax: greedy, as OpenAI's API and vLLM
    assert Generation(do_sample=True, temperature=0.0).sampling()["do_sample"] is False


def test_sampling_settings_that_make_no_sense_are_refused():
    assert Generation(temperature=-1, top_p=0, top_k=-1).problems() == [
        "model.generation.temperature=-1: expected >= 0 (0 with do_sample: greedy)",
        "model.generation.top_p=0: expected 0 < top_p <= 1 (1: every token)",
        "model.generation.top_k=-1: expected >= 0 (0: every token)"]
    assert Generation(temperature=float("nan"), top_p=1.5).problems() == [
        "model.generation.temperature=nan: expected >= 0 (0 with do_sample: greedy)",
        "model.generation.top_p=1.5: expected 0 < top_p <= 1 (1: every token)"]
    assert Generation(temperature=0, top_p=1, top_k=0).problems() == []


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_every_renamed_option_names_an_existing_one(subcommand, capsys):
    """The rename error must send users to options that exist: each new name is in the parsed config."""
    import yaml
    from conftest import run_cli

    with pytest.raises(SystemExit):
        run_cli(subcommand, "--print_config")
    config = yaml.safe_load(capsys.readouterr().out)
    for old, new in RENAMED.items():
        node = config
        for part in new.split("."):
            assert isinstance(node, dict) and part in node, (old, new)
            node = node[part]
        assert old not in str(list(config["model"])), old
