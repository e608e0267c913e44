"""export: the adapter folded into the base, written as a plain Hugging Face folder that loads without lit_mistral."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import adapted, make_module, run_cli

from lit_mistral.errors import LitMistralError
from lit_mistral.export import export

IDS = torch.tensor([[1, 10, 20, 30, 40, 50, 60], [1, 7, 8, 9, 3, 3, 3]])


def test_export_writes_a_plain_hugging_face_folder(tiny_model_dir, adapter_dir, tmp_path):
    with torch.no_grad():
        reference = adapted(tiny_model_dir).model(input_ids=IDS).logits  # the weights adapter_dir holds
    out = tmp_path / "merged"
    run_cli("export", "--model.name_or_path", tiny_model_dir, "--model.compute.dtype", "float32",
            "--model.lora.target_modules", "[q_proj, v_proj, gate_proj, down_proj, lm_head]",
            "--trainer.accelerator", "cpu", "--ckpt_path", adapter_dir, "--output_dir", out,
            "--dtype", "float32", "--adapter", "true")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    # a process without lit_mistral (so without its attention registration) loads it and gets the same logits
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); "
            f"assert not any(k.split('.')[0] == 'lit_mistral' for k in sys.modules); "
            f"print(m(input_ids=torch.tensor({IDS.tolist()})).logits.flatten().tolist())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    logits = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1])).view_as(reference)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)


def test_export_refuses_to_overwrite_and_needs_a_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    module = make_module(tiny_model_dir)
    with pytest.raises(LitMistralError, match="exists and is not empty.*--overwrite true"):
        export(module, str(tmp_path), out, torch.float32, torch.device("cpu"))
    with pytest.raises(LitMistralError, match="export needs --ckpt_path"):
        export(module, None, tmp_path / "new", torch.float32, torch.device("cpu"))
    with pytest.raises(LitMistralError, match="does not exist"):
        export(module, str(tmp_path / "nope"), tmp_path / "new", torch.float32, torch.device("cpu"))
    assert (out / "keep.txt").read_text() == "mine"
