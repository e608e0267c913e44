"""Folding the adapter into the base: same model, plain weights, loadable without lit_mistral."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import adapted, make_module, run_cli
from lit_mistral.errors import LitMistralError
from lit_mistral.export import export
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
