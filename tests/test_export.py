"""export: the adapter folded into the base, written as a plain Hugging Face folder that loads without lit_mistral."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import adapted, make_module, run_cli

from lit_mistral.errors import LitMistralError
from lit_mistral.export import export

TARGETS = {"target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj", "lm_head"]}
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
    # the weights are as readable as the rest (safetensors alone writes them 0600): what the umask gives any output
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
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


def files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_replaces_a_folder_that_is_not_an_earlier_export(tiny_model_dir, tmp_path):
    """A run folder (checkpoints, adapter, config, events), the one holding the checkpoint being read or another,
    and the base model's folder all stay as they are."""
    runs = tmp_path / "lightning_logs"
    for version in ("version_0", "version_1"):
        (runs / version / "checkpoints").mkdir(parents=True)
        (runs / version / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        (runs / version / "config.yaml").write_text("trainer: {}\n")
        (runs / version / "events.out.tfevents.1").write_bytes(b"events")
    ckpt = runs / "version_0" / "checkpoints" / "last.ckpt"
    before = files(tmp_path), files(tiny_model_dir)
    module = make_module(tiny_model_dir)
    cases = [(runs / "version_0", r"holds '.*last.ckpt', which this export reads"),
             (runs, r"holds '.*last.ckpt', which this export reads"),
             (tiny_model_dir, r"holds '.*tiny-mistral.*', which this export reads"),
             (runs / "version_1", r"is not an earlier export \(it holds checkpoints/, config.yaml, "
                                  r"events.out.tfevents.1, which export does not write\); --overwrite replaces only "
                                  r"exports. Fix: choose another --output_dir")]
    for target, message in cases:
        with pytest.raises(LitMistralError, match=message):
            export(module, str(ckpt), target, torch.float32, torch.device("cpu"), overwrite=True)
    assert (files(tmp_path), files(tiny_model_dir)) == before and module.model is None  # nothing loaded either


def test_an_earlier_export_is_replaced_only_by_a_complete_one(tiny_model_dir, adapter_dir, tmp_path, monkeypatch):
    out, cpu = tmp_path / "merged", torch.device("cpu")

    def module():
        return make_module(tiny_model_dir, lora=TARGETS, compute={"dtype": "float32"})

    export(module(), str(adapter_dir), out, torch.float32, cpu, with_adapter=True)
    first = files(out)
    assert "adapter/adapter_model.safetensors" in first

    def killed(model, tokenizer, folder):  # the process dies while the new model is being written
        (folder / "model.safetensors").write_bytes(b"half of it")
        raise KeyboardInterrupt

    monkeypatch.setattr("lit_mistral.export.write_model", killed)
    with pytest.raises(KeyboardInterrupt):
        export(module(), str(adapter_dir), out, torch.float32, cpu, overwrite=True, with_adapter=True)
    assert files(out) == first and [p.name for p in tmp_path.iterdir()] == ["merged"]  # nothing left beside it
    monkeypatch.undo()
    export(module(), str(adapter_dir), out, torch.bfloat16, cpu, overwrite=True, with_adapter=True)  # an export
    second = files(out)
    assert second.keys() == first.keys() and second["model.safetensors"] != first["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
