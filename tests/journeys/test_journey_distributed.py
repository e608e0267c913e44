"""Journey: multi-process training through Lightning's DDP and lit_mistral's FSDP: 2 processes on CPU (gloo), as CI
can run it."""

import json
import re
import subprocess
import sys
import tempfile

import pytest
import torch
from conftest import cli_args, demo_conversations, run_cli, write_jsonl


def tags(run) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    return events.Tags()


def scalars(run) -> set[str]:
    return set(tags(run)["scalars"])


def texts(run) -> set[str]:
    return {t.removesuffix("/text_summary") for t in tags(run)["tensors"]}


def command(tiny_model_dir, data, root, *extra, subcommand="fit") -> list[str]:
    """`python -m lit_mistral subcommand` on 40 training and 8 validation records, in batches of 2."""
    return [sys.executable, "-m", "lit_mistral",
            *cli_args(subcommand, tiny_model_dir, root, "--data.train_records", "[0, 40]", "--data.val_records",
                      "[40, 48]", "--data.batch_size", "2", "--checkpoint.every_n_train_steps", "2",
                      "--trainer.val_check_interval", "4", *extra, data=data)]


def start(logs, *commands: list[str]) -> list[tuple[subprocess.Popen, object]]:
    """Start the commands at once, each printing to a file in `logs`. A launch of two processes leaves a core idle
    while its second process imports, which another launch (or this process) then uses."""
    started = []
    for command in commands:
        out = tempfile.TemporaryFile("w+", dir=logs)
        started.append((subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True), out))
    return started


def finish(started) -> list[str]:
    """Wait for the commands `start` started; assert that each succeeded; their outputs."""
    outputs = []
    for process, out in started:
        process.wait(timeout=300)
        out.seek(0)
        outputs.append(out.read())
        out.close()
    for (process, _), output in zip(started, outputs):
        assert process.returncode == 0, output[-3000:]
    return outputs


def test_fsdp_on_two_processes_resumes_exactly_and_under_ddp(tiny_model_dir, tmp_path, demo_records):
    """fsdp_qlora shards the 4-bit base (float32 storage on CPU) per decoder layer and trains what DDP trains - a DDP
    run whose batches run in parts (`micro_batch_tokens`: the parts' gradients summed locally, reduced once with the
    last part's) ends with the FSDP run's adapters; its checkpoints hold the adapters under their plain names: an FSDP
    run continues from them exactly where it stopped, a run of another strategy and process count continues from
    them too; the adapter folder is peft's; validation, with generation and the base alongside, works on the sharded
    model. No dropout, so that the parts draw nothing the whole batches do not. Four launches of two processes, two
    at a time; what one process does runs in this one."""
    data = write_jsonl(tmp_path / "demo.jsonl", demo_records)
    fsdp = ["--trainer.strategy", "fsdp_qlora", "--trainer.devices", "2", "--model.quantization.fp32_norms", "true",
            "--model.optimization.lr_scheduler", "constant", "--trainer.gradient_clip_val", "0.5",
            "--model.lora.dropout", "0"]
    root, ddp = tmp_path / "runs", tmp_path / "ddp"
    uneven = ["--data.val_records", "[40, 49]"]  # 5 and 4 examples: 3 and 2 batches, evened out by a filler
    # 6 steps in one go (a constant learning rate: the schedule does not depend on max_steps), every checkpoint kept;
    # beside it DDP, its batches in parts of at most 48 tokens (an example or two of the demo records)
    output, _ = finish(start(
        tmp_path,
        command(tiny_model_dir, data, root, *fsdp, *uneven, "--trainer.max_steps", "6", "--checkpoint.save_top_k",
                "-1", "--evaluation.sample_every_n_val", "1", "--evaluation.num_samples", "3",
                "--evaluation.max_new_tokens", "4"),
        command(tiny_model_dir, data, ddp, *fsdp[2:], "--trainer.strategy", "ddp", "--trainer.max_steps", "6",
                "--model.compute.micro_batch_tokens", "48")))
    assert re.search(r"sharded the base over 2 processes .* holds [0-9.]+ MiB of its [0-9.]+ MiB \(50%\)", output)
    run = root / "lightning_logs" / "version_0"
    checkpoint = torch.load(run / "checkpoints" / "step000004.ckpt", weights_only=True)
    uninterrupted = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4 and uninterrupted["global_step"] == 6
    names = set(checkpoint["state_dict"])
    assert names and all("lora_" in n and "_fsdp_wrapped_module" not in n for n in names), sorted(names)[:3]
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(names)
    assert "val/loss" in scalars(run) and "samples/1" in texts(run)  # the validation at step 4
    # FSDP trains what DDP trains: the same batches, the adapters' gradients averaged alike
    replicated = torch.load(ddp / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    for name in names:
        torch.testing.assert_close(replicated["state_dict"][name], uninterrupted["state_dict"][name], rtol=0,
                                   atol=1e-6)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # peft loads the adapter onto the base: the checkpoint's weights, whole
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter")
    state = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(state) == len(names)
    assert all(torch.equal(p, uninterrupted["state_dict"]["model." + n]) for n, p in state.items())

    # validate on the sharded model: losses and generation metrics (3 and 2 answers), with the base alongside; and
    # beside it, stopped at step 4 and resumed to 6 = 6 steps in one go (loaded on the CPU: here no different from
    # the device, the option runs through)
    resumed_root, alone_root = tmp_path / "resumed", tmp_path / "alone"
    started = start(
        tmp_path,
        command(tiny_model_dir, data, root, *fsdp, *uneven, "--ckpt_path", run / "adapter",
                "--evaluation.compare_base", "true", "--evaluation.max_examples", "5", "--evaluation.max_new_tokens",
                "4", subcommand="validate"),
        command(tiny_model_dir, data, resumed_root, *fsdp, "--trainer.max_steps", "6", "--model.load_on", "cpu",
                "--ckpt_path", run / "checkpoints" / "step000004.ckpt"))
    # meanwhile, the validation of one process
    run_cli(*cli_args("validate", tiny_model_dir, alone_root, *uneven, "--model.quantization.fp32_norms", "true",
                      "--ckpt_path", run / "adapter", "--evaluation.max_examples", "0", data=data))
    finish(started)
    report = json.loads((root / "lightning_logs" / "version_1" / "evaluation.json").read_text())
    assert report["metrics"]["fine-tuned"]["loss"] != report["metrics"]["base"]["loss"]
    assert len(report["examples"]) == 5
    alone = json.loads((alone_root / "lightning_logs" / "version_0" / "evaluation.json").read_text())
    assert alone["metrics"]["fine-tuned"]["loss"] == pytest.approx(report["metrics"]["fine-tuned"]["loss"], abs=1e-6)
    resumed = torch.load(resumed_root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                         weights_only=True)
    assert resumed["global_step"] == 6
    for name in names:
        assert torch.equal(resumed["state_dict"][name], uninterrupted["state_dict"][name]), name
    assert any(not torch.equal(resumed["state_dict"][n], checkpoint["state_dict"][n]) for n in names)

    # another strategy and process count continue the run
    run_cli(*command(tiny_model_dir, data, root, "--trainer.devices", "1", "--trainer.max_steps", "8",
                     "--model.quantization.fp32_norms", "true", "--model.lora.dropout", "0", "--ckpt_path", "last")[3:])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


def test_two_nodes_started_by_torchrun_then_resume_on_one_process(tiny_model_dir, tmp_path, demo_records):
    """The several-machines launch of the README: the same command on each node under torchrun with
    --trainer.num_nodes 2 (here both "nodes" are this machine, one process each), on conversations (the FSDP run
    above trains on instruction records, and DDP on 2 processes of one node beside it); then one process continues
    the run."""
    import os
    import socket

    data = write_jsonl(tmp_path / "chat.jsonl", demo_conversations(demo_records, 48))
    root = tmp_path / "runs"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chat = ["--data.prompt_style", "chat_template"]
    ddp = command(tiny_model_dir, data, root, *chat, "--trainer.num_nodes", "2", "--trainer.devices", "1",
                  "--trainer.strategy", "ddp", "--trainer.max_steps", "4")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                               "1", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port",
                               str(port), *ddp[1:]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
             for rank in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    run = root / "lightning_logs" / "version_0"
    assert not (root / "lightning_logs" / "version_1").exists()  # one run folder, written by rank 0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4 and checkpoint["InstructionDataModule"] == {"world_size": 2}
    assert "val/loss" in scalars(run) and (run / "adapter" / "adapter_model.safetensors").is_file()
    # 20 batches of 2 per epoch shared by 2 processes: 4 steps each = 8 of the 20 batches done; 1 process resumes
    run_cli(*command(tiny_model_dir, data, root, *chat, "--trainer.devices", "1", "--trainer.max_steps", "10",
                     "--ckpt_path", "last")[3:])
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 10 and resumed["InstructionDataModule"] == {"world_size": 1}
    assert any(not torch.equal(resumed["state_dict"][k], checkpoint["state_dict"][k]) for k in checkpoint["state_dict"])
