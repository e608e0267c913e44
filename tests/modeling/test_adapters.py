"""Adapters: one that does not fit the base is refused with what differs, before peft loads it; one holding pickled
objects never runs them; saved adapters are plain peft."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_module

from lit_mistral.errors import LitMistralError


class Opener:
    """Pickles into a call of `open(path, "w")`: unpickling it creates the file, which shows that it ran."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("mismatch,message", [
    ("targets", r"target_modules \['wqkv'\] .*are not in the base model, whose linear layers are \[.*'q_proj'"),
    ("shapes", r"adapter weight\(s\) have other shapes than the base model's layers .*e\.g\. "
               r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight: adapter \[8, 32\], base layer needs \[8, 64\]"),
    ("deeper", r"has weights for 2 module\(s\) the base model does not have, e\.g\. "
               r"\['model\.layers\.2\.self_attn\.q_proj', 'model\.layers\.2\.self_attn\.v_proj'\]"),
])
def test_adapter_that_does_not_fit_names_what_differs(tiny_model_dir, tmp_path, mismatch, message):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, MistralForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    if mismatch == "shapes":
        config.hidden_size, config.intermediate_size = 32, 64
    if mismatch == "deeper":
        config.num_hidden_layers = 3
    other = get_peft_model(MistralForCausalLM(config), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    other.save_pretrained(tmp_path / "adapter")
    if mismatch == "targets":
        path = tmp_path / "adapter" / "adapter_config.json"
        path.write_text(path.read_text().replace('"q_proj"', '"wqkv"'))
    module = make_module(tiny_model_dir, adapter_path=str(tmp_path / "adapter"))
    with pytest.raises(LitMistralError, match=r"model.adapter_path: the adapter in .* does not fit (.|\n)*" + message):
        module.build(torch.device("cpu"))


def test_adapter_with_pickled_objects_is_refused(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    folder = tmp_path / "adapter"
    LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj"]).save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_model_dir)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    torch.save({"payload": Opener(marker)}, folder / "adapter_model.bin")  # peft's pickle format, no safetensors
    with pytest.raises(LitMistralError, match=r"adapter_model.bin: holds pickled Python objects \(io.open\)"):
        make_module(tiny_model_dir, adapter_path=str(folder))  # refused before the base loads
    assert not marker.exists()


@pytest.mark.parametrize("damage,message", [
    ("config-not-json", r"adapter_config.json:1: not valid JSON \(Expecting property name enclosed in double quotes "
                        r"at column 2\)"),
    ("config-not-peft", r"adapter_config.json is not a peft adapter's config \(it has no peft_type\)"),
    ("weights-cut-short", r"adapter_model.safetensors cannot be read \(.*\): cut short or damaged"),
    ("no-weights", r"holds no adapter weights \(adapter_model.safetensors\)"),
])
def test_damaged_adapter_folder_is_refused_before_the_base_loads(tiny_model_dir, adapter_dir, tmp_path, damage,
                                                                 message):
    import shutil

    folder = Path(shutil.copytree(adapter_dir, tmp_path / "adapter"))
    weights = folder / "adapter_model.safetensors"
    if damage == "config-not-json":
        (folder / "adapter_config.json").write_text("{r: 8,")
    elif damage == "config-not-peft":
        (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
    elif damage == "weights-cut-short":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.unlink()
    with pytest.raises(LitMistralError, match=r"model.adapter_path: .*" + message + r".* Fix: write the adapter "
                                              r"again \(fit writes it to the run's `adapter` folder at its end\)"):
        make_module(tiny_model_dir, adapter_path=str(folder))


def test_adapter_config_with_another_rank_than_its_weights_is_named_before_the_base_loads(tiny_model_dir, adapter_dir,
                                                                                         tmp_path):
    """An adapter_config.json whose r is not its weights' rank: peft built the layers at r and then failed with a
    state_dict error cut off before its detail, blamed on the base model."""
    import shutil

    folder = Path(shutil.copytree(adapter_dir, tmp_path / "adapter"))
    config = json.loads((folder / "adapter_config.json").read_text())
    trained = config["r"]
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": trained * 2}))
    with pytest.raises(LitMistralError) as err:
        make_module(tiny_model_dir, adapter_path=str(folder))
    message = str(err.value)
    assert message.startswith(f"model.adapter_path: {folder / 'adapter_config.json'} says r={trained * 2}, but "
                              "adapter_model.safetensors holds LoRA weights of another rank: "), message
    import re

    assert re.search(rf"model\.layers\.0\.\w+\.\w+\.lora_[AB]\.weight is \[\d+, \d+\] \(rank {trained}, "
                     rf"not {trained * 2}\)", message), message
    assert "Fix: set r (and rank_pattern, if any) in adapter_config.json to the rank the adapter was trained with" \
        in message
    # a rank_pattern that gives the modules their own rank is the config's, and fits
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": trained * 2,
                                                            "rank_pattern": {"[a-z_]+": trained}}))
    make_module(tiny_model_dir, adapter_path=str(folder))
