"""The measurements behind the memory plan (`plan.py`): how many decoder layers must recompute their activations
(`checkpoint_layers`), in how large parts each batch runs (`micro_batch_tokens`), found by training passes on the
epoch's largest batch measured by the CUDA allocator's peak, and timed where speed decides. Each pass costs about a
training step, so the search makes few.

Layers: every layer that keeps its activations saves its share of the recomputation (about a third of its forward),
and costs its activations' memory. Two to five probes: all layers checkpointed (the least memory; if even that does
not fit, all it is), an eighth fewer (the memory a layer's activations take; or straight where the bytes per layer
already measured on larger parts meet the budget), then counts where the line through the measured peaks meets the
budget, until the line says no more fits (`choose_checkpoint_layers`). Parts (`data.batching.split_batch`): smaller
parts take less activation memory, so fewer layers need to recompute, but make smaller matrix multiplies and read the
4-bit weights once more per part; the whole batch, then halves, each with the layer count it needs, each that fits
timed (whole batches by their probe's own pass where that ran warm, `plan.warm`; parts by a pass over every part,
as a step runs them) while smaller parts keep getting faster (by `PARTS_GAIN` at least) and some layers still
recompute (`choose_micro_tokens`)."""

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# of the budget, kept free beside the measured peak: the probes measure what the caching allocator hands out, but it
# holds more (blocks split and cached by size, which a later request of another size cannot reuse), and some memory
# is taken outside it (CUDA's and the kernels' workspaces); `benchmarks/train/bench_plan.py` reports the gap seen
MARGIN = 0.05
# how much faster (one timed pass each) smaller parts must be to be chosen: one timed pass is noisy, and parts a
# little faster in the probe can train slower than whole batches
PARTS_GAIN = 0.02


def choose_checkpoint_layers(measure: Callable[[int], int | None], total: int, budget: int, reserve: int,
                             slope: float | None = None) -> tuple[int, list[tuple[int, int | None]]]:
    """The fewest checkpointed layers (of `total`) whose measured peak plus `reserve` bytes fits `budget` bytes.
    `measure(layers)` is the peak of a training pass with that many layers checkpointed, or None if it ran out of
    memory. Returns the count and the probes made, as (layers, peak).

    Searched by the number of layers that keep their activations, `kept`, between the most known to fit (`low`) and
    the fewest known not to (`high`): first all checkpointed (if even that does not fit, all it is), then
    `total // 8` kept (at least 2): the first layers kept cost less than the rest (a recomputed layer's passing memory
    overlaps them: about half as much for the first two), so the slope is read over several. Where `slope` (bytes
    per layer kept) is known already (measured on larger parts, scaled), the second count is where it meets the
    limit instead. Each next count is where the line through the two measured peaks nearest the limit reaches it,
    the middle of the interval where the nearest failure ran out of memory (no peak to draw a line through). Where
    that line says that not even one more layer fits, the search ends without measuring it: each probe costs a
    training pass, and a line that errs costs at most one layer recomputing more than needed (about 0.3% of a step
    for a 32-layer model)."""
    limit = budget - reserve
    probes: list[tuple[int, int | None]] = []
    peaks: dict[int, int | None] = {}  # kept -> peak

    def fits(kept: int) -> bool:
        peak = measure(total - kept)
        probes.append((total - kept, peak))
        peaks[kept] = peak
        return peak is not None and peak <= limit

    if total == 0 or not fits(0):
        return total, probes  # nothing to choose, or not even full checkpointing fits: the caller says so
    low, high = 0, total + 1  # high: total + 1 while no count is known not to fit
    if slope:
        kept = min(max(1, int((limit - peaks[0]) // slope)), total)
    else:
        kept = min(max(2, total // 8), total)
    while True:
        if fits(kept):
            low = kept
        else:
            high = kept
        if high - low <= 1:
            return total - low, probes
        kept = _next_kept(peaks, low, high, limit, total)
        if kept is None:
            return total - low, probes


def _next_kept(peaks: dict[int, int | None], low: int, high: int, limit: int, total: int) -> int | None:
    """The next count of layers keeping their activations to measure, strictly between `low` and `high`; None where
    the line through two measured peaks says that `low + 1` does not fit."""
    measured = high <= total and peaks[high] is not None
    if measured:
        other = high
    else:  # the line through the two largest counts that fit
        other = max((k for k, peak in peaks.items() if k < low and peak is not None), default=None)
    if other is not None and peaks[other] != peaks[low]:
        slope = (peaks[other] - peaks[low]) / (other - low)  # bytes per layer kept
        guess = low + math.floor((limit - peaks[low]) / slope) if slope > 0 else high - 1
        if guess <= low:
            return None  # the line says none more fits
        if guess < high:
            return guess
    if high > total:
        return total  # every layer may keep its activations
    return (low + high) // 2


@dataclass
class Trial:
    """One part size tried for `micro_batch_tokens: auto`: the layers that must recompute at that size, whether that
    fits, the peaks measured on the way, (layers, bytes or None), the measured speed (tokens/s) if it fits, and how
    many layers keep their activations in CPU memory instead of recomputing (`plan`: where some of them do)."""

    size: int | None
    layers: int
    fits: bool
    probes: list[tuple[int, int | None]]
    speed: float | None = None
    offload: int = 0


def part_sizes(tokens: int, longest: int, count: int = 5) -> list[int]:
    """Part sizes to try, largest first: the whole batch (`tokens` laid out), then halves, none below `longest`
    (the longest example of the batch: a smaller size could not cut it)."""
    sizes = [tokens]
    while len(sizes) < count and sizes[-1] // 2 >= longest:
        sizes.append(sizes[-1] // 2)
    return sizes


def choose_micro_tokens(try_size: Callable[[int], Trial], speed: Callable[[Trial], float] | None,
                        sizes: list[int]) -> tuple[Trial, list[Trial]]:
    """The part size to train with, of `sizes` (largest first). `try_size(size)` finds the layers that must
    recompute at that size and whether it fits. With the layer count fixed (`speed` None), the largest size that
    fits: larger parts are faster at the same recomputation. Otherwise `speed(trial)` measures each size that fits,
    going on to smaller sizes while they get faster and some layers still recompute; the fastest wins. If none fits,
    the smallest size (the caller says so). Smaller parts must be faster by `PARTS_GAIN` to be chosen: at equal speed
    the larger parts are the safer choice (fewer launches; one timed pass is noisy). Returns the choice and every
    trial."""
    trials: list[Trial] = []
    best = None
    for size in sizes:
        trial = try_size(size)
        trials.append(trial)
        if not trial.fits:
            continue
        if speed is None:
            return trial, trials
        trial.speed = speed(trial)
        if best is not None and trial.speed <= best.speed * (1 + PARTS_GAIN):
            break
        best = trial
        if trial.layers == 0:
            break  # nothing recomputes any more: smaller parts could only be slower
    return best or trials[-1], trials


def training_pass(module, batch: dict, *rest: dict) -> tuple[int | None, float]:
    """One forward and backward pass of `module` on `batch` (on its device), as the model is set up (`fit_plan.apply`),
    and on each of `rest` after it, as a step runs a batch's parts (their gradients summed): the CUDA allocator's peak
    (None if it ran out of memory) and the seconds it took (infinite if it ran out). Gradients are dropped after; the
    random state (dropout) is left as it was."""
    device = module.device
    with torch.random.fork_rng(devices=[device]):
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            for part in (batch, *rest):
                with module.trainer.precision_plugin.forward_context():
                    loss, count = module.loss_sum(part)
                (loss / count.clamp(min=1)).backward()
                loss = count = None
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device), time.perf_counter() - started
        except torch.OutOfMemoryError:
            return None, math.inf
        finally:
            module.zero_grad(set_to_none=True)
            loss = count = None
            torch.cuda.empty_cache()


def can_measure(device: torch.device) -> bool:
    """Whether peak memory can be measured on `device` (CUDA's allocator keeps it)."""
    return device.type == "cuda"


def budget_bytes(device: torch.device, gib: float | None) -> tuple[int, str]:
    """What the run may take on `device`: `gib` GiB, or less if the GPU has less free (what this process holds plus
    what is free there); and where that comes from, for the log."""
    free, _ = torch.cuda.mem_get_info(device)
    available = torch.cuda.memory_allocated(device) + free
    if gib is None:
        return available, "free on the GPU"
    if available < gib * 2**30:
        return available, f"memory_budget_gib {gib:g}, but only that much free on the GPU"
    return int(gib * 2**30), "memory_budget_gib"


@contextmanager
def capped(device: torch.device, budget: int | None):
    """While the probes run, the caching allocator may hold at most `budget` bytes on `device` (None: no cap; a probe
    that would take more runs out of memory, and counts as not fitting): probing never takes more of a shared GPU
    than the run may. Lifted after; nothing on a device without CUDA's allocator."""
    if device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if budget is None else min(1.0, budget / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def largest_batch(trainer) -> dict:
    """The epoch's largest training batch (its batch plan's), collated; the first one for other loaders."""
    loader = trainer.train_dataloader
    plan = getattr(loader, "batch_sampler", None)
    if not hasattr(plan, "largest"):
        return next(iter(loader))
    return loader.collate_fn([loader.dataset[i] for i in plan.largest()])
