"""Where the memory plan's time goes, inside the command line users run:

    python benchmarks/train/time_plan.py fit --config configs/qlora-fast.yaml --model.compute.memory_budget_gib 16 ...

runs lit_mistral's CLI (the same arguments) with the plan's parts timed, and prints one JSON line `plan_timing` when
the plan is made: its wall time; each training pass (the layout probed, seconds, peak GiB or null where it ran out
of memory, the pinned-memory allocator's counters that grew during it, and the CPU seconds spent starting copies to
the CPU: pinning pages included); the seconds spent setting layouts up (`fit_plan.apply`) and finding the largest
batch; the rest. Run from the repository root (or with it on PYTHONPATH).

A benchmark, not part of the package: it wraps the plan's functions from outside, so the plan it times is the one
users get."""

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lit_mistral import cli  # noqa: E402
from lit_mistral.modeling import autofit, fit_plan, offload  # noqa: E402

GIB = 2**30
record = {"passes": [], "apply_s": 0.0, "largest_batch_s": 0.0, "copy_out_s": 0.0}
layout_now: list = [None]


def host_stats() -> dict:
    """The pinned-memory allocator's counters (torch.cuda.host_memory_stats: allocations, their bytes and the time
    cudaHostAlloc took); empty where torch does not keep them."""
    try:
        stats = torch.cuda.host_memory_stats()
    except (AttributeError, RuntimeError):
        return {}
    return {k: v for k, v in stats.items() if isinstance(v, (int, float))}


def grown(before: dict, after: dict) -> dict:
    """The counters that changed, by how much."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def wrap(owner, name: str, on_call):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        return on_call(original, *args, **kwargs)
    setattr(owner, name, wrapped)


def timed_pass(original, module, batch, *rest):
    copy_before, host_before = record["copy_out_s"], host_stats()
    started = time.perf_counter()
    peak, seconds = original(module, batch, *rest)
    layout = layout_now[0]
    record["passes"].append(dict(
        layout=None if layout is None else asdict(layout), parts=1 + len(rest),
        tokens=sum(int(b["input_ids"].numel()) for b in (batch, *rest)),
        wall_s=round(time.perf_counter() - started, 3),
        pass_s=None if seconds == float("inf") else round(seconds, 3),
        peak_gib=None if peak is None else round(peak / GIB, 3),
        pinned=grown(host_before, host_stats()),
        copy_out_s=round(record["copy_out_s"] - copy_before, 3)))
    return peak, seconds


def adding_seconds(key: str):
    """A wrapper body (for `wrap`) that adds the call's seconds to `record[key]`."""
    def on_call(original, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            record[key] += time.perf_counter() - started
    return on_call


def timed_apply(original, model, plan, *args, **kwargs):
    layout_now[0] = plan  # what the next training pass runs
    return adding_seconds("apply_s")(original, model, plan, *args, **kwargs)


def timed_plan(original, module):
    started = time.perf_counter()
    try:
        return original(module)
    finally:
        wall = time.perf_counter() - started
        passes = sum(p["wall_s"] for p in record["passes"])
        out = dict(kind="plan_timing", wall_s=round(wall, 2), passes_s=round(passes, 2),
                   apply_s=round(record["apply_s"], 2), largest_batch_s=round(record["largest_batch_s"], 2),
                   rest_s=round(wall - passes - record["apply_s"] - record["largest_batch_s"], 2),
                   copy_out_s=round(record["copy_out_s"], 2), passes=record["passes"],
                   plan=getattr(module.memory_plan, "line", None))
        print("\n" + json.dumps(out), flush=True)  # on a line of its own, after a progress bar


wrap(autofit, "training_pass", timed_pass)
wrap(fit_plan, "apply", timed_apply)
wrap(autofit, "largest_batch", adding_seconds("largest_batch_s"))
wrap(offload.ActivationOffload, "_copy_out", adding_seconds("copy_out_s"))
wrap(fit_plan, "fit_plan", timed_plan)

if __name__ == "__main__":
    cli.main()
