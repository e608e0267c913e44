"""predict as users run it: rows in input order, merged or adapter weights alike, resume, per-row skips."""

import json

import pytest
from conftest import cli_args, run_cli

QUESTIONS = ["Name a fish.", "What is the capital of France and why is it famous among travellers?", "Why?",
             "How do plants make food from sunlight, water and air?", "Say hi."]


def predict(tiny_model_dir, adapter_dir, questions, out, *extra):
    run_cli(*cli_args("predict", tiny_model_dir, questions.parent / "runs", "--model.compute.dtype", "float32",
                      "--data.predict_path", questions, "--model.generation.max_rows", "2", "--ckpt_path", adapter_dir,
                      "--model.generation.max_new_tokens", "6", "--predictions.path", out, *extra))
    return [json.loads(line) for line in out.read_text().split("\n") if line]


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "questions.txt"
    path.write_text("\n".join(QUESTIONS) + "\n")
    return path


def test_rows_in_input_order_and_merged_equals_adapter(tiny_model_dir, adapter_dir, questions, tmp_path):
    merged = predict(tiny_model_dir, adapter_dir, questions, tmp_path / "merged.jsonl",
                     "--model.generation.weights", "merged")
    applied = predict(tiny_model_dir, adapter_dir, questions, tmp_path / "adapter.jsonl",
                      "--model.generation.weights", "adapter")
    assert [r["instruction"] for r in merged] == QUESTIONS and [r["index"] for r in merged] == list(range(5))
    # greedy decoding on the merged weights gives the answers of the 4-bit base + adapter
    assert [r["response"] for r in merged] == [r["response"] for r in applied]
    assert all(r["response_tokens"] == 6 and r["finish"] == "length" for r in merged)


def test_resume_keeps_finished_rows_and_fills_the_rest(tiny_model_dir, adapter_dir, questions, tmp_path):
    out = tmp_path / "answers.jsonl"
    # a generated text may hold U+2028/U+0085, which JSON leaves raw: they must not split rows
    done = {"index": 3, "instruction": QUESTIONS[3], "context": "", "response": "kept\u2028line\x85",
            "prompt_tokens": 1, "response_tokens": 1, "finish": "eos"}
    out.write_text(json.dumps(done, ensure_ascii=False) + "\n" + '{"index": 1, "instruction": "What is')  # killed
    with pytest.raises(SystemExit):  # an existing file is never overwritten silently
        predict(tiny_model_dir, adapter_dir, questions, out)
    rows = predict(tiny_model_dir, adapter_dir, questions, out, "--predictions.resume", "true")
    assert [r["index"] for r in rows] == list(range(5))
    assert rows[3] == done and all(r["response_tokens"] == 6 for i, r in enumerate(rows) if i != 3)


def test_resume_refuses_rows_of_other_inputs(tiny_model_dir, adapter_dir, questions, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    out.write_text(json.dumps({"index": 0, "instruction": "Something else."}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        predict(tiny_model_dir, adapter_dir, questions, out, "--predictions.resume", "true")
    assert exit_info.value.code == 2
    assert "answers.jsonl:1: this row does not belong to the current inputs" in capsys.readouterr().err


def test_prompt_longer_than_the_context_gets_a_skip_record(tiny_model_dir, adapter_dir, tmp_path):
    questions = tmp_path / "q.jsonl"
    long = " ".join(["fish"] * 1030)  # the tiny model's context is 1024 tokens
    questions.write_text(json.dumps({"instruction": "Name a fish."}) + "\n" + json.dumps({"instruction": long}) + "\n")
    rows = predict(tiny_model_dir, adapter_dir, questions, tmp_path / "out.jsonl")
    assert rows[0]["finish"] == "length" and rows[1]["finish"] == "skipped" and rows[1]["response"] is None
    assert "does not fit the model's context of 1024 tokens" in rows[1]["error"]


def test_output_folder_must_exist(tiny_model_dir, adapter_dir, questions, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict(tiny_model_dir, adapter_dir, questions, tmp_path / "missing" / "out.jsonl")
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_training_kernels_stay_out_of_predict(tiny_model_dir, adapter_dir, questions, tmp_path):
    """`kernels: liger` (Liger's Triton kernels, CUDA only) in a config: on a CPU, where fit refuses it, predict
    runs with transformers' own modules (on a GPU generation uses the kernels)."""
    rows = predict(tiny_model_dir, adapter_dir, questions, tmp_path / "out.jsonl", "--model.compute.kernels", "liger")
    assert len(rows) == len(QUESTIONS) and all(r["finish"] == "length" for r in rows)


@pytest.mark.gpu
def test_predict_on_a_gpu(tiny_model_dir, adapter_dir, questions, tmp_path):
    """The GPU path users run: bf16-mixed, the adapter merged into a bf16 copy and kept apart; rows complete and in
    order, and the two agree (greedy; rare bf16 ties aside)."""
    rows = {}
    for weights in ("merged", "adapter"):
        out = tmp_path / f"{weights}.jsonl"
        run_cli(*cli_args("predict", tiny_model_dir, tmp_path / "runs", "--trainer.accelerator", "gpu",
                          "--trainer.precision", "bf16-mixed", "--model.compute.dtype", "bfloat16",
                          "--data.predict_path", questions, "--ckpt_path", adapter_dir,
                          "--model.generation.max_new_tokens", "6", "--model.generation.weights", weights,
                          "--predictions.path", out))
        rows[weights] = [json.loads(line) for line in out.read_text().split("\n") if line]
    assert [r["index"] for r in rows["merged"]] == list(range(len(QUESTIONS)))
    assert all(r["response_tokens"] == 6 for r in rows["merged"] + rows["adapter"])
    same = sum(a["response"] == b["response"] for a, b in zip(rows["merged"], rows["adapter"]))
    assert same >= len(QUESTIONS) - 1, (rows["merged"], rows["adapter"])


def test_continuous_engine_answers_what_static_batches_answer(tiny_model_dir, adapter_dir, tmp_path):
    """Greedy: the continuous-batching engine gives token for token the answers of transformers' generate in static
    batches; inputs may lower their own answer limit (`max_new_tokens` per row, within the settings'); sampling
    with a seed gives the same answers twice."""
    questions = tmp_path / "q.jsonl"
    limits = [None, 2, 9, 1, 4]  # 9: above the settings' 6, so 6
    questions.write_text("".join(json.dumps({"instruction": q, **({"max_new_tokens": n} if n else {})}) + "\n"
                                 for q, n in zip(QUESTIONS, limits)))
    rows = {engine: predict(tiny_model_dir, adapter_dir, questions, tmp_path / f"{engine}.jsonl",
                            "--model.generation.engine", engine) for engine in ("static", "continuous")}
    assert rows["continuous"] == rows["static"]
    assert [r["response_tokens"] for r in rows["continuous"]] == [6, 2, 6, 1, 4]
    sampled = [predict(tiny_model_dir, adapter_dir, questions, tmp_path / f"sampled{i}.jsonl",
                       "--model.generation.do_sample", "true", "--model.generation.seed", "3") for i in range(2)]
    assert sampled[0] == sampled[1] and sampled[0] != rows["continuous"]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A root folder holding one short fit run: (root, its last.ckpt)."""
    from conftest import DEMO_DATA

    root = tmp_path_factory.mktemp("trained")
    run_cli(*cli_args("fit", tiny_model_dir, root, "--data.train_records", "[0, 8]", "--trainer.max_steps", "2",
                      "--model.optimization.learning_rate", "0.05", data=DEMO_DATA))
    return root, root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def test_ckpt_path_last_predicts_with_the_newest_last_checkpoint(tiny_model_dir, trained, questions, tmp_path):
    import yaml

    root, last = trained
    rows = {}
    for ckpt in ("last", last):
        out = tmp_path / f"{'last' if ckpt == 'last' else 'explicit'}.jsonl"
        run_cli(*cli_args("predict", tiny_model_dir, root, "--data.predict_path", questions, "--ckpt_path", ckpt,
                          "--model.generation.max_new_tokens", "4", "--predictions.path", out))
        rows[ckpt] = [json.loads(line) for line in out.read_text().split("\n") if line]
    config = yaml.safe_load((root / "lightning_logs" / "version_1" / "config.yaml").read_text())
    assert config["ckpt_path"] == str(last)  # the run's config names the checkpoint it used
    assert rows["last"] == rows[last] and len(rows["last"]) == len(QUESTIONS)


def test_overwrite_keeps_the_earlier_output_until_the_new_one_is_complete(tiny_model_dir, adapter_dir, questions,
                                                                          tmp_path, monkeypatch):
    """Interrupted midway, `--predictions.overwrite true` leaves the earlier output as it was and the rows it
    finished beside it, in `<path>.partial`, where `--predictions.resume true` continues."""
    from lit_mistral.module import QLoRAModule

    out = tmp_path / "answers.jsonl"
    earlier = json.dumps({"index": 0, "instruction": "An earlier question.", "response": "An earlier answer."}) + "\n"
    out.write_text(earlier)

    def killed_at_the_second_batch(self, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 1:
            raise RuntimeError("killed")

    monkeypatch.setattr(QLoRAModule, "on_predict_batch_start", killed_at_the_second_batch, raising=False)
    with pytest.raises(RuntimeError, match="killed"):  # static batches: the first one's rows are all written
        predict(tiny_model_dir, adapter_dir, questions, out, "--predictions.overwrite", "true",
                "--model.generation.engine", "static")
    assert out.read_text() == earlier
    partial = [json.loads(line) for line in (tmp_path / "answers.jsonl.partial").read_text().split("\n") if line]
    assert len(partial) == 2  # the first batch (of 2) finished
    monkeypatch.undo()
    with pytest.raises(SystemExit):  # the interrupted run is not replaced silently either
        predict(tiny_model_dir, adapter_dir, questions, tmp_path / "answers.jsonl")
    rows = predict(tiny_model_dir, adapter_dir, questions, out, "--predictions.resume", "true")
    assert [r["index"] for r in rows] == list(range(5)) and all(r in rows for r in partial)
    assert not (tmp_path / "answers.jsonl.partial").exists()
    fresh = predict(tiny_model_dir, adapter_dir, questions, tmp_path / "fresh.jsonl")
    assert rows == fresh  # resuming the overwrite gave what an uninterrupted run gives


def test_temperature_zero_is_greedy_on_both_engines(tiny_model_dir, adapter_dir, questions, tmp_path, capsys):
    """`do_sample true --temperature 0` answers greedily (as OpenAI's API and vLLM do), where the engine answered ""
    and transformers' generate failed after the load; a negative temperature is refused before anything loads."""
    greedy = predict(tiny_model_dir, adapter_dir, questions, tmp_path / "greedy.jsonl")
    for engine in ("continuous", "static"):
        rows = predict(tiny_model_dir, adapter_dir, questions, tmp_path / f"{engine}.jsonl",
                       "--model.generation.engine", engine, "--model.generation.do_sample", "true",
                       "--model.generation.temperature", "0")
        assert [r["response"] for r in rows] == [r["response"] for r in greedy], engine
    with pytest.raises(SystemExit) as exit_info:
        predict(tiny_model_dir, adapter_dir, questions, tmp_path / "bad.jsonl", "--model.generation.do_sample", "true",
                "--model.generation.temperature", "-1")
    assert exit_info.value.code == 2
    assert "model.generation.temperature=-1.0: expected >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad.jsonl").exists()


def test_a_second_run_writing_the_same_output_is_refused(tiny_model_dir, adapter_dir, questions, tmp_path, capsys):
    """Another process writing `--predictions.path` (holding its lock) makes a second run stop before it loads or
    writes anything, naming the path; once the first is done, the path is free."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "answers.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from lit_mistral.io import OutputLock; "
                               f"OutputLock({str(out)!r}, 'predictions.path'); print('held', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit) as exit_info:
            predict(tiny_model_dir, adapter_dir, questions, out)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        assert (f"predictions.path: another run is writing {str(out)!r} (process {holder.pid} holds "
                f"{str(out) + '.lock'!r})") in err
        assert not out.exists() and not (tmp_path / "answers.jsonl.partial").exists()
    finally:
        holder.communicate("")
    assert len(predict(tiny_model_dir, adapter_dir, questions, out)) == len(QUESTIONS)
    assert not (tmp_path / "answers.jsonl.lock").exists()


def test_the_output_holds_only_the_rows_this_run_wrote(tiny_model_dir, adapter_dir, questions, tmp_path, monkeypatch,
                                                       caplog):
    """A row that something else appends to the partial file meanwhile is not claimed: the output and the count
    are this run's rows."""
    from lit_mistral.module import QLoRAModule

    out = tmp_path / "answers.jsonl"

    def foreign_row_at_the_second_batch(self, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 1:
            with open(f"{out}.partial", "a") as f:
                f.write(json.dumps({"index": 0, "instruction": "Not ours.", "response": "x"}) + "\n")

    monkeypatch.setattr(QLoRAModule, "on_predict_batch_start", foreign_row_at_the_second_batch, raising=False)
    rows = predict(tiny_model_dir, adapter_dir, questions, out)
    assert [r["instruction"] for r in rows] == QUESTIONS
    assert f"Wrote {len(QUESTIONS)} predictions to {out} ({len(QUESTIONS)} generated now" in caplog.text


def test_resume_with_other_generation_settings_is_refused(tiny_model_dir, adapter_dir, questions, tmp_path, capsys):
    """Each row records the settings that made it; resuming with others stops (exit 2) naming each difference,
    rather than mixing greedy and sampled answers, or answers of two lengths, in one file."""
    out = tmp_path / "answers.jsonl"
    rows = predict(tiny_model_dir, adapter_dir, questions, out)
    assert rows[0]["generation"] == {"max_new_tokens": 6, "do_sample": False}
    with pytest.raises(SystemExit) as exit_info:
        predict(tiny_model_dir, adapter_dir, questions, out, "--predictions.resume", "true",
                "--model.generation.max_new_tokens", "4", "--model.generation.do_sample", "true")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert (f"{out}:1: this row was generated with other settings than this run's:\n"
            "  model.generation.max_new_tokens: the rows have 6, this run 4\n"
            "  model.generation.do_sample: the rows have False, this run True\n"
            "Fix: resume with the settings the rows were made with") in err
    assert predict(tiny_model_dir, adapter_dir, questions, out, "--predictions.resume", "true") == rows


def test_a_huge_input_is_cut_before_tokenizing_and_its_skip_is_said(tiny_model_dir, adapter_dir, tmp_path,
                                                                     monkeypatch, caplog):
    """A prompt longer than the model's context is never answered: its fields are cut there before tokenizing (as
    training records are), so a huge input costs a bounded tokenization, and the console says it was skipped."""
    from transformers import PreTrainedTokenizerFast

    from lit_mistral.data.tokenize import longest_token
    from lit_mistral.sources import load_tokenizer

    questions = tmp_path / "q.jsonl"
    huge = "fish " * 400_000  # 2 MB; the tiny model's context is 1024 tokens
    questions.write_text(json.dumps({"instruction": "Name a fish."}) + "\n" + json.dumps({"instruction": huge}) + "\n")
    longest, call = [0], PreTrainedTokenizerFast.__call__

    def measured(self, text, *args, **kwargs):
        longest[0] = max([longest[0], *(len(t) for t in ([text] if isinstance(text, str) else text))])
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "__call__", measured)
    rows = predict(tiny_model_dir, adapter_dir, questions, tmp_path / "out.jsonl")
    assert longest[0] <= 1025 * longest_token(load_tokenizer(str(tiny_model_dir))) + 100  # + the prompt's own words
    assert rows[1]["instruction"] == huge and rows[1]["finish"] == "skipped"  # the row holds the input as it was
    assert ("the prompt has more than 1024 tokens: it does not fit the model's context of 1024 tokens"
            in rows[1]["error"])
    assert "1 of the 2 rows generated now were skipped, without an answer (finish 'skipped'" in caplog.text


def test_a_cache_too_small_for_the_longest_prompt_is_refused_before_the_load(tiny_model_dir, adapter_dir, questions,
                                                                             tmp_path, capsys):
    """`max_cache_tokens` below what the longest prompt and its answer need is named in its own option, with the
    size that fits, before the model loads; a cache smaller than one block of the engine is no problem."""
    with pytest.raises(SystemExit) as exit_info:
        predict(tiny_model_dir, adapter_dir, questions, tmp_path / "out.jsonl", "--model.generation.max_cache_tokens",
                "10")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and "--predictions.resume" not in err
    assert (f"model.generation.max_cache_tokens=10 holds fewer KV-cache positions than 5 input(s) need; the most, "
            f"28, for {questions}:2 (22 prompt tokens + 6 new). Fix: --model.generation.max_cache_tokens 28 or "
            "more") in err
    assert not (tmp_path / "out.jsonl.partial").exists()
    one = tmp_path / "one.txt"
    one.write_text("Why?\n")
    rows = predict(tiny_model_dir, adapter_dir, one, tmp_path / "one.jsonl",
                   "--model.generation.max_cache_tokens", "12",
                   "--model.generation.max_new_tokens", "2")  # 10 prompt tokens + 2
    assert rows[0]["finish"] == "length" and rows[0]["response_tokens"] == 2


def test_the_progress_bar_counts_rows(tiny_model_dir, adapter_dir, questions, tmp_path, capsys):
    """5 rows in batches of 2 rows: the bar counts the rows (5), not the batches (3)."""
    predict(tiny_model_dir, adapter_dir, questions, tmp_path / "out.jsonl", "--trainer.enable_progress_bar", "true")
    bar = [part for part in capsys.readouterr().out.split("\r") if part.startswith("Predicting")][-1]
    assert bar.startswith("Predicting DataLoader 0: 100%") and "| 5/5 [" in bar, bar


def test_an_adapter_folder_given_as_ckpt_path_is_named_so_in_its_errors(tiny_model_dir, adapter_dir, questions,
                                                                        tmp_path, capsys):
    """--ckpt_path with an adapter folder: its problems say `predict --ckpt_path`, the option the user gave, not
    model.adapter_path, before the load (a folder without adapter_config.json) and after it (a wrong rank)."""
    import shutil

    def fails(folder) -> str:
        with pytest.raises(SystemExit) as exit_info:
            predict(tiny_model_dir, folder, questions, tmp_path / "out.jsonl")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err and "model.adapter_path" not in err, err
        return err

    assert f"predict --ckpt_path: {str(tmp_path)!r} is a folder without adapter_config.json" in fails(tmp_path)
    wrong = shutil.copytree(adapter_dir, tmp_path / "wrong")
    config = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] * 2}))
    wrong_rank = fails(wrong)
    assert f"predict --ckpt_path: {wrong}" in wrong_rank and f"r={config['r'] * 2}" in wrong_rank, wrong_rank
