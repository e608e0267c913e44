"""Journey: what happens when a run fails midway, through the real command line: killed (SIGKILL), terminated (SIGTERM),
out of disk, out of memory; and that the same config and seed repeat a run exactly, the premise of comparing a
resumed run with an uninterrupted one."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA, ROOT, cli_args, popen_with_ctrl_c, run_cli

from lit_mistral.errors import failure_message
from lit_mistral.module import QLoRAModule

STEPS, PAUSE_AT = 8, 3  # 5 batches per epoch: the interruption is mid-epoch and the run crosses an epoch boundary


def fit_args(tiny_model_dir, root, *extra) -> list[str]:
    # LoRA dropout stays on (default 0.05): the RNG state must resume too
    return cli_args("fit", tiny_model_dir, root, "--data.train_records", "[0, 20]", "--data.batch_size", "4",
                    "--model.optimization.learning_rate", "5e-3", "--trainer.max_steps", STEPS,
                    "--checkpoint.every_n_train_steps", "3", *extra, data=DEMO_DATA)


def logged(run: Path, tag: str = "train/loss") -> dict[int, float]:
    """step -> value of `tag` over every TensorBoard event file of a run folder (a resumed run adds one); a step
    logged twice (by the interrupted and by the resumed process) must carry the same value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted(run.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for event in accumulator.Scalars(tag) if tag in accumulator.Tags()["scalars"] else []:
            assert values.setdefault(event.step, event.value) == event.value, f"{tag} at step {event.step} differs"
    return values


def outcome(run: Path) -> dict:
    from safetensors.torch import load_file

    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return {"adapter": load_file(run / "adapter" / "adapter_model.safetensors"), "last_step": last["global_step"],
            "last_state": last["state_dict"], "losses": logged(run), "grad_norms": logged(run, "train/grad_norm")}


def assert_same(run: dict, reference: dict) -> None:
    """Bitwise: same final adapter, same last checkpoint, same logged losses and gradient norms at every step."""
    assert run["losses"] == reference["losses"] and sorted(run["losses"]) == list(range(STEPS))
    assert run["grad_norms"] == reference["grad_norms"]
    assert run["last_step"] == reference["last_step"]
    for key in ("adapter", "last_state"):
        assert run[key].keys() == reference[key].keys()
        for name, value in reference[key].items():
            assert torch.equal(run[key][name], value), name


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> dict:
    """The uninterrupted run."""
    root = tmp_path_factory.mktemp("uninterrupted")
    run_cli(*fit_args(tiny_model_dir, root))
    return outcome(root / "lightning_logs" / "version_0")


def start_paused(tiny_model_dir, root: Path) -> tuple[subprocess.Popen, Path]:
    """`python -m lit_mistral fit` in a subprocess, paused (by tests/harness.py) before the batch that would make
    step PAUSE_AT + 1, i.e. right after the checkpoint of step PAUSE_AT; returns once it is there."""
    process = start_paused_at(fit_args(tiny_model_dir, root), root, "PauseAtStep", step=PAUSE_AT)
    return process, root / "lightning_logs" / "version_0"


def start_paused_at(args: list[str], root: Path, pause: str, **where) -> subprocess.Popen:
    """`python -m lit_mistral *args` in a subprocess (output in `root`/stdout and stderr), paused by tests/harness.py's
    callback `pause` at `where`; returns once it is there."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "paused"
    callback = {"class_path": f"harness.{pause}", "init_args": {**where, "marker": str(marker)}}
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    with open(root / "stdout", "w") as out, open(root / "stderr", "w") as err:
        process = popen_with_ctrl_c([sys.executable, "-m", "lit_mistral", *args,
                                     f"--trainer.callbacks=[{json.dumps(callback)}]"], stdout=out, stderr=err, env=env)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run did not reach {where}:\n{(root / 'stderr').read_text()[-3000:]}")
        time.sleep(0.05)
    return process


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_run(reference, tiny_model_dir, tmp_path):
    run_cli(*fit_args(tiny_model_dir, tmp_path))
    assert_same(outcome(tmp_path / "lightning_logs" / "version_0"), reference)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_the_uninterrupted_run(reference, tiny_model_dir, tmp_path, capsys):
    process, run = start_paused(tiny_model_dir, tmp_path)
    process.send_signal(signal.SIGKILL)  # no handler, no cleanup: as a pre-empted machine or the OOM killer
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == PAUSE_AT
    # everything logged before the kill reached the disk
    assert logged(run) == {step: loss for step, loss in reference["losses"].items() if step < PAUSE_AT}

    capsys.readouterr()
    run_cli(*fit_args(tiny_model_dir, tmp_path, "--ckpt_path", "last", "--trainer.enable_progress_bar", "true"))
    assert not (tmp_path / "lightning_logs" / "version_1").exists()  # continued in the same run folder
    assert_same(outcome(run), reference)
    # the bar goes on from the resumed batch with the epoch's total and the time left, as the uninterrupted run's
    assert re.search(r"Epoch 0: +80%\|[^|]*\| 4/5 \[\d\d:\d\d<\d\d:\d\d", capsys.readouterr().out)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_is_the_uninterrupted_run(reference, tiny_model_dir, tmp_path):
    process, run = start_paused(tiny_model_dir, tmp_path)
    process.send_signal(signal.SIGTERM)  # what a scheduler or a spot instance sends before killing
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    err = (tmp_path / "stderr").read_text()
    assert "Traceback" not in err
    assert f"Received SIGTERM: saved {run / 'checkpoints' / 'last.ckpt'} at step {PAUSE_AT + 1}." in err
    # the whole log of a fit (nf4 and a paged optimizer on the CPU, as configs/demo.yaml) up to a SIGTERM save: no
    # line that a user would read as an error, but the one saying that SIGTERM stopped the run
    alarming = re.compile(r"(?i)fail|error|warn|unreliable|not supported|not resumable|weights_only|could not")
    noisy = [line for line in err.splitlines() if alarming.search(line) and "stopped by SIGTERM" not in line]
    assert not noisy, "\n".join(noisy)
    assert ("lit_mistral: stopped by SIGTERM. A fit run saved last.ckpt on the way out (see the line above): run the "
            "same command with --ckpt_path last to continue.") in err
    # the step in flight finished, then the checkpoint was written: one step past the periodic one (every 3)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == PAUSE_AT + 1

    run_cli(*fit_args(tiny_model_dir, tmp_path, "--ckpt_path", "last"))
    assert_same(outcome(run), reference)


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from lit_mistral import checkpointing

    write, writes = checkpointing._write_durably, []

    def disk_full_from_the_third_write(fd, data):
        writes.append(len(data))
        if len(writes) < 3:
            return write(fd, data)
        with os.fdopen(fd, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    args = fit_args(tiny_model_dir, tmp_path, "--checkpoint.every_n_train_steps", "2", "--trainer.max_steps", "4")
    monkeypatch.setattr(checkpointing, "_write_durably", disk_full_from_the_third_write)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)  # step 2 writes step000002.ckpt and last.ckpt; step 4's first write finds the disk full
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "step000004.ckpt: No space left on device. Fix: free space there" in err
    run = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert sorted(p.name for p in run.iterdir()) == ["last.ckpt", "step000002.ckpt"]  # no half-written file
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 2

    monkeypatch.setattr(checkpointing, "_write_durably", write)  # space freed: continue
    run_cli(*args, "--ckpt_path", "last")
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 4


def test_out_of_memory_gives_the_settings_that_lower_it(tiny_model_dir, tmp_path, monkeypatch, capsys):
    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 23.55 GiB of which 1.02 GiB is free.")

    monkeypatch.setattr(QLoRAModule, "configure_model", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*fit_args(tiny_model_dir, tmp_path))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert ("lit_mistral: error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
            "capacity of 23.55 GiB of which 1.02 GiB is free.). Fix: leave the memory settings to the plan") in err
    for advice in ("--model.compute.keep_dequantized false", "--model.compute.checkpoint_layers",
                   "--model.compute.offload_layers", "--model.compute.offload_inputs",
                   "--model.compute.micro_batch_tokens",
                   "--model.compute.memory_budget_gib", "--trainer.accumulate_grad_batches", "--data.max_length",
                   "No checkpoint was written yet."):
        assert advice in err
    message, _ = failure_message(torch.OutOfMemoryError("CUDA out of memory."), "fit", "/runs/version_0/last.ckpt",
                                 "model.compute plan: 32 of 32 decoder layers recompute, 0 on the GPU; whole batches.")
    assert message.startswith("error: out of GPU memory (CUDA out of memory.). The run's model.compute plan: 32 of 32 "
                              "decoder layers recompute, 0 on the GPU; whole batches. Fix: leave the memory settings")
    assert message.endswith("add --ckpt_path last (/runs/version_0/last.ckpt) to continue.")
    assert not list(tmp_path.glob("lightning_logs/*"))  # the run never started: no run folder


@pytest.mark.slow
def test_sigint_during_fit_names_the_checkpoint_to_continue_from(tiny_model_dir, tmp_path):
    process, run = start_paused(tiny_model_dir, tmp_path)
    process.send_signal(signal.SIGINT)  # Ctrl+C
    assert process.wait(timeout=120) == 128 + signal.SIGINT
    err = (tmp_path / "stderr").read_text()
    assert "Traceback" not in err
    assert f"Interrupted at step {PAUSE_AT}: the newest checkpoint is {run / 'checkpoints' / 'last.ckpt'}." in err
    assert ("lit_mistral: interrupted (Ctrl+C). The checkpoints written so far are intact (see the line above): run "
            "the same command with --ckpt_path last to continue from the newest.") in err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == PAUSE_AT


def predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line]


@pytest.mark.slow
def test_sigterm_stops_predict_after_the_batch_and_resume_finishes_it(tiny_model_dir, adapter_dir, tmp_path):
    questions = tmp_path / "questions.txt"
    questions.write_text("Name a fish.\nWhat is the capital of France?\nWhy?\nHow do plants make food?\nSay hi.\n")
    out = tmp_path / "answers.jsonl"

    def args(path, *extra):
        # static batches: a batch's rows are all written when it ends (the engine's can finish in a later batch)
        return cli_args("predict", tiny_model_dir, tmp_path / "runs", "--data.predict_path", questions,
                        "--model.generation.max_rows", "2", "--model.generation.engine", "static", "--ckpt_path",
                        adapter_dir, "--model.generation.max_new_tokens", "4", "--predictions.path", path, *extra)

    process = start_paused_at(args(out), tmp_path / "interrupted", "PauseAtHook", hook="on_predict_batch_start",
                              batch=1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM  # not after generating the rest
    err = (tmp_path / "interrupted" / "stderr").read_text()
    assert "Traceback" not in err
    assert f"Predictions stopped: the 2 finished rows are in {out}.partial." in err
    assert ("lit_mistral: stopped by SIGTERM. Predict stopped after the batch it was generating; the finished rows are "
            "kept (see the line above): run the same command with --predictions.resume true to generate the "
            "rest.") in err
    kept = predictions(Path(f"{out}.partial"))
    assert len(kept) == 2 and not out.exists()
    run_cli(*args(out, "--predictions.resume", "true"))
    rows = predictions(out)
    run_cli(*args(tmp_path / "uninterrupted.jsonl"))
    assert rows == predictions(tmp_path / "uninterrupted.jsonl") and all(r in rows for r in kept)


@pytest.mark.slow
def test_sigterm_stops_validate_between_its_answers(tiny_model_dir, adapter_dir, tmp_path):
    root = tmp_path / "runs"
    args = cli_args("validate", tiny_model_dir, root, "--data.val_records", "[0, 8]", "--ckpt_path", adapter_dir,
                    "--evaluation.max_examples", "4", "--evaluation.batch_size", "2", "--evaluation.max_new_tokens",
                    "4", data=DEMO_DATA)
    process = start_paused_at(args, tmp_path, "PauseAtHook", hook="on_validation_epoch_end")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    err = (tmp_path / "stderr").read_text()
    assert "Traceback" not in err and ("lit_mistral: stopped by SIGTERM. Validation stopped before its end and wrote "
                                       "nothing: run the same command again.") in err
    assert not list(root.rglob("evaluation.*"))
