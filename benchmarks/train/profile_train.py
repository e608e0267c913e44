"""A profile of training steps by kind of GPU work, taken inside the CLI a user runs:

    PROFILE_OUT=profile.json python -m lit_mistral fit --config configs/qlora-fast.yaml ... \\
        --trainer.callbacks+=benchmarks.train.profile_train.ProfileSteps

(run from the repository root, or with it on PYTHONPATH). `ProfileSteps` records optimizer steps PROFILE_START ..
PROFILE_START + PROFILE_STEPS - 1 (default 6..8) with torch.profiler and writes, per step: the wall time between the
first and the last kernel, the time the GPU was busy (kernel intervals united) and idle, and the kernels' time by
kind. Under Lightning the forward and backward run inside the optimizer's step closure, so the kinds are read from
the kernels, not from code ranges:

- kernels named for what they do: flash attention, Liger's RMSNorm / RoPE / SwiGLU / cross entropy, bitsandbytes'
  NF4 dequantization, the optimizer;
- matrix multiplies, split by the aten op that launched them: "LoRA matmul" when one of its operands has a
  dimension equal to the LoRA rank (PROFILE_RANK, default 8), else "matmul";
- dropout (in these models only LoRA's dropout is active);
- the remaining elementwise kernels by the aten op that launched them (add, mul, copy, ...);
- idle time by gap length, and (`idle_before`: ms per step, gaps per step) by the ops that launched the kernel ending
  each gap of 10 us or more: where the CPU was when the GPU ran dry.

PROFILE_START=0 PROFILE_STEPS=1 profiles the first step (its kernels loaded and tuned, its memory allocated).
"""

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch

NAMED = [("flash", "attention (flash)"), ("fmha", "attention (flash)"), ("cross_entropy", "loss (Liger CE)"),
         ("rms_norm", "norms (Liger)"), ("rope", "RoPE (Liger)"), ("swiglu", "SwiGLU (Liger)"),
         ("dequantize", "NF4 dequantize"), ("Dequantize", "NF4 dequantize"), ("ptimizer", "optimizer"),
         ("adam", "optimizer"), ("Adam", "optimizer"), ("multi_tensor", "optimizer")]
GEMM = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitK", "Kernel2")


def _innermost_ops(events: list[dict]) -> dict[int, dict]:
    """correlation id -> the innermost aten op (cpu_op event) that launched the kernel, its enclosing ops' names
    (outermost first) under "chain"."""
    ops, launches = defaultdict(list), defaultdict(list)
    for e in events:
        if e.get("ph") != "X":
            continue
        if e.get("cat") == "cpu_op":
            ops[e["tid"]].append(e)
        elif e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {}):
            launches[e["tid"]].append(e)
    found = {}
    for tid, runtime in launches.items():
        todo = sorted(ops[tid], key=lambda e: (e["ts"], -e["dur"]))
        stack, j = [], 0
        for r in sorted(runtime, key=lambda e: e["ts"]):
            while j < len(todo) and todo[j]["ts"] <= r["ts"]:
                while stack and stack[-1]["ts"] + stack[-1]["dur"] < todo[j]["ts"]:
                    stack.pop()
                stack.append(todo[j])
                j += 1
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < r["ts"]:
                stack.pop()
            if stack:
                found[r["args"]["correlation"]] = dict(stack[-1], chain=[e["name"] for e in stack])
    return found


def kind_of(kernel: dict, op: dict | None, rank: int) -> str:
    name = kernel["name"]
    op_name = op["name"] if op else ""
    for part, kind in NAMED:
        if part in name:
            return kind
    if "dropout" in name or "bernoulli" in name or "dropout" in op_name:
        return "dropout (LoRA)"
    if any(g in name for g in GEMM) or op_name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
        dims = [d for shape in (op or {}).get("args", {}).get("Input Dims", []) if isinstance(shape, list)
                for d in shape if isinstance(d, int)]
        return "LoRA matmul" if rank in dims else "matmul"
    if kernel.get("cat") in ("gpu_memcpy", "gpu_memset"):
        return "memcpy/memset"
    return f"elementwise/other: {op_name or name[:40]}"


def summarize(trace: dict, steps: int, rank: int) -> dict:
    events = trace["traceEvents"]
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    launched_by = _innermost_ops(events)
    by_kind, by_name, by_chain = defaultdict(float), defaultdict(float), defaultdict(lambda: defaultdict(float))
    for k in kernels:
        op = launched_by.get(k.get("args", {}).get("correlation"))
        by_kind[kind_of(k, op, rank)] += k["dur"]
        by_name[k["name"][:100]] += k["dur"]
        by_chain[k["name"][:100]][" > ".join((op or {}).get("chain", [])[-3:])] += k["dur"]
    spans = sorted((k["ts"], k["ts"] + k["dur"]) for k in kernels)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    window = spans[-1][1] - spans[0][0]
    # idle time by the length of each gap (launch-bound or stalled), and by what launched the kernel that ended it:
    # the CPU was busy elsewhere until that op ran (its chain of enclosing ops names where)
    gaps, after_gap, end = defaultdict(float), defaultdict(lambda: [0.0, 0]), None
    for k in sorted(kernels, key=lambda k: k["ts"]):
        s, e = k["ts"], k["ts"] + k["dur"]
        if end is not None and s > end:
            gap = s - end
            gaps["<10us" if gap < 10 else "10-100us" if gap < 100 else "0.1-1ms" if gap < 1000 else ">1ms"] += gap
            if gap >= 10:
                op = launched_by.get(k.get("args", {}).get("correlation")) or {}
                entry = after_gap[" > ".join(op.get("chain", [])[-3:]) or k["name"][:60]]
                entry[0], entry[1] = entry[0] + gap, entry[1] + 1
        end = e if end is None else max(end, e)
    per_step = 1 / (1000 * steps)  # us over all steps -> ms per step
    kinds = sorted(by_kind.items(), key=lambda kv: -kv[1])
    other = sum(v for k, v in kinds if k.startswith("elementwise/other"))
    return dict(steps=steps, ms_per_step=round(window * per_step, 2), busy_ms=round(busy * per_step, 2),
                idle_ms=round((window - busy) * per_step, 2),
                kinds={k: [round(v * per_step, 2), f"{100 * v / window:.1f}%"] for k, v in kinds
                       if not k.startswith("elementwise/other")},
                elementwise_other=[round(other * per_step, 2), f"{100 * other / window:.1f}%"],
                elementwise_by_op={k.split(": ", 1)[1]: round(v * per_step, 2) for k, v in kinds[:60]
                                   if k.startswith("elementwise/other")},
                idle_by_gap={k: round(v * per_step, 2) for k, v in gaps.items()},
                idle_before={c: [round(v * per_step, 2), round(n / steps, 1)] for c, (v, n) in
                             sorted(after_gap.items(), key=lambda kv: -kv[1][0])[:20]},
                top_kernels=[[n, round(v * per_step, 3)]
                             for n, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:25]],
                top_kernels_by_ops={n: {c: round(v * per_step, 2) for c, v in sorted(by_chain[n].items(),
                                                                                    key=lambda kv: -kv[1])[:4]}
                                    for n, _ in sorted(by_name.items(), key=lambda kv: -kv[1])[:16]})


class ProfileSteps(L.Callback):
    """Profiles optimizer steps PROFILE_START .. +PROFILE_STEPS and writes the summary to PROFILE_OUT (JSON)."""

    def __init__(self) -> None:
        self.start = int(os.environ.get("PROFILE_START", "6"))
        self.steps = int(os.environ.get("PROFILE_STEPS", "3"))
        self.out = Path(os.environ.get("PROFILE_OUT", "profile.json"))
        self.rank = int(os.environ.get("PROFILE_RANK", "8"))
        self.prof = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.prof is None and trainer.global_step == self.start:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True)
            self.prof.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.prof is None or trainer.global_step < self.start + self.steps or self.out.exists():
            return
        torch.cuda.synchronize()
        self.prof.stop()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            self.prof.export_chrome_trace(str(path))
            trace = json.loads(path.read_text())
        summary = summarize(trace, self.steps, self.rank)
        self.out.write_text(json.dumps(summary, indent=1))
