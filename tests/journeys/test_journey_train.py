"""Journey: training as users run it through the command line: fit -> checkpoint -> resume -> predict, the base
comparison, bad input on validate and fit, and the README's demo on the real SmolLM2."""

import json

import pytest
import torch
from conftest import ROOT, cli_args, cli_fails, run_cli, tensorboard, write_jsonl


def test_fit_checkpoint_resume_predict(tiny_model_dir, tmp_path, demo_records):
    data = write_jsonl(tmp_path / "demo.jsonl", demo_records)
    questions = tmp_path / "questions.txt"
    questions.write_text("Name a fish.\nWhat is the capital of France?\n\nHow do plants make food?\n")
    root = tmp_path / "runs"

    def args(subcommand, *extra):
        return cli_args(subcommand, tiny_model_dir, root, "--data.train_records", "[0, 40]", "--data.val_records",
                        "[40, 48]", "--trainer.val_check_interval", "3", "--checkpoint.every_n_train_steps", "3",
                        *extra, data=data)

    run_cli(*args("fit", "--trainer.max_steps", "3"))
    run = root / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(run.glob("events.out.tfevents.*"))))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/ppl", "train/grad_norm", "train/tokens_per_s",
            "train/time_to_first_step_s"} <= tags and any(t.startswith("lr-") for t in tags), tags
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 3

    run_cli(*args("fit", "--trainer.max_steps", "6", "--ckpt_path", "last"))  # resumes in the same run folder
    assert not (root / "lightning_logs" / "version_1").exists()
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6
    assert any(not torch.equal(resumed["state_dict"][k], first["state_dict"][k]) for k in first["state_dict"])

    out = tmp_path / "answers.jsonl"
    run_cli(*args("predict", "--data.predict_path", questions, "--ckpt_path", run / "adapter",
                  "--model.generation.max_new_tokens", "5", "--predictions.path", out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == ["Name a fish.", "What is the capital of France?",
                                                "How do plants make food?"]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(isinstance(r["response"], str) and 0 < r["response_tokens"] <= 5 for r in rows)

    # a Lightning checkpoint works for predict too, and an existing output is never overwritten silently
    with pytest.raises(SystemExit):
        run_cli(*args("predict", "--data.predict_path", questions, "--ckpt_path", run / "checkpoints" / "last.ckpt",
                      "--model.generation.max_new_tokens", "5", "--predictions.path", out))
    assert out.read_text().count("\n") == 3
    run_cli(*args("predict", "--data.predict_path", questions, "--ckpt_path", run / "checkpoints" / "last.ckpt",
                  "--model.generation.max_new_tokens", "5", "--predictions.path", out,
                  "--predictions.overwrite", "true"))
    assert out.read_text().count("\n") == 3


def test_fit_compares_with_the_base_and_validate_reproduces_it(tiny_model_dir, tmp_path, demo_records):
    """`fit --evaluation.compare_base true` ends with base vs fine-tuned on the validation split, in the run folder and
    its TensorBoard run; `validate` with the adapter (and without it: the base) gives the same numbers."""
    data = write_jsonl(tmp_path / "demo.jsonl", demo_records)
    root = tmp_path / "runs"

    def args(subcommand, *extra):
        return cli_args(subcommand, tiny_model_dir, root, "--data.train_records", "[0, 40]", "--data.val_records",
                        "[40, 52]", "--model.optimization.learning_rate", "0.01", "--evaluation.max_examples", "5",
                        "--evaluation.max_new_tokens", "4", *extra, data=data)

    run_cli(*args("fit", "--trainer.max_steps", "4", "--trainer.val_check_interval", "1",
                  "--evaluation.sample_every_n_val", "2", "--evaluation.num_samples", "2",
                  "--evaluation.compare_base", "true"))
    run = root / "lightning_logs" / "version_0"
    report = json.loads((run / "evaluation.json").read_text())
    base, tuned = report["metrics"]["base"], report["metrics"]["fine-tuned"]
    assert report["adapter"] == str(run / "adapter") and report["global_step"] == 4
    assert tuned["loss"] < base["loss"]
    assert report["counts"]["all"] == {"loss": 12, "generation": 5} and report["val_examples"] == 12
    assert {"rougeL", "exact_match", "contains", "closed_qa/loss", "closed_qa/rougeL"} <= set(tuned)
    assert len(report["examples"]) == 5 and all(e["fine-tuned"]["response_tokens"] <= 4 for e in report["examples"])
    markdown = (run / "evaluation.md").read_text()
    assert "| category | n | metric | base | fine-tuned | change |" in markdown
    scalars, texts = tensorboard(run)
    # 4 validations (Lightning logs them at the count of steps before), then the comparison at the last step
    assert [step for step, _ in scalars["val/loss"]] == [0, 1, 2, 3, 4]
    assert scalars["val_base/loss"] == [(4, pytest.approx(base["loss"]))]
    assert scalars["val/rougeL"] == [(4, pytest.approx(tuned["rougeL"]))]  # generation metrics: not during fit
    assert [step for step, _ in texts["samples/0"]] == [2, 4] and "**Step 4**" in texts["samples/1"][1][1]
    assert texts["evaluation"] == [(4, markdown)]

    run_cli(*args("validate", "--ckpt_path", run / "adapter", "--evaluation.compare_base", "true"))
    again = json.loads((root / "lightning_logs" / "version_1" / "evaluation.json").read_text())
    assert again["metrics"]["fine-tuned"] == pytest.approx(tuned, rel=1e-4)
    assert again["metrics"]["base"] == pytest.approx(base, rel=1e-4)
    run_cli(*args("validate"))  # fresh adapters change nothing: this is the base
    alone = json.loads((root / "lightning_logs" / "version_2" / "evaluation.json").read_text())
    assert alone["adapter"] is None and alone["metrics"]["model"] == pytest.approx(base, rel=1e-4)


@pytest.mark.parametrize("extra,message", [
    (["--evaluation.compare_base", "true"], "there is no adapter to compare with the base model"),
    (["--data.val_path", "refs.jsonl"], "refs.jsonl:2: field 'response' is missing"),
    (["--data.val_records", "[100, 120]"], "data.val_records=[100, 120] selects nothing: "),
    ([], "validate: there is no validation data"),
    (["--evaluation.max_examples", "-1", "--evaluation.max_new_tokens", "0"],
     "evaluation.max_new_tokens=0: expected >= 1\n  evaluation.max_examples=-1: expected >= 0"),
])
def test_validate_bad_input_one_clear_error(tiny_model_dir, tmp_path, demo_records, capsys, extra, message,
                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "refs.jsonl", [{"instruction": "Name a fish.", "response": "Tope"},
                                          {"instruction": "Name a bird."}])
    data = write_jsonl(tmp_path / "demo.jsonl", demo_records)
    err = cli_fails(capsys, *cli_args("validate", tiny_model_dir, tmp_path / "runs", *extra, data=data))
    assert message.replace("\\n", "\n") in err and "Traceback" not in err
    assert not list((tmp_path / "runs").rglob("evaluation.*"))


@pytest.mark.parametrize("extra,message", [
    (["--data.prompt_style", "vicuna"], "unknown prompt style 'vicuna'"),
    (["--data.path", "missing.jsonl"], "file 'missing.jsonl' does not exist"),
    (["--data.path", "notes.xml"], "unsupported extension '.xml'"),
    (["--model.lora.target_modules", "[qkv]"], "match no module"),
    (["--ckpt_path", "nowhere.ckpt"], "'nowhere.ckpt' does not exist"),
    (["--ckpt_path", "last"], "no last.ckpt under"),
])
def test_bad_input_one_clear_error(tiny_model_dir, tmp_path, demo_records, capsys, extra, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "notes.xml" in extra:
        (tmp_path / "notes.xml").write_text("<a/>")
    data = write_jsonl(tmp_path / "demo.jsonl", demo_records)
    err = cli_fails(capsys, *cli_args("fit", tiny_model_dir, tmp_path / "runs", "--trainer.max_steps", "1", *extra,
                                      data=data))
    assert message in err and "Traceback" not in err
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # nothing half-written


def test_malformed_line_stops_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "response": "b"}, '{"instruction": '])
    err = cli_fails(capsys, *cli_args("fit", tiny_model_dir, tmp_path / "runs", "--trainer.max_steps", "1", data=data))
    assert "bad.jsonl:2: malformed JSON" in err and "Loaded" not in err


def demo(config: str, root) -> list:
    """The options of a run of `configs/<config>.yaml` writing under `root`."""
    return ["--config", ROOT / "configs" / f"{config}.yaml", "--trainer.default_root_dir", root,
            "--trainer.enable_progress_bar", "false"]


def predict_with_the_adapter(config: str, root, answers: int) -> list[dict]:
    """Predict on the config's questions with the adapter of the run in `root`; the rows, `answers` of them."""
    run_cli("predict", *demo(config, root), "--ckpt_path", root / "lightning_logs" / "version_0" / "adapter",
            "--model.generation.max_new_tokens", "8")
    rows = [json.loads(line) for line in (root / "lightning_logs" / "version_1" / "predictions.jsonl").open()]
    assert len(rows) == answers and all(r["response"] for r in rows)
    return rows


@pytest.mark.slow
def test_demo_fine_tune_lowers_validation_loss_then_predicts(smollm2_gguf, tmp_path):
    """The README's demo: the real SmolLM2-135M-Instruct from the GGUF file, NF4, LoRA, on the shipped records: a
    few steps lower the response loss on held-out records below the base model's, measured by the end-of-fit
    comparison; then predict with the adapter it wrote."""
    root = tmp_path / "demo"
    run_cli("fit", *demo("demo", root), "--trainer.max_steps", "8", "--trainer.val_check_interval", "14",
            "--data.max_length", "192", "--model.optimization.learning_rate", "0.002", "--evaluation.compare_base",
            "true", "--evaluation.max_examples", "2", "--evaluation.max_new_tokens", "8")
    run = root / "lightning_logs" / "version_0"
    report = json.loads((run / "evaluation.json").read_text())
    base, tuned = report["metrics"]["base"], report["metrics"]["fine-tuned"]
    assert report["global_step"] == 8 and report["counts"]["all"] == {"loss": 8, "generation": 2}
    assert tuned["loss"] < base["loss"] - 0.1, (base["loss"], tuned["loss"])
    assert all(e["fine-tuned"]["response"] and e["base"]["response"] for e in report["examples"])
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["peft_type"] == "LORA"
    predict_with_the_adapter("demo", root, answers=8)


@pytest.mark.slow
def test_demo_chat_config_end_to_end(smollm2_gguf, tmp_path):
    """The README's demo on conversations, with the model's own chat template (a short run here); predict answers
    the last user turn and keeps the conversation."""
    root = tmp_path / "demo"
    run_cli("fit", *demo("demo-chat", root), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            "--data.val_records", "[49, 51]")
    rows = predict_with_the_adapter("demo-chat", root, answers=6)
    assert all(r["messages"][-1]["role"] == "user" for r in rows)
