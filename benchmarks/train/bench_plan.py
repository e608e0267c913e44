"""The memory plan (`lit_mistral/modeling/plan.py`) on one GPU, through the command line users run. Two parts, each one
device call within 9 minutes:

`--part budgets`: at each budget, `qlora-fast.yaml` with `--model.compute.memory_budget_gib B` (the plan chooses)
against the hand-tuned settings for that budget, every memory setting given by flags on the same code:
  8 GiB:  every layer recomputing, parts of 4,096 tokens (and the plan with the loss in 1,024-position chunks)
  16 GiB: the old qlora-16gb (8 layers offloading, the layer count measured: `checkpoint_layers auto`)
  24 GiB: every layer recomputing, whole batches (the old qlora-24gb); and 18 recomputing, 8 offloading, whole
          batches (the fastest found by hand)
  40 GiB: the layer count measured, whole batches (the old `checkpoint_layers auto`)
  80 GiB: nothing recomputing, the 16-bit weights not kept (qlora-fast with keep_dequantized false)
  the whole GPU: the same, and on a GPU over 92 GiB the 16-bit weights kept (the old qlora-fast)
On a GPU of 80 GiB or less the 80 GiB budget is the whole GPU, run once. One JSON line per run: tokens/s (median
after --warm), the allocator's peak over the whole run (the plan's probes included: they are capped at the budget)
and over the steps alone, the largest gap between what the allocator held and what it handed out over the steps
(`fragmentation_gib`: the margin the plan keeps, `autofit.MARGIN`, should cover it), the time to the first step, and
the plan's log line; then one `summary` line per budget: the plan against the fastest hand-tuned run of that budget.

`--part cost`: the cost of planning. At each of --budgets (16 and 24 GiB), the plan through `time_plan.py` (where
its time went: each training pass, the layouts' setup, pinned CPU memory) for --steps steps, then the same settings
given as flags (no probes) for 3; at the first budget both resumed from their checkpoints too (the plan reused).
One `plan-cost` line per budget: the time to the first step of each.

`--part long`: 24 GiB on the longest rows (every example cut to 2,048 tokens: Dolly's responses repeated) for
--long_steps steps (no out-of-memory, the peak within the budget); then the time to the first step of the plan's own
settings given as flags (no probes) against the plan (cold), and of both resumed from their last checkpoint (the plan
reused from it).

Each fit is a fresh process (bench_cli's `launch`); runs that could not end before --deadline (seconds since the
start) are skipped with a line saying so. `--dry_run` prints the commands only.

    python benchmarks/train/bench_plan.py --model $CKPT --data .bench/dolly-15k-head.jsonl --part budgets
    python benchmarks/train/bench_plan.py --model $CKPT --data .bench/dolly-15k-head.jsonl --part long
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_cli import launch, scalars  # noqa: E402

HAND = {  # the hand-tuned settings, every memory setting given (the plan decides nothing, but `auto` layer counts)
    "8gb": dict(gradient_checkpointing="true", checkpoint_layers="null", offload_layers=0, offload_inputs="false",
                micro_batch_tokens=4096, keep_dequantized="false", dropout_masks="keep"),
    "16gb": dict(gradient_checkpointing="true", checkpoint_layers="auto", offload_layers=8, offload_inputs="false",
                 micro_batch_tokens="null", keep_dequantized="false", dropout_masks="regenerate"),
    "24gb": dict(gradient_checkpointing="true", checkpoint_layers="null", offload_layers=0, offload_inputs="false",
                 micro_batch_tokens="null", keep_dequantized="false", dropout_masks="keep"),
    # the fastest found by hand at 24 GiB: whole batches, some recomputing layers offloading instead (BENCHMARKS.md,
    # Memory modes)
    "24best": dict(gradient_checkpointing="true", checkpoint_layers=18, offload_layers=8, offload_inputs="false",
                   micro_batch_tokens="null", keep_dequantized="false", dropout_masks="regenerate"),
    # the fastest seen at 40 GiB (an earlier plan's choice, BENCHMARKS.md, Memory modes): halves, 2 recomputing
    "40best": dict(gradient_checkpointing="true", checkpoint_layers=2, offload_layers=1, offload_inputs="false",
                   micro_batch_tokens=8191, keep_dequantized="false", dropout_masks="regenerate"),
    "auto": dict(gradient_checkpointing="true", checkpoint_layers="auto", offload_layers=0, offload_inputs="false",
                 micro_batch_tokens="null", keep_dequantized="false", dropout_masks="regenerate"),
    "fast": dict(gradient_checkpointing="false", checkpoint_layers="null", offload_layers=0, offload_inputs="false",
                 micro_batch_tokens="null", keep_dequantized="false", dropout_masks="keep"),
    "fastkd": dict(gradient_checkpointing="false", checkpoint_layers="null", offload_layers=0, offload_inputs="false",
                   micro_batch_tokens="null", keep_dequantized="true", dropout_masks="keep"),
}


def runs(gpu_gib: float) -> list[tuple[str, float | None, str | None, list[str]]]:
    """(label, budget GiB or None for the whole GPU, hand-tuned settings or None for the plan, extra flags)."""
    out = [("plan-8", 8, None, []), ("hand8-8", 8, "8gb", []),
           ("plan-16", 16, None, []), ("hand16-16", 16, "16gb", []),
           ("plan-24", 24, None, []), ("hand24-24", 24, "24gb", []), ("handbest-24", 24, "24best", []),
           ("plan-40", 40, None, []), ("handauto-40", 40, "auto", []), ("handbest-40", 40, "40best", [])]
    if gpu_gib > 81:
        out += [("plan-80", 80, None, []), ("handfast-80", 80, "fast", [])]
    out += [("plan-gpu", None, None, []), ("handfast-gpu", None, "fast", [])]
    if gpu_gib > 92:
        out.append(("handfastkd-gpu", None, "fastkd", []))
    out.append(("plan-8-chunk1k", 8, None, ["--model.compute.loss_chunk_size", "1024"]))
    return out


def flags(budget: float | None, hand: str | dict | None) -> list[str]:
    """The flags of a run: the budget where something is left to the plan (the config refuses it otherwise), and
    the hand-tuned settings."""
    settings = HAND[hand] if isinstance(hand, str) else hand or {}
    planned = not settings or "auto" in settings.values()
    out = ["--model.compute.memory_budget_gib", f"{budget:g}"] if budget is not None and planned else []
    for key, value in settings.items():
        out += [f"--model.compute.{key}", str(value)]
    return out


def long_rows(rows: list[str], path: Path, count: int) -> None:
    """`count` records whose response is a Dolly response repeated past 2,048 tokens, cut there (`overlong truncate`
    keeps an example whose prompt fits, cut inside its response: every token after the prompt is trained on)."""
    records = [json.loads(line) for line in rows]
    out = []
    for i in range(count):
        r = dict(records[i % len(records)])
        r["response"] = (r["response"] + " ") * (1 + 8192 // max(1, len(r["response"])))
        out.append(json.dumps(r))
    path.write_text("\n".join(out) + "\n")


def training_file(rows: list[str], work: Path) -> Path:
    """The training file of the budgets and cost parts: the first 200 records repeated 45 times, in `work`."""
    train = work / "train.jsonl"
    train.write_text("\n".join(rows[i % 200] for i in range(200 * 45)) + "\n")
    return train


def gpu_gib() -> float:
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, check=True).stdout
        return int(text.split()[0]) / 1024
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        return 0.0


class Bench:
    def __init__(self, args) -> None:
        self.args, self.started = args, time.perf_counter()
        self.work = Path(args.work)

    def fit(self, label: str, train: Path, val: Path, steps: int, extra: list[str], budget: float | None,
            resume: bool = False, timed: bool = False) -> dict:
        root = self.work / label.removesuffix("-resume")
        # timed: through time_plan.py, which prints where the plan's time went (the same CLI, the same plan)
        runner = [str(HERE / "time_plan.py")] if timed else ["-m", "lit_mistral"]
        cmd = [sys.executable, *runner, "fit", "--config", str(ROOT / "configs" / "qlora-fast.yaml"),
               "--model.name_or_path", self.args.model, "--data.path", str(train), "--data.val_path", str(val),
               "--data.train_records", "null", "--data.val_records", "null", "--trainer.max_steps", str(steps),
               "--trainer.val_check_interval", str(steps + 1), "--trainer.default_root_dir", str(root),
               "--trainer.enable_progress_bar", "false", *extra, *shlex.split(self.args.extra),
               # resumed: the checkpoint saved at the end of the earlier fit counts its epoch as done
               *(["--ckpt_path", "last", "--trainer.max_epochs", "2"] if resume else [])]
        row = dict(kind="plan", run=label, budget_gib=budget, flags=" ".join(extra))
        left = self.args.deadline - (time.perf_counter() - self.started)
        if self.args.dry_run:
            return dict(row, cmd=shlex.join(cmd))
        if left < self.args.min_left:
            return dict(row, skipped=f"{left:.0f} s left of --deadline {self.args.deadline}")
        rc, wall, text = launch(cmd, ROOT, self.work / f"{label}.log", int(min(self.args.timeout, left)))
        plan_line = next((line for line in text.splitlines() if "model.compute plan:" in line), None)
        row.update(rc=rc, wall_s=round(wall), plan=plan_line and plan_line[plan_line.index("model.compute plan:"):])
        timing = next((json.loads(line) for line in text.splitlines() if line.startswith('{"kind": "plan_timing"')),
                      None)
        if timing is not None:
            row["plan_timing"] = {k: v for k, v in timing.items() if k not in ("kind", "plan")}
        if rc:
            row["tail"] = [line for line in text.splitlines() if "warn" not in line.lower()][-8:]
            return row
        versions = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
        s = scalars(versions[-1])  # a resumed fit logs beside the earlier one: its own steps are the last ones
        first = s.get("train/time_to_first_step_s", [])[-1:]
        start = first[0][0] if first else 0
        s = {tag: [(step, v) for step, v in values if step >= start] for tag, values in s.items()}
        speeds = [v for step, v in s.get("train/tokens_per_s", []) if step > start + self.args.warm]
        peak = [v for _, v in s.get("train/peak_mem_gib", [])]
        recent = [v for _, v in s.get("train/recent_peak_mem_gib", [])]
        reserved = [v for _, v in s.get("train/recent_peak_reserved_gib", [])]
        row.update(tokens_per_s=round(statistics.median(speeds)) if speeds else None, steps=steps,
                   peak_gib=round(max(peak), 2) if peak else None,
                   steps_peak_gib=round(max(recent), 2) if recent else None,
                   steps_reserved_gib=round(max(reserved), 2) if reserved else None,
                   fragmentation_gib=round(max(h - a for h, a in zip(reserved, recent)), 2) if reserved else None,
                   time_to_first_step_s=round(first[0][1], 1) if first else None,
                   loss_last=round(s["train/loss"][-1][1], 4) if s.get("train/loss") else None)
        if budget is not None and peak:
            row["within_budget"] = max(peak) <= budget
        return row


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def planned_flags(root: Path) -> list[str]:
    """The plan a fit saved in its last checkpoint, as the flags that give the same settings (no probes)."""
    import torch

    record = torch.load(next(root.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    record = record["lit_mistral"].get("memory_plan")
    if record is None:  # no GPU measured it (a CPU trial): the plain settings stand in
        return flags(None, "24gb")
    layers, offload = record["checkpoint_layers"], record["offload_layers"]
    return flags(None, dict(gradient_checkpointing=str(bool(layers or offload)).lower(), checkpoint_layers=layers,
                            offload_layers=offload, offload_inputs=str(bool(record.get("offload_inputs"))).lower(),
                            micro_batch_tokens=record["micro_batch_tokens"] or "null",
                            keep_dequantized=str(record["keep_dequantized"]).lower(),
                            dropout_masks="regenerate" if record["regenerate_dropout"] else "keep"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="Dolly .jsonl with at least 228 records")
    p.add_argument("--part", choices=["budgets", "long", "cost"], required=True)
    p.add_argument("--budgets", nargs="*", type=float, default=[16, 24], help="the cost part's budgets (GiB)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warm", type=int, default=4)
    p.add_argument("--long_steps", type=int, default=200, help="steps of the 24 GiB run on 2,048-token rows")
    p.add_argument("--only", nargs="*", default=None, help="labels of the budgets part to run (default: all)")
    p.add_argument("--work", default="/tmp/bench-plan")
    p.add_argument("--timeout", type=int, default=150, help="seconds per fit (the long run: --long_timeout)")
    p.add_argument("--long_timeout", type=int, default=420)
    p.add_argument("--deadline", type=int, default=520, help="seconds: no fit starts that could not end before")
    p.add_argument("--min_left", type=int, default=45, help="seconds a fit needs at least")
    p.add_argument("--extra", default="", help="flags added to every fit (e.g. a CPU trial's)")
    p.add_argument("--gpu_gib", type=float, default=None, help="the GPU's memory (default: nvidia-smi's)")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = p.parse_args()
    bench = Bench(args)
    work = bench.work
    work.mkdir(parents=True, exist_ok=True)
    rows = Path(args.data).read_text().splitlines()
    val = work / "val.jsonl"
    val.write_text("\n".join(rows[200:228]) + "\n")
    if args.part == "budgets":
        train = training_file(rows, work)
        total = args.gpu_gib if args.gpu_gib is not None else gpu_gib()
        emit(dict(kind="plan-gpu", gpu_gib=round(total, 1)))
        done: dict[str, dict] = {}
        for label, budget, hand, extra in runs(total):
            if args.only is None or label in args.only:
                done[label] = emit(bench.fit(label, train, val, args.steps, flags(budget, hand) + extra, budget))
        for budget in sorted({label.split("-")[1] for label in done}, key=lambda b: (b == "gpu", b.zfill(4))):
            plan = done.get(f"plan-{budget}", {})
            hands = [r for label, r in done.items() if label.endswith(f"-{budget}") and not label.startswith("plan")
                     and r.get("tokens_per_s")]
            best = max(hands, key=lambda r: r["tokens_per_s"], default=None)
            emit(dict(kind="plan-summary", budget=budget, plan_tokens_per_s=plan.get("tokens_per_s"),
                      plan_peak_gib=plan.get("peak_gib"), best_hand=best and best["run"],
                      best_hand_tokens_per_s=best and best["tokens_per_s"],
                      best_hand_peak_gib=best and best["peak_gib"],
                      plan_vs_best=round(plan["tokens_per_s"] / best["tokens_per_s"], 3)
                      if best and plan.get("tokens_per_s") else None))
        return
    if args.part == "cost":
        train = training_file(rows, work)
        for i, budget in enumerate(args.budgets):
            label = f"cost-{budget:g}"
            plan = emit(bench.fit(f"plan-{label}", train, val, args.steps, flags(budget, None), budget, timed=True))
            fixed = ["'<the plan's>'"] if args.dry_run else planned_flags(work / f"plan-{label}")
            given = emit(bench.fit(f"fixed-{label}", train, val, 3, fixed, None))
            row = dict(kind="plan-cost", budget=budget, plan_s=plan.get("time_to_first_step_s"),
                       fixed_s=given.get("time_to_first_step_s"), plan_tokens_per_s=plan.get("tokens_per_s"))
            if i == 0:  # resumed from the checkpoint each saved at its end: the plan reused, no probes
                row["plan_resumed_s"] = emit(bench.fit(f"plan-{label}-resume", train, val, args.steps + 3,
                                                       flags(budget, None), budget, True)).get("time_to_first_step_s")
                row["fixed_resumed_s"] = emit(bench.fit(f"fixed-{label}-resume", train, val, 6, fixed, None,
                                                        True)).get("time_to_first_step_s")
            emit(row)
        return
    longest = work / "long.jsonl"
    long_rows(rows[:200], longest, 8 * (args.long_steps + 10))
    long = ["--data.overlong", "truncate"]
    timeout, args.timeout = args.timeout, args.long_timeout
    emit(bench.fit("plan-24-long", longest, val, args.long_steps, [*flags(24, None), *long], 24))
    args.timeout = timeout
    if args.dry_run:
        fixed = ["--model.compute.checkpoint_layers", "'<the plan's>'", "..."]
    else:
        fixed = planned_flags(work / "plan-24-long")
    emit(bench.fit("fixed-24-long", longest, val, 3, [*fixed, *long], None))
    emit(bench.fit("plan-24-long-resume", longest, val, args.long_steps + 3, [*flags(24, None), *long], 24, True))
    emit(bench.fit("fixed-24-long-resume", longest, val, 6, [*fixed, *long], None, True))


if __name__ == "__main__":
    main()
