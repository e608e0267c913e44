"""Multi-GPU scaling of lit_mistral's training, through the command line users run (`python -m lit_mistral fit
--config configs/qlora-ddp.yaml`): Mistral-7B QLoRA (random weights, the real architecture), the real Dolly records
(0..199 tiled for training, 200..227 for validation).

Runs of the same config, each a fresh process:
  gpu1        1 GPU                             -> single-GPU tokens/s
  gpu2        2 GPUs, Lightning DDP             -> 2-GPU tokens/s (summed over ranks), scaling = gpu2 / gpu1
  gpu1_acc2   1 GPU, accumulate_grad_batches=2  -> the 2-GPU run's global batch on one GPU: the same batches per
              optimizer step (the plan hands batch i to rank i % 2), so its validation losses must match gpu2's
  fsdp1       1 GPU, --trainer.strategy fsdp_qlora   -> FSDP's own cost (nothing to shard with)
  fsdp2       2 GPUs, --trainer.strategy fsdp_qlora  -> the base sharded: model GiB per GPU vs gpu2's, tokens/s
  fsdp1_cpu   fsdp1 with --model.load_on cpu   -> quantized on the CPU: the same losses as fsdp1, the time it costs
  shared_*    2 processes on ONE GPU, as two nodes of one GPU each over gloo (NCCL refuses two ranks on one GPU):
              what each process holds, when no 2-GPU machine is at hand. Their speed means nothing (one GPU, gloo
              through host memory); run them with a smaller --data.max_tokens so that two fit on the GPU.
    shared_ddp       Lightning DDP         -> each process: the whole base
    shared_fsdp      fsdp_qlora            -> each process: half the base; the whole while loading
    shared_fsdp_cpu  fsdp_qlora, load_on cpu -> each process: half the base, also while loading
Reads each run's TensorBoard events and prints one JSON line per run: median tokens/s over the steps after --warm,
peak GiB, the GiB the model takes before the first step and the peak while loading (rank 0), validation losses by
optimizer step. Extra flags after `--` go to every run. Data, run folders and logs go to --work.

    python benchmarks/train/bench_ddp.py --model $CKPT --data dolly-15k-head.jsonl --runs gpu1 gpu2 gpu1_acc2
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = {"gpu1": ["--trainer.devices", "1"],
        "gpu2": ["--trainer.devices", "2"],
        "gpu1_acc2": ["--trainer.devices", "1", "--trainer.accumulate_grad_batches", "2"],
        "fsdp1": ["--trainer.devices", "1", "--trainer.strategy", "fsdp_qlora"],
        "fsdp2": ["--trainer.devices", "2", "--trainer.strategy", "fsdp_qlora"],
        "fsdp1_cpu": ["--trainer.devices", "1", "--trainer.strategy", "fsdp_qlora", "--model.load_on", "cpu"]}
SHARED = ["--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.strategy.process_group_backend", "gloo"]
RUNS |= {"shared_ddp": ["--trainer.strategy", "lightning.pytorch.strategies.DDPStrategy", *SHARED],
         "shared_fsdp": ["--trainer.strategy", "lit_mistral.modeling.fsdp.QLoRAFSDPStrategy", *SHARED],
         "shared_fsdp_cpu": ["--trainer.strategy", "lit_mistral.modeling.fsdp.QLoRAFSDPStrategy", *SHARED,
                             "--model.load_on", "cpu"]}


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def launch(cmd: list[str], log: Path, nodes: int, timeout: int) -> subprocess.CompletedProcess:
    """Run `cmd` once (Lightning starts the processes of its devices), or as `nodes` processes that each play one
    node of one GPU, all on the same GPU (the environment Lightning reads for processes started by hand). Logs go to
    `log`.log (rank 0 first)."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nodes))  # CPU quantization
    envs = [None] if nodes == 1 else [dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT="29517",
                                           NODE_RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(nodes),
                                           OMP_NUM_THREADS=threads)
                                      for rank in range(nodes)]
    files = [open(f"{log}.rank{rank}.log", "w+") for rank in range(len(envs))]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
             for env, f in zip(envs, files)]
    deadline, rc = time.monotonic() + timeout, 0
    for p in procs:
        try:
            rc = rc or p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = 124
    for p in procs:
        p.kill()  # a rank left waiting for one that failed
        p.wait()
    text = ""
    for f in files:
        f.seek(0)
        text += f.read()
        f.close()
        os.unlink(f.name)
    Path(f"{log}.log").write_text(text)
    return subprocess.CompletedProcess(cmd, rc, text, text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="Dolly .jsonl with at least 228 records")
    p.add_argument("--runs", nargs="+", default=["gpu1", "gpu2", "gpu1_acc2"], choices=list(RUNS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--val_every", type=int, default=10, help="optimizer steps between validations")
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--work", default="/tmp/bench-ddp", help="data, run folders and logs (adapters: not for $OUT)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per run")
    p.add_argument("extra", nargs="*")
    args = p.parse_args()
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    rows = Path(args.data).read_text().splitlines()
    train, val = out / "ddp-train.jsonl", out / "ddp-val.jsonl"
    train.write_text("\n".join(rows[i % 200] for i in range(200 * 45)) + "\n")
    val.write_text("\n".join(rows[200:228]) + "\n")
    for name in args.runs:
        flags = RUNS[name]
        accumulate = 2 if "acc2" in name else 1
        root = out / f"ddp-{name}"
        shutil.rmtree(root, ignore_errors=True)  # read back as version_0 below
        cmd = [sys.executable, "-m", "lit_mistral", "fit", "--config", str(ROOT / "configs" / "qlora-ddp.yaml"),
               "--model.name_or_path", args.model, "--data.path", str(train), "--data.val_path", str(val),
               "--data.train_records", "null", "--data.val_records", "null",
               "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", str(args.val_every * accumulate),
               "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
               "--trainer.num_sanity_val_steps", "0", *flags, *args.extra]
        started = time.perf_counter()
        proc = launch(cmd, out / f"ddp-{name}", 2 if name.startswith("shared") else 1, args.timeout)
        wall = time.perf_counter() - started
        if proc.returncode:
            tail = [line for line in proc.stderr.splitlines() if "warn" not in line.lower()][-25:]
            print(json.dumps(dict(run=name, rc=proc.returncode, wall_s=round(wall), stderr_tail=tail)), flush=True)
            continue
        s = scalars(root / "lightning_logs" / "version_0")
        speeds = [v for step, v in s.get("train/tokens_per_s", []) if step > args.warm]
        mem = [v for _, v in s.get("train/peak_mem_gib", [])]
        model_mem = [v for _, v in s.get("train/model_mem_gib", [])]
        load_peak = [v for _, v in s.get("train/load_peak_mem_gib", [])]
        print(json.dumps(dict(run=name, flags=" ".join(flags + args.extra), steps=args.steps,
                              tokens_per_s=round(statistics.median(speeds)) if speeds else None,
                              steps_measured=len(speeds), peak_gib_rank0=round(max(mem), 1) if mem else None,
                              model_gib_rank0=round(model_mem[0], 2) if model_mem else None,
                              load_peak_gib_rank0=round(load_peak[0], 2) if load_peak else None,
                              time_to_first_step_s=round(s["train/time_to_first_step_s"][0][1], 1),
                              val_loss={step: round(v, 4) for step, v in s.get("val/loss", [])},
                              wall_s=round(wall))), flush=True)


if __name__ == "__main__":
    main()
