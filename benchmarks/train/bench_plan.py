"""The memory plan (`lit_mistral/modeling/plan.py`) on one GPU, through the command line users run: at each budget,
`qlora-fast.yaml` with `--model.compute.memory_budget_gib B` (the plan chooses) against the hand-tuned settings for
that budget, fixed by flags on the same code (no probes: the time to the first step without planning):
  8, 16 GiB: the 16 GiB mode (8 layers offloading, the rest measured: `checkpoint_layers auto`, the old qlora-16gb)
  24 GiB:    every layer recomputing (the old qlora-24gb)
  40 GiB:    the layer count measured, whole batches (the old `checkpoint_layers auto`)
  80 GiB and the whole GPU: nothing recomputing, the 16-bit weights not kept (qlora-fast with keep_dequantized false)
then 24 GiB on the longest rows (every example cut to 2,048 tokens: Dolly's contexts repeated) for --long_steps
steps: no out-of-memory, and the peak within the budget. Each fit is a fresh process (bench_cli's `launch`); one JSON
line per run: tokens/s (median after --warm), the allocator's peak (the probes' included) and the steps' own peak,
the time to the first step, the plan's line, and the largest gap seen between what the allocator held and what it
handed out (`fragmentation_gib`: the margin the plan keeps, `autofit.MARGIN`, should cover it).

    python benchmarks/train/bench_plan.py --model $CKPT --data .bench/dolly-15k-head.jsonl --steps 12 --long_steps 60

Estimated time on an H100 (Mistral-7B random, 4-bit copy cached by the first fit): ~35-45 s per 12-step fit (start-up
~15 s, probes up to ~15 s, ~1 s a step) x 11 fits, plus the long run: ~8 minutes with --long_steps 60.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # bench_cli.py: beside this script or one folder up
from bench_cli import launch, scalars  # noqa: E402

ROOT = HERE.parents[1]
FIXED = "--model.compute.{}"
HAND = {  # the hand-tuned settings for each budget, every memory setting given (no plan)
    "16gb": dict(gradient_checkpointing="true", checkpoint_layers="auto", offload_layers=8, micro_batch_tokens="null",
                 keep_dequantized="false", dropout_masks="auto"),
    "24gb": dict(gradient_checkpointing="true", checkpoint_layers="null", offload_layers=0, micro_batch_tokens="null",
                 keep_dequantized="false", dropout_masks="keep"),
    "auto": dict(gradient_checkpointing="true", checkpoint_layers="auto", offload_layers=0, micro_batch_tokens="null",
                 keep_dequantized="false", dropout_masks="auto"),
    "fast": dict(gradient_checkpointing="false", checkpoint_layers="null", offload_layers=0,
                 micro_batch_tokens="null", keep_dequantized="false", dropout_masks="keep"),
}
RUNS = [  # (label, budget GiB or None for the whole GPU, hand-tuned settings or None for the plan)
    ("plan-8", 8, None), ("hand16-8", 8, "16gb"),
    ("plan-16", 16, None), ("hand16-16", 16, "16gb"),
    ("plan-24", 24, None), ("hand24-24", 24, "24gb"),
    ("plan-40", 40, None), ("handauto-40", 40, "auto"),
    ("plan-80", 80, None), ("handfast-80", None, "fast"),
    ("plan-gpu", None, None),
]


def flags(budget: float | None, hand: str | None) -> list[str]:
    out = [] if budget is None else ["--model.compute.memory_budget_gib", str(budget)]
    for key, value in (HAND[hand].items() if hand else ()):
        out += [FIXED.format(key), str(value)]
    return out


def long_rows(rows: list[str], path: Path, count: int) -> None:
    """`count` records whose context is a Dolly context repeated past 2,048 tokens (cut there: `overlong truncate`)."""
    records = [json.loads(line) for line in rows]
    out = []
    for i in range(count):
        r = dict(records[i % len(records)])
        r["context"] = ((r.get("context") or r["instruction"]) + " ") * 400
        out.append(json.dumps(r))
    path.write_text("\n".join(out) + "\n")


def fit(args, work: Path, label: str, train: Path, val: Path, steps: int, extra: list[str]) -> dict:
    root = work / label
    cmd = [sys.executable, "-m", "lit_mistral", "fit", "--config", str(ROOT / "configs" / "qlora-fast.yaml"),
           "--model.name_or_path", args.model, "--data.path", str(train), "--data.val_path", str(val),
           "--data.train_records", "null", "--data.val_records", "null", "--trainer.max_steps", str(steps),
           "--trainer.val_check_interval", str(steps + 1), "--trainer.default_root_dir", str(root),
           "--trainer.enable_progress_bar", "false", *extra]
    rc, wall, text = launch(cmd, ROOT, work / f"{label}.log", args.timeout)
    plan_line = next((line for line in text.splitlines() if "model.compute plan:" in line), None)
    row = dict(kind="plan", run=label, rc=rc, wall_s=round(wall), plan=plan_line, flags=" ".join(extra))
    if rc:
        row["tail"] = [line for line in text.splitlines() if "warn" not in line.lower()][-8:]
        return row
    s = scalars(root / "lightning_logs" / "version_0")
    speeds = [v for step, v in s.get("train/tokens_per_s", []) if step > args.warm]
    peak = [v for _, v in s.get("train/peak_mem_gib", [])]
    recent = [v for _, v in s.get("train/recent_peak_mem_gib", [])]
    reserved = [v for _, v in s.get("train/recent_peak_reserved_gib", [])]
    row.update(tokens_per_s=round(statistics.median(speeds)) if speeds else None, steps=steps,
               peak_gib=round(max(peak), 2) if peak else None, steps_peak_gib=round(max(recent), 2) if recent else None,
               fragmentation_gib=round(max(h - a for h, a in zip(reserved, recent)), 2) if reserved else None,
               time_to_first_step_s=round(s["train/time_to_first_step_s"][0][1], 1),
               loss_last=round(s["train/loss"][-1][1], 4) if s.get("train/loss") else None)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="Dolly .jsonl with at least 228 records")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--long_steps", type=int, default=60, help="steps of the 24 GiB run on 2,048-token rows")
    p.add_argument("--only", nargs="*", default=None, help="labels of RUNS to run (default: all), and/or 'long'")
    p.add_argument("--work", default="/tmp/bench-plan")
    p.add_argument("--timeout", type=int, default=150, help="seconds per fit")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = Path(args.data).read_text().splitlines()
    train, val = work / "train.jsonl", work / "val.jsonl"
    train.write_text("\n".join(rows[i % 200] for i in range(200 * 45)) + "\n")
    val.write_text("\n".join(rows[200:228]) + "\n")
    for label, budget, hand in RUNS:
        if args.only is None or label in args.only:
            print(json.dumps(fit(args, work, label, train, val, args.steps, flags(budget, hand))), flush=True)
    if args.only is None or "long" in args.only:
        longest = work / "long.jsonl"
        long_rows(rows[:200], longest, 8 * (args.long_steps + 2))
        row = fit(args, work, "plan-24-long", longest, val, args.long_steps,
                  [*flags(24, None), "--data.overlong", "truncate"])
        row["within_budget"] = row.get("peak_gib") is not None and row["peak_gib"] <= 24
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
