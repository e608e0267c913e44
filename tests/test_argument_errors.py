"""What is reported before the parser sees the options: renamed options (on the command line and in a --config
file, each with its new name) and a --config file that is not YAML (its file, line and column). (The parser's own
complaints, every bad key with its file:line, run through the CLI in test_cli.py.)"""

import pytest

from lit_mistral.argument_errors import read_config, renamed_options
from lit_mistral.errors import LitMistralError


def test_renamed_options_are_named_with_their_new_names(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text("model:\n  compute_dtype: bfloat16\n  name_or_path: x\n")
    assert renamed_options(["fit", "--model.quantize=nf4", "--config", str(config), "--trainer.max_steps", "3"]) == [
        "--model.quantize is now --model.quantization.method",
        f"{config}: model.compute_dtype is now model.compute.dtype"]
    assert renamed_options(["fit", f"--config={tmp_path / 'missing.yaml'}"]) == []  # the parser names a missing file


def test_a_config_that_is_not_yaml_is_named_with_its_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  name_or_path: [unclosed\n")
    with pytest.raises(LitMistralError, match=r"--config .*bad.yaml:\d+:\d+: malformed YAML .*Fix: correct it"):
        read_config(config)
    config.write_bytes(b"model: \xff\n")
    with pytest.raises(LitMistralError, match=r"not UTF-8 text \(byte offset 7\)"):
        read_config(config)
    config.write_text("model:\n  lora_r: 8\n")
    assert read_config(config) == {"model": {"lora_r": 8}}
