"""Training and generation speed through the command line users run, on one GPU: `python -m lit_mistral fit --config
configs/<name>.yaml` and `python -m lit_mistral predict`, Mistral-7B (random weights, the real architecture), the real
Dolly records (0..199 tiled for training, 200..227 for validation; predict: instructions and contexts of the records,
cycled).

`--code` runs another checkout's lit_mistral and configs (e.g. the commit before a change, side by side in one device
call). Each run is a fresh process. Prints one JSON line per run:
  fit:     median tokens/s over the steps after --warm (train/tokens_per_s), peak GiB, time to first step, wall time;
  predict: prompts, generated tokens, generation tokens/s (the writer's, from the start of generation), end-to-end
           tokens/s (from the command's start: imports, load, merge included), peak GiB, wall time.

    python benchmarks/bench_cli.py --model $CKPT --data dolly-15k-head.jsonl --fit qlora-fast qlora-24gb \
        --predict qlora-fast --predict_flags "--model.generation.do_sample true"
"""

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def launch(cmd: list[str], code: Path, log: Path, timeout: int) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, text = 124, (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
    log.write_text(text)
    return rc, time.perf_counter() - started, text


def failed(kind: str, name: str, rc: int, wall: float, text: str) -> None:
    tail = [line for line in text.splitlines() if "warn" not in line.lower()][-25:]
    print(json.dumps(dict(kind=kind, run=name, rc=rc, wall_s=round(wall), tail=tail)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="Dolly .jsonl with at least 228 records")
    p.add_argument("--code", default=str(ROOT), help="checkout whose lit_mistral and configs/ run")
    p.add_argument("--label", default="", help="names this checkout in the output")
    p.add_argument("--fit", nargs="*", default=[], help="config names to train with")
    p.add_argument("--fit_flags", default="", help="extra flags for every fit run")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--predict", default=None, help="config name to predict with (after the first fit: its adapter)")
    p.add_argument("--predict_file", default=None, help=".jsonl of inputs (default: 200 Dolly instructions)")
    p.add_argument("--predict_flags", default="", help="extra flags for the predict run")
    p.add_argument("--work", default="/tmp/bench-cli")
    p.add_argument("--timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--spy", default=None, help="record the predict run with py-spy (raw stacks, idle included) here")
    p.add_argument("--spy_fit", default=None, help="record the fit runs with py-spy (raw stacks, idle included) here")
    args = p.parse_args()
    code, work = Path(args.code).resolve(), Path(args.work) / (args.label or "run")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = Path(args.data).read_text().splitlines()
    train, val = work / "train.jsonl", work / "val.jsonl"
    train.write_text("\n".join(rows[i % 200] for i in range(200 * 45)) + "\n")
    val.write_text("\n".join(rows[200:228]) + "\n")
    adapter = None
    for name in args.fit:
        root = work / f"fit-{name}"
        spy = ["py-spy", "record", "--idle", "--threads", "--nonblocking", "--format", "raw", "-r", "100", "-o",
               args.spy_fit, "--"]
        cmd = [*(spy if args.spy_fit else []), sys.executable, "-m", "lit_mistral", "fit", "--config",
               str(code / "configs" / f"{name}.yaml"),
               "--model.name_or_path", args.model, "--data.path", str(train), "--data.val_path", str(val),
               "--data.train_records", "null", "--data.val_records", "null", "--trainer.max_steps", str(args.steps),
               "--trainer.val_check_interval", str(args.steps + 1), "--trainer.default_root_dir", str(root),
               "--trainer.enable_progress_bar", "false", *shlex.split(args.fit_flags)]
        rc, wall, text = launch(cmd, code, work / f"fit-{name}.log", args.timeout)
        if rc:
            failed("fit", name, rc, wall, text)
            continue
        run = root / "lightning_logs" / "version_0"
        adapter = adapter or run / "adapter"
        s = scalars(run)
        speeds = [v for step, v in s.get("train/tokens_per_s", []) if step > args.warm]
        mem = [v for _, v in s.get("train/peak_mem_gib", [])]
        recent = [v for step, v in s.get("train/recent_peak_mem_gib", []) if step > args.warm]
        print(json.dumps(dict(kind="fit", label=args.label, config=name, steps=args.steps,
                              tokens_per_s=round(statistics.median(speeds)) if speeds else None,
                              steps_measured=len(speeds), peak_gib=round(max(mem), 1) if mem else None,
                              steps_peak_gib=round(max(recent), 1) if recent else None,
                              time_to_first_step_s=round(s["train/time_to_first_step_s"][0][1], 1),
                              losses=[round(v, 4) for _, v in s.get("train/loss", [])],
                              wall_s=round(wall))), flush=True)
    if args.predict:
        questions = Path(args.predict_file) if args.predict_file else work / "questions.jsonl"
        if not args.predict_file:
            records = [json.loads(line) for line in rows[:200]]
            questions.write_text("".join(json.dumps({"instruction": r["instruction"], "context": r["context"]}) + "\n"
                                         for r in records))
        out = work / "predictions.jsonl"
        spy = ["py-spy", "record", "--idle", "--threads", "--format", "raw", "-r", "100", "-o", args.spy, "--"]
        cmd = [*(spy if args.spy else []), sys.executable, "-m", "lit_mistral", "predict", "--config",
               str(code / "configs" / f"{args.predict}.yaml"), "--model.name_or_path", args.model,
               "--data.predict_path", str(questions), "--predictions.path", str(out),
               "--trainer.default_root_dir", str(work / "predict"), "--trainer.enable_progress_bar", "false",
               *(["--ckpt_path", str(adapter)] if adapter else []), *shlex.split(args.predict_flags)]
        rc, wall, text = launch(cmd, code, work / "predict.log", args.timeout)
        if rc:
            failed("predict", args.predict, rc, wall, text)
            return
        answers = [json.loads(line) for line in out.read_text().split("\n") if line]
        tokens = sum(r["response_tokens"] for r in answers)
        rate = re.search(r"([0-9.]+) new tokens/s", text)
        peak = re.search(r"peak ([0-9.]+) GiB", text)
        print(json.dumps(dict(kind="predict", label=args.label, config=args.predict, prompts=len(answers),
                              new_tokens=tokens, tokens_per_s=float(rate.group(1)) if rate else None,
                              end_to_end_tokens_per_s=round(tokens / wall, 1), wall_s=round(wall, 1),
                              peak_gib=float(peak.group(1)) if peak else None,
                              finish={f: sum(r["finish"] == f for r in answers) for f in ("eos", "length", "skipped")},
                              flags=args.predict_flags)), flush=True)


if __name__ == "__main__":
    main()
