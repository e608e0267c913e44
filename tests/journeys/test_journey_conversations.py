"""Journey: multi-turn conversations through the command line: fit (packed), resumed exactly, predict that answers
the next assistant turn and keeps the messages, and resumes."""

import json

import torch
from conftest import cli_args, demo_conversations, run_cli, write_jsonl


def test_fit_resume_and_predict_on_conversations(tiny_model_dir, tmp_path, demo_records):
    data = write_jsonl(tmp_path / "chat.jsonl", demo_conversations(demo_records, 24))
    questions = write_jsonl(tmp_path / "questions.jsonl", [
        {"messages": [{"role": "user", "content": demo_records[0]["instruction"]}]},
        {"messages": [{"role": "user", "content": demo_records[1]["instruction"]},
                      {"role": "assistant", "content": demo_records[1]["response"]},
                      {"role": "user", "content": demo_records[2]["instruction"]}]}])

    def args(root, *extra):
        return cli_args("fit", tiny_model_dir, root, "--data.prompt_style", "chat_template", "--data.packing", "true",
                        "--data.max_tokens", "512", "--data.overlong", "truncate", "--data.train_records", "[0, 20]",
                        "--data.val_records", "[20, 24]", "--trainer.val_check_interval", "2",
                        "--checkpoint.every_n_train_steps", "2", "--model.optimization.learning_rate", "5e-3",
                        "--model.optimization.lr_scheduler", "constant",  # the same rates stopped at 2 of 4 or not
                        *extra,
                        data=data)

    run_cli(*args(tmp_path / "straight", "--trainer.max_steps", "4"))
    run_cli(*args(tmp_path / "resumed", "--trainer.max_steps", "2"))
    run_cli(*args(tmp_path / "resumed", "--trainer.max_steps", "4", "--ckpt_path", "last"))
    runs = {name: tmp_path / name / "lightning_logs" / "version_0" for name in ("straight", "resumed")}
    ends = {name: torch.load(run / "checkpoints" / "last.ckpt", weights_only=True) for name, run in runs.items()}
    assert ends["straight"]["global_step"] == ends["resumed"]["global_step"] == 4
    for name, value in ends["straight"]["state_dict"].items():  # LoRA dropout on: the random state resumed too
        assert torch.equal(value, ends["resumed"]["state_dict"][name]), name

    out = tmp_path / "answers.jsonl"
    predict = cli_args("predict", tiny_model_dir, tmp_path / "predict", "--data.prompt_style", "chat_template",
                       "--data.predict_path", questions, "--ckpt_path", runs["straight"] / "adapter",
                       "--model.generation.max_new_tokens", "4", "--predictions.path", out)
    run_cli(*predict)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    asked = [json.loads(line)["messages"] for line in questions.read_text().splitlines()]
    assert [r["messages"] for r in rows] == asked
    assert [r["instruction"] for r in rows] == [demo_records[0]["instruction"], demo_records[2]["instruction"]]
    assert all(0 < r["response_tokens"] <= 4 for r in rows)
    # an interrupted run resumes by the messages: the kept row stays, the missing one is generated
    out.write_text(json.dumps(rows[1]) + "\n")
    run_cli(*predict, "--predictions.resume", "true")
    assert [json.loads(line) for line in out.read_text().splitlines()][1] == rows[1]
