"""The command line as users run it: configs parse, fit -> checkpoint -> resume -> predict, and bad input."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, write_jsonl
from lit_mistral.cli import main

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def cli(*args: str) -> None:
    main([str(a) for a in args])


def fails(capsys, *args: str) -> str:
    """Run the CLI, expect exit status 2, return what it printed on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli(*args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli("fit", "--config", config, "--print_config")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "trainer:" in printed


def tiny_args(tiny_model_dir, data_file, root, *extra) -> list:
    return ["--model.name_or_path", tiny_model_dir, "--data.path", data_file, "--trainer.accelerator", "cpu",
            "--trainer.precision", "32-true", "--trainer.default_root_dir", root, "--data.max_length", "256",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]


def test_fit_checkpoint_resume_predict(tiny_model_dir, tmp_path, demo_records):
    data = write_jsonl(tmp_path / "demo.jsonl", demo_records)
    questions = tmp_path / "questions.txt"
    questions.write_text("Name a fish.\nWhat is the capital of France?\n\nHow do plants make food?\n")
    root = tmp_path / "runs"
    args = tiny_args(tiny_model_dir, data, root, "--data.train_records", "[0, 40]", "--data.val_records", "[40, 48]",
                     "--trainer.val_check_interval", "3", "--checkpoint.every_n_train_steps", "3")
    cli("fit", *args, "--trainer.max_steps", "3")
    run = root / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(run.glob("events.out.tfevents.*"))))
    events.Reload()
    assert {"train/loss", "val/loss", "val/ppl", "train/grad_norm", "train/tokens_per_s",
            "train/time_to_first_step_s", "lr-PagedAdamW32bit"} <= set(events.Tags()["scalars"])
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 3

    cli("fit", *args, "--trainer.max_steps", "6", "--ckpt_path", "last")  # resumes in the same run folder
    assert not (root / "lightning_logs" / "version_1").exists()
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6
    assert any(not torch.equal(resumed["state_dict"][k], first["state_dict"][k]) for k in first["state_dict"])

    out = tmp_path / "answers.jsonl"
    cli("predict", *args, "--data.predict_path", questions, "--ckpt_path", run / "adapter",
        "--model.max_new_tokens", "5", "--predictions.path", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == ["Name a fish.", "What is the capital of France?",
                                                "How do plants make food?"]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(isinstance(r["response"], str) and 0 < r["response_tokens"] <= 5 for r in rows)

    # a Lightning checkpoint works for predict too, and an existing output is never overwritten silently
    with pytest.raises(SystemExit):
        cli("predict", *args, "--data.predict_path", questions, "--ckpt_path", run / "checkpoints" / "last.ckpt",
            "--model.max_new_tokens", "5", "--predictions.path", out)
    assert out.read_text().count("\n") == 3
    cli("predict", *args, "--data.predict_path", questions, "--ckpt_path", run / "checkpoints" / "last.ckpt",
        "--model.max_new_tokens", "5", "--predictions.path", out, "--predictions.overwrite", "true")
    assert out.read_text().count("\n") == 3


@pytest.mark.parametrize("extra,message", [
    (["--data.prompt_style", "vicuna"], "unknown prompt style 'vicuna'"),
    (["--data.path", "missing.jsonl"], "file 'missing.jsonl' does not exist"),
    (["--data.path", "notes.xml"], "unsupported extension '.xml'"),
    (["--model.lora_target_modules", "[qkv]"], "match no module"),
    (["--ckpt_path", "nowhere.ckpt"], "'nowhere.ckpt' does not exist"),
    (["--ckpt_path", "last"], "no last.ckpt under"),
])
def test_bad_input_one_clear_error(tiny_model_dir, tmp_path, demo_records, capsys, extra, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "notes.xml" in extra:
        (tmp_path / "notes.xml").write_text("<a/>")
    data = write_jsonl(tmp_path / "demo.jsonl", demo_records)
    err = fails(capsys, "fit", *tiny_args(tiny_model_dir, data, tmp_path / "runs", "--trainer.max_steps", "1"),
                *extra)
    assert message in err and "Traceback" not in err
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # nothing half-written


def test_malformed_line_stops_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "response": "b"}, '{"instruction": '])
    err = fails(capsys, "fit", *tiny_args(tiny_model_dir, data, tmp_path / "runs", "--trainer.max_steps", "1"))
    assert "bad.jsonl:2: malformed JSON" in err and "Loaded" not in err


def test_unknown_option_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lit_mistral", "fit", "--model.no_such_option", "1"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "no_such_option" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_config_end_to_end(smollm2_gguf, tmp_path):
    """The README's demo: the real SmolLM2-135M from the GGUF file, NF4, LoRA, on the shipped records; then predict
    with the adapter it wrote (short runs here)."""
    root = tmp_path / "demo"
    common = ["--config", ROOT / "configs" / "demo.yaml", "--trainer.default_root_dir", root,
              "--trainer.enable_progress_bar", "false"]
    cli("fit", *common, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--data.val_records", "[56, 58]")
    run = root / "lightning_logs" / "version_0"
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["peft_type"] == "LORA"
    cli("predict", *common, "--ckpt_path", run / "adapter", "--model.max_new_tokens", "8")
    rows = [json.loads(line) for line in (root / "lightning_logs" / "version_1" / "predictions.jsonl").open()]
    assert len(rows) == 8 and all(r["response"] for r in rows)
