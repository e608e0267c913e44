"""Journey: bad input through the command line: every bad record and every incompatible setting stops the run before the
model loads, with one message naming the file and line (or the option) and the fix, and exit status 2."""

import json

import pytest
import torch
from conftest import cli_args, cli_fails, run_cli, write_jsonl

from lit_mistral.module import QLoRAModule

GOOD = {"instruction": "Name a fish.", "context": "", "response": "A trout."}


@pytest.fixture
def model_must_not_load(monkeypatch):
    """Every case here must stop before the (expensive) model load; loading it fails the test."""
    monkeypatch.setattr(QLoRAModule, "configure_model", lambda self: pytest.fail("the model was loaded"))


def args(subcommand, tiny_model_dir, tmp_path, *extra) -> list[str]:
    return cli_args(subcommand, tiny_model_dir, tmp_path / "runs", "--trainer.max_steps", "1", *extra)


def line(record) -> str:
    return record if isinstance(record, str) else json.dumps(record)


# (case, training file name, its content: records/lines or raw bytes, what the message must say)
BAD_DATA = [
    ("malformed-json", "train.jsonl", [GOOD, '{"instruction": "Name a bird.", "response": '],
     "train.jsonl:2: malformed JSON (Expecting value at column 45)"),
    ("missing-instruction", "train.jsonl", [GOOD, {"response": "A trout."}],
     "train.jsonl:2: field 'instruction' is missing"),
    ("missing-response", "train.jsonl", [GOOD, GOOD, {"instruction": "Name a bird."}],
     "train.jsonl:3: field 'response' is missing"),
    ("null-response", "train.jsonl", [{"instruction": "Name a bird.", "response": None}, GOOD],
     "train.jsonl:1: field 'response' is null"),
    ("instruction-not-string", "train.jsonl", [GOOD, {"instruction": 42, "response": "y"}],
     "train.jsonl:2: field 'instruction' must be a string, got int ('42')"),
    ("response-not-string", "train.jsonl", [GOOD, {"instruction": "x", "response": ["a", "b"]}],
     "train.jsonl:2: field 'response' must be a string, got list"),
    ("context-not-string", "train.jsonl", [GOOD, {"instruction": "x", "context": {"a": 1}, "response": "y"}],
     "train.jsonl:2: field 'context' must be a string, got dict"),
    ("empty-instruction", "train.jsonl", [GOOD, {"instruction": " \t", "response": "y"}],
     "train.jsonl:2: field 'instruction' is empty"),
    ("empty-response", "train.jsonl", [GOOD, {"instruction": "x", "response": ""}],
     "train.jsonl:2: field 'response' is empty"),
    ("not-an-object", "train.jsonl", [GOOD, '["Name a fish.", "A trout."]'],
     "train.jsonl:2: expected a JSON object with an 'instruction' field, got list"),
    ("undecodable-bytes", "train.jsonl",
     json.dumps(GOOD).encode() + b'\n{"instruction": "Caf\xe9?", "response": "y"}\n',
     "train.jsonl:2: not valid UTF-8 (byte 0xe9 at column 21)"),
    ("json-malformed", "train.json", '[{"instruction": "x",\n  "response": }]',
     "train.json:2: malformed JSON (Expecting value at column 15)"),
    ("json-not-a-list", "train.json", json.dumps(GOOD), "train.json: expected a JSON list of records, got a dict"),
    ("no-records", "train.jsonl", "\n\n", "holds no usable records"),
    ("several-at-once", "train.jsonl", [{"response": "y"}, GOOD, "{", {"instruction": "x", "response": 3}],
     "3 problems found:\n  {dir}/train.jsonl:3: malformed JSON (Expecting property name enclosed in double quotes at "
     "column 2)\n  {dir}/train.jsonl:1: field 'instruction' is missing\n  {dir}/train.jsonl:4: field 'response' "
     "must be a string, got int ('3')"),
]


@pytest.mark.parametrize("case,name,content,message", BAD_DATA, ids=[c[0] for c in BAD_DATA])
@pytest.mark.usefixtures("model_must_not_load")
def test_bad_training_data_stops_before_the_model_loads(tiny_model_dir, tmp_path, capsys, case, name, content,
                                                        message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        write_jsonl(path, [line(r) for r in content])
    err = cli_fails(capsys, *args("fit", tiny_model_dir, tmp_path, "--data.path", path))
    assert message.format(dir=tmp_path) in err
    if case not in ("no-records", "json-not-a-list", "json-malformed"):  # whole-file problems: nothing to skip
        assert "Fix: correct these records, or set --data.skip_invalid true to leave them out." in err
    assert not list((tmp_path / "runs").glob("lightning_logs/*"))  # a failed run leaves no (empty) run folder


@pytest.mark.usefixtures("model_must_not_load")
def test_bad_validation_and_predict_files_are_named(tiny_model_dir, tmp_path, capsys, demo_records):
    train = write_jsonl(tmp_path / "train.jsonl", demo_records[:8])
    val = write_jsonl(tmp_path / "val.jsonl", [GOOD, {"instruction": "x"}])
    err = cli_fails(capsys, *args("fit", tiny_model_dir, tmp_path, "--data.path", train, "--data.val_path", val))
    assert f"{val}:2: field 'response' is missing" in err
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"instruction": "Name a fish."}, {"context": "no question"}])
    err = cli_fails(capsys, *args("predict", tiny_model_dir, tmp_path, "--data.path", train,
                    "--data.predict_path", questions))
    assert f"{questions}:2: field 'instruction' is missing" in err


def test_skip_invalid_leaves_bad_records_out_and_counts_them(tiny_model_dir, tmp_path, demo_records):
    records = [line(r) for r in demo_records[:8]]
    records[1] = "{not json"
    records[4] = json.dumps({"response": 5})  # two problems, one record
    records[6] = json.dumps({"instruction": "x", "response": " "})
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.warns(UserWarning, match=r"data.path: skipped 3 invalid record\(s\) of 8 in .*train.jsonl "
                                         r"\(data.skip_invalid=true\): .*train.jsonl:2: malformed JSON"):
        run_cli(*args("fit", tiny_model_dir, tmp_path, "--data.path", path, "--data.skip_invalid", "true",
                      "--data.batch_size", "5"))
    last = torch.load(tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                      weights_only=True)
    assert last["global_step"] == 1  # and the run went on without them


# (case, options or a YAML config, what the message must say): none of these gets past the parsed config
BAD_SETTINGS = [
    ("unknown-option", ["--model.lora.rank", "4"],
     "command line: --model.lora.rank is not an option; did you mean --model.lora.r?"),
    ("renamed-option", ["--model.lora_r", "4", "--model.compare_base", "true"],
     "options renamed when the settings were grouped:\n  --model.lora_r is now --model.lora.r\n  "
     "--model.compare_base is now --evaluation.compare_base\nFix: use the new names"),
    ("renamed-key-in-yaml", {"model": {"quantize": "nf4"}}, "model.quantize is now model.quantization.method"),
    ("unknown-key-in-yaml", {"model": {"lora_rank": 4}},
     "config.yaml:2: 'model.lora_rank' is not an option; did you mean 'model.lora.r'?"),
    ("malformed-yaml", "model:\n  lora: [r: 4\n", "config.yaml:3:1: malformed YAML (while parsing a flow sequence; "
                                                   "expected ',' or ']', but got '<stream end>'). Fix: correct it"),
    ("wrong-type", ["--model.lora.r", "eight"], 'command line: Parser key "model.lora.r": Expected a '
                                                 "<class 'int'>. Got value: eight"),
    ("wrong-type-in-yaml", {"data": {"batch_size": "four"}}, 'config.yaml:2: Parser key "data.batch_size": '
                                                              "Expected a <class 'int'>. Got value: four"),
    ("not-a-choice", ["--model.optimization.nonfinite", "ignore"], 'Parser key "model.optimization.nonfinite"'),
    ("out-of-range", ["--model.lora.dropout", "1.5"], "model.lora.dropout=1.5: expected 0 <= dropout < 1"),
    ("fp16-compute-with-4bit", ["--model.compute.dtype", "float16"],
     "model.compute.dtype=float16 with 4-bit weights overflows in LoRA training; use bfloat16"),
    ("fp16-precision-with-4bit", ["--trainer.precision", "16-mixed"],
     "trainer.precision=16-mixed with model.quantization.method=nf4: float16 matmuls on a 4-bit base overflow in "
     "LoRA training (NaN losses, often thousands of steps in; the reason model.compute.dtype=float16 is refused too). "
     "Fix: --trainer.precision bf16-mixed on GPUs with bfloat16 (Ampere or newer), 32-true with --model.compute.dtype "
     "float32 on older ones, or --model.quantization.method null."),
    ("fp16-weights-with-adamw", ["--trainer.precision", "16-true", "--model.quantization.method", "null",
                                 "--model.optimization.optimizer", "adamw"],
     "trainer.precision=16-true with model.optimization.optimizer=adamw: torch's AdamW on float16 LoRA weights adds "
     "eps=1e-8, "
     "which is 0 in float16, so 0/0 turns the adapters NaN at the second step. Fix: --trainer.precision bf16-mixed "
     "or 16-mixed (float32 adapters), or a bitsandbytes optimizer (paged_adamw_32bit keeps its state in float32)."),
    ("liger-on-cpu", ["--model.compute.kernels", "liger"],
     "model.compute.kernels=liger: Liger's Triton kernels run on CUDA GPUs only. Fix: set --model.compute.kernels null "
     "on this machine."),
    ("unknown-strategy", ["--trainer.strategy", "fsdp2", "--trainer.devices", "2"],
     "trainer settings: You selected an invalid strategy name: `strategy='fsdp2'`"),
    ("lightning-fsdp", ["--trainer.strategy", "fsdp", "--trainer.devices", "2"],
     "trainer.strategy=fsdp: Lightning's FSDP cannot shard a QLoRA model (it flattens the 4-bit weights and the "
     "float32 adapters of a layer into one tensor, and casts the packed 4-bit storage). Fix: --trainer.strategy "
     "fsdp_qlora (configs/qlora-fsdp.yaml)."),
    ("fsdp-with-uint8-storage", ["--trainer.strategy", "fsdp_qlora", "--model.quantization.storage", "uint8"],
     "model.quantization.storage=uint8 with trainer.strategy=fsdp_qlora: FSDP flattens a layer's weights into one "
     "tensor of one dtype. Fix: --model.quantization.storage auto (the compute dtype)."),
    ("fsdp-bf16-true", ["--trainer.strategy", "fsdp_qlora", "--trainer.precision", "bf16-true"],
     "trainer.precision=bf16-true with trainer.strategy=fsdp_qlora: supported are bf16-mixed (GPUs) and 32-true."),
    ("overlapping-records", ["--data.train_records", "[0, 10]", "--data.val_records", "[5, 15]"],
     "data.train_records=[0, 10] and data.val_records=[5, 15] overlap"),
    # settings Lightning or torch refuse only once the model is loaded (or with a traceback)
    ("val-check-interval-above-the-batches", ["--data.train_records", "[0, 8]", "--data.val_records", "[8, 16]",
                                              "--trainer.val_check_interval", "5"],
     "trainer.val_check_interval=5 is more than the 2 training batches of an epoch (8 examples). Fix: "
     "--trainer.val_check_interval 2 or less, --trainer.check_val_every_n_epoch null to count batches across epochs, "
     "or more training records."),
    ("negative-num-workers", ["--data.num_workers", "-1"], "data.num_workers=-1: expected >= 0"),
    ("validate-every-0-epochs", ["--trainer.check_val_every_n_epoch", "0"],
     "trainer.check_val_every_n_epoch=0: expected >= 1"),
    ("checkpoint-every-negative-steps", ["--checkpoint.every_n_train_steps", "-1"],
     "callback settings: Invalid value for every_n_train_steps=-1. Must be >= 0. Fix: change the --checkpoint.*"),
    ("monitor-typo", ["--checkpoint.monitor", "val/lossx", "--data.val_records", "[8, 16]"],
     "checkpoint.monitor=val/lossx: a fit logs no such metric"),
    ("monitor-without-validation", ["--checkpoint.monitor", "val/loss"],
     "checkpoint.monitor=val/loss: there is no validation data, so it is never logged."),
]


@pytest.mark.parametrize("case,settings,message", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
@pytest.mark.usefixtures("model_must_not_load")
def test_bad_settings_stop_before_the_model_loads(tiny_model_dir, tmp_path, capsys, demo_records, case, settings,
                                                  message):
    data = write_jsonl(tmp_path / "train.jsonl", demo_records[:16])
    if isinstance(settings, (dict, str)):  # a YAML config: its settings, or its text
        import yaml

        config = tmp_path / "config.yaml"
        config.write_text(settings if isinstance(settings, str) else yaml.safe_dump(settings))
        settings = ["--config", config]
    err = cli_fails(capsys, *args("fit", tiny_model_dir, tmp_path, "--data.path", data, *settings))
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.usefixtures("model_must_not_load")
def test_gpu_asked_for_on_a_machine_without_one(tiny_model_dir, tmp_path, capsys, demo_records):
    data = write_jsonl(tmp_path / "train.jsonl", demo_records[:16])
    err = cli_fails(capsys, *args("fit", tiny_model_dir, tmp_path, "--data.path", data, "--trainer.accelerator",
                    "gpu", "--trainer.precision", "bf16-mixed"))
    assert "trainer.accelerator=gpu: no CUDA GPU is usable (" in err
    assert "Fix: install a CUDA build of torch, or run on the CPU with --trainer.accelerator cpu" in err


@pytest.mark.usefixtures("model_must_not_load")
def test_quantization_on_a_gpu_needs_bitsandbytes_with_cuda(tiny_model_dir, tmp_path, capsys, demo_records,
                                                            monkeypatch):
    """A CUDA machine whose bitsandbytes loaded only its CPU library (a build for another CUDA version)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("lit_mistral.checks.bitsandbytes_has_cuda", lambda: False)
    data = write_jsonl(tmp_path / "train.jsonl", demo_records[:16])
    err = cli_fails(capsys, *args("fit", tiny_model_dir, tmp_path, "--data.path", data, "--trainer.accelerator",
                    "gpu", "--trainer.precision", "bf16-mixed"))
    assert ("model.quantization.method=nf4 and model.optimization.optimizer=paged_adamw_32bit on a GPU need "
            "bitsandbytes' CUDA library, but it loaded its CPU one") in err
    assert "--model.quantization.method null --model.optimization.optimizer adamw" in err


def test_trust_remote_code_is_off_unless_turned_on(capsys):
    import inspect

    import yaml

    from lit_mistral.data.datamodule import InstructionDataModule
    from lit_mistral.sources import load_tokenizer

    with pytest.raises(SystemExit):
        run_cli("fit", "--print_config")
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["trust_remote_code"] is False
    assert "trust_remote_code" not in config["data"]  # the tokenizer follows the model's setting (linked)
    for function in (QLoRAModule, InstructionDataModule, load_tokenizer):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False


def test_predict_never_replaces_an_existing_output(tiny_model_dir, tmp_path, capsys):
    questions = tmp_path / "questions.txt"
    questions.write_text("Name a fish.\n")
    out = tmp_path / "answers.jsonl"
    out.write_text("earlier answers\n")
    err = cli_fails(capsys, *args("predict", tiny_model_dir, tmp_path, "--data.predict_path", questions,
                    "--predictions.path", out, "--model.generation.max_new_tokens", "2"))
    assert (f"predictions.path: '{out}' exists. Fix: pass --predictions.resume true to finish an interrupted run, "
            "--predictions.overwrite true to replace it, or choose another path.") in err
    assert out.read_text() == "earlier answers\n"


@pytest.mark.parametrize("subcommand", ["validate", "predict", "export"])
@pytest.mark.usefixtures("model_must_not_load")
def test_ckpt_path_last_without_a_checkpoint_never_runs_without_the_adapter(tiny_model_dir, tmp_path, capsys,
                                                                            subcommand):
    questions = tmp_path / "questions.txt"
    questions.write_text("Name a fish.\n")
    (tmp_path / "runs" / "lightning_logs" / "version_0").mkdir(parents=True)  # a run that wrote no checkpoint
    err = cli_fails(capsys, *args(subcommand, tiny_model_dir, tmp_path, "--ckpt_path", "last",
                                  "--data.predict_path", questions, "--data.val_records", "[0, 4]"))
    assert (f"{subcommand} --ckpt_path last: no last.ckpt under {tmp_path / 'runs' / 'lightning_logs'}/. Fix: pass "
            "the `adapter` folder or a .ckpt file of a fit run, or set --trainer.default_root_dir") in err


@pytest.mark.parametrize("subcommand,content,message", [
    ("predict", bytes(range(256)) * 12, "x.ckpt is not a whole zip archive, as torch.save writes"),
    ("fit", b"", "x.ckpt is empty, so not a checkpoint"),
    ("export", None, "x.ckpt: holds pickled Python objects (io.open)"),
])
@pytest.mark.usefixtures("model_must_not_load")
def test_unreadable_checkpoint_is_one_error_before_lightning_reads_it(tiny_model_dir, tmp_path, capsys, subcommand,
                                                                      content, message):
    ckpt, marker = tmp_path / "x.ckpt", tmp_path / "code-ran"
    if content is None:
        class Opener:
            def __reduce__(self):
                return open, (str(marker), "w")

        torch.save({"state_dict": {}, "lit_mistral": {}, "payload": Opener()}, ckpt)
    else:
        ckpt.write_bytes(content)
    questions = tmp_path / "questions.txt"
    questions.write_text("Name a fish.\n")
    err = cli_fails(capsys, *args(subcommand, tiny_model_dir, tmp_path, "--ckpt_path", ckpt,
                                  "--data.predict_path", questions))
    assert message in err and "weights_only" not in err and not marker.exists()


@pytest.mark.usefixtures("model_must_not_load")
def test_checkpoint_trained_with_other_settings_stops_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    from lit_mistral.config import LoRA

    record = {"name_or_path": str(tiny_model_dir), "gguf_file": None, "quantize": "nf4",
              "lora": LoRA(r=4).peft_kwargs()}
    torch.save({"state_dict": {}, "lit_mistral": record}, tmp_path / "other.ckpt")
    questions = tmp_path / "questions.txt"
    questions.write_text("Name a fish.\n")
    err = cli_fails(capsys, *args("predict", tiny_model_dir, tmp_path, "--ckpt_path", tmp_path / "other.ckpt",
                                  "--data.predict_path", questions))
    assert ("1 problem found:\n  model.lora.r: checkpoint has 4, this run has 8\nFix: run with the settings the "
            "checkpoint was trained with (its run folder holds config.yaml); nothing was loaded yet.") in err


@pytest.mark.parametrize("subcommand", ["predict", "export"])
@pytest.mark.usefixtures("model_must_not_load")
def test_damaged_adapter_folder_stops_before_the_model_loads(tiny_model_dir, adapter_dir, tmp_path, capsys,
                                                             subcommand):
    import shutil

    folder = shutil.copytree(adapter_dir, tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    questions = tmp_path / "questions.txt"
    questions.write_text("Name a fish.\n")
    output = ["--output_dir", tmp_path / "merged"] if subcommand == "export" else ["--data.predict_path", questions]
    err = cli_fails(capsys, *args(subcommand, tiny_model_dir, tmp_path, "--ckpt_path", folder, *output))
    assert f"{weights} cannot be read (" in err and "cut short or damaged. Fix: write the adapter again" in err


# (case, subcommand, options ({dir}: a folder, {file}: a file, both existing), what the message must say)
BAD_OUTPUTS = [
    ("predictions-path-a-folder", "predict", ["--predictions.path", "{dir}"],
     "predictions.path: '{dir}' is a folder. Fix: give the path of a file, e.g. '{dir}/predictions.jsonl'."),
    ("predictions-path-a-folder-overwrite", "predict",
     ["--predictions.path", "{dir}", "--predictions.overwrite", "true"], "predictions.path: '{dir}' is a folder."),
    ("predictions-in-a-read-only-folder", "predict", ["--predictions.path", "/sys/answers.jsonl"],
     "predictions.path: the folder '/sys' is not writable (Permission denied). Fix: choose another path."),
    ("export-into-a-file", "export", ["--output_dir", "{file}"], "export --output_dir: '{file}' is a file."),
    ("export-into-a-read-only-folder", "export", ["--output_dir", "/sys/merged"],
     "export --output_dir: the folder '/sys' is not writable (Permission denied)."),
    ("root-dir-a-file", "fit", ["--trainer.default_root_dir", "{file}"],
     "trainer.default_root_dir: '{file}' cannot be a folder: a file is in the way."),
    ("root-dir-under-a-file", "fit", ["--trainer.default_root_dir", "{file}/runs"],
     "trainer.default_root_dir: '{file}/runs' cannot be a folder (its parent '{file}' is a file)"),
    ("root-dir-read-only", "validate", ["--trainer.default_root_dir", "/sys/runs"],
     "trainer.default_root_dir: '/sys' is not writable (Permission denied)."),
    ("checkpoint-dir-a-file", "fit", ["--checkpoint.dirpath", "{file}"],
     "checkpoint.dirpath: '{file}' cannot be a folder"),
]


@pytest.mark.parametrize("case,subcommand,options,message", BAD_OUTPUTS, ids=[c[0] for c in BAD_OUTPUTS])
@pytest.mark.usefixtures("model_must_not_load")
def test_output_paths_are_checked_before_anything_loads(tiny_model_dir, adapter_dir, tmp_path, capsys, case,
                                                        subcommand, options, message):
    folder, file = tmp_path / "answers", tmp_path / "notes.txt"
    folder.mkdir()
    file.write_text("mine\n")
    questions = tmp_path / "questions.txt"
    questions.write_text("Name a fish.\n")
    extra = {"predict": ["--data.predict_path", questions, "--ckpt_path", adapter_dir],
             "export": ["--ckpt_path", adapter_dir], "validate": ["--data.val_records", "[0, 4]"]}.get(subcommand, [])
    err = cli_fails(capsys, *args(subcommand, tiny_model_dir, tmp_path, *extra,
                                  *[o.format(dir=folder, file=file) for o in options]))
    assert message.format(dir=folder, file=file) in err
    assert file.read_text() == "mine\n" and list(folder.iterdir()) == []


@pytest.mark.parametrize("case", ["overwrite-the-inputs", "overwrite-a-checkpoint", "resume-onto-notes",
                                  "checkpoints-of-another-run"])
@pytest.mark.usefixtures("model_must_not_load")
def test_nothing_replaces_a_file_lit_mistral_did_not_write(tiny_model_dir, adapter_dir, tmp_path, capsys, case):
    questions, notes, ckpts = tmp_path / "questions.jsonl", tmp_path / "notes.txt", tmp_path / "ckpts"
    write_jsonl(questions, [{"instruction": "Name a fish."}, {"instruction": "Name a bird."}])
    notes.write_text("first thought\nsecond thought\n")
    ckpts.mkdir()
    (ckpts / "last.ckpt").write_bytes(b"weights of another run")
    before = {p: p.read_bytes() for p in (questions, notes, ckpts / "last.ckpt")}
    predict = ["--data.predict_path", questions, "--ckpt_path", adapter_dir]
    options, message = {
        "overwrite-the-inputs": (["predict", *predict, "--predictions.path", questions, "--predictions.overwrite",
                                  "true"], f"predictions.overwrite: '{questions}' is not an earlier predictions "
                                           "output"),
        "overwrite-a-checkpoint": (["predict", *predict, "--predictions.path", ckpts / "last.ckpt",
                                    "--predictions.overwrite", "true"], "is not an earlier predictions output"),
        "resume-onto-notes": (["predict", *predict, "--predictions.path", notes, "--predictions.resume", "true"],
                              f"{notes}:1: not a row of predictions. Fix: resume with the same --data.predict_path"),
        "checkpoints-of-another-run": (["fit", "--checkpoint.dirpath", ckpts],
                                       f"checkpoint.dirpath: '{ckpts}' holds the checkpoints of another run"),
    }[case]
    err = cli_fails(capsys, *args(options[0], tiny_model_dir, tmp_path, *options[1:]))
    assert message in err
    assert {p: p.read_bytes() for p in before} == before
