"""Data-parallel training through Lightning's DDP: 2 processes on CPU (gloo), as CI can run it."""

import subprocess
import sys

import torch

from conftest import write_jsonl


def fit(tiny_model_dir, data, root, *extra):
    command = [sys.executable, "-m", "lit_mistral", "fit", "--model.name_or_path", str(tiny_model_dir),
               "--data.path", str(data), "--data.train_records", "[0, 40]", "--data.val_records", "[40, 48]",
               "--data.batch_size", "2", "--data.max_length", "256", "--trainer.accelerator", "cpu",
               "--trainer.precision", "32-true", "--trainer.default_root_dir", str(root),
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
               "--checkpoint.every_n_train_steps", "2", "--trainer.val_check_interval", "4", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_on_two_processes_then_resume_on_one(tiny_model_dir, tmp_path, demo_records):
    data = write_jsonl(tmp_path / "demo.jsonl", demo_records)
    root = tmp_path / "runs"
    fit(tiny_model_dir, data, root, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "4")
    run = root / "lightning_logs" / "version_0"
    assert not (root / "lightning_logs" / "version_1").exists()  # one run folder, written by rank 0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert checkpoint["InstructionDataModule"] == {"world_size": 2}
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    # 20 batches of 2 per epoch shared by 2 processes: 4 steps each = 8 of the 20 batches done; 1 process resumes
    fit(tiny_model_dir, data, root, "--trainer.devices", "1", "--trainer.max_steps", "10", "--ckpt_path", "last")
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 10 and resumed["InstructionDataModule"] == {"world_size": 1}
    assert any(not torch.equal(resumed["state_dict"][k], checkpoint["state_dict"][k]) for k in checkpoint["state_dict"])
