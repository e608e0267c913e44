"""`--model.compute.checkpoint_layers auto`: how many decoder layers recompute their activations, chosen at the start
of fit by measuring, so that the run is as fast as the memory allows: every layer that keeps its activations saves
its share of the recomputation (about a third of its forward), and costs its activations' memory.
`--model.compute.micro_batch_tokens auto`: in how large parts each batch runs (`data.batching.split_batch`): smaller
parts take less activation memory, so fewer layers need to recompute, but make smaller matrix multiplies and read
the 4-bit weights once more per part; the sizes tried and their speeds are measured.

A probe is one forward and backward pass on a real training batch (the epoch's largest; with parts, its largest
part) with a given number of checkpointed layers, measured by the CUDA allocator's peak. Three to six probes: all
layers checkpointed (the least memory; if even that does not fit, all it is), an eighth fewer (the memory a layer's
activations take), then counts where the line through the measured peaks meets the budget, until the count that
fits and the one that does not are neighbours (`choose_checkpoint_layers`). The budget is
`--model.compute.memory_budget_gib` or, unset, the memory the process has plus what the GPU has free; the optimizer's
state (allocated at the first step, outside the probes; the paged optimizers' outside PyTorch's allocator) and a 5%
margin are kept aside. Part sizes: the whole batch, then halves, each with the layer count it needs; with the layer
count fixed the largest that fits, else each that fits is timed (one more pass) while smaller parts keep getting
faster (by 2% at least). The choice is logged, saved in checkpoints and reused when a run resumes."""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_mistral.data.batching import split_batch
from lit_mistral.modeling.build import checkpointable_layers, set_checkpointing

MARGIN = 0.05  # of the budget, kept free: batches larger than the probe's, allocator fragmentation
# how much faster (one timed pass each) smaller parts must be to be chosen: one timed pass is noisy, and parts a
# little faster in the probe can train slower than whole batches
PARTS_GAIN = 0.02


def choose_checkpoint_layers(measure: Callable[[int], int | None], total: int, budget: int,
                             reserve: int) -> tuple[int, list[tuple[int, int | None]]]:
    """The fewest checkpointed layers (of `total`) whose measured peak plus `reserve` bytes fits `budget` bytes.
    `measure(layers)` is the peak of a training pass with that many layers checkpointed, or None if it ran out of
    memory. Returns the count and the probes made, as (layers, peak).

    Searched by the number of layers that keep their activations, `kept`, between the most known to fit (`low`) and
    the fewest known not to (`high`): first all checkpointed (if even that does not fit, all it is), then
    `total // 8` kept (at least 2): the first layers kept cost less than the rest (a recomputed layer's passing memory
    overlaps them: about half as much for the first two), so the
    slope is read over several. Each next count is where the line through the two measured peaks nearest the limit
    reaches it, one past `low` if that line says none more fits, the middle of the interval where the nearest
    failure ran out of memory (no peak to draw a line through)."""
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
    kept = min(max(2, total // 8), total)
    while True:
        if fits(kept):
            low = kept
        else:
            high = kept
        if high - low <= 1:
            return total - low, probes
        kept = _next_kept(peaks, low, high, limit, total)


def _next_kept(peaks: dict[int, int | None], low: int, high: int, limit: int, total: int) -> int:
    """The next count of layers keeping their activations to measure, strictly between `low` and `high`."""
    measured = high <= total and peaks[high] is not None
    if measured:
        other = high
    else:  # the line through the two largest counts that fit
        other = max((k for k, peak in peaks.items() if k < low and peak is not None), default=None)
    if other is not None and peaks[other] != peaks[low]:
        slope = (peaks[other] - peaks[low]) / (other - low)  # bytes per layer kept
        guess = low + math.floor((limit - peaks[low]) / slope) if slope > 0 else high - 1
        if guess <= low:
            return low + 1  # the line says none more fits: check the next one
        if guess < high:
            return guess
    if high > total:
        return total  # every layer may keep its activations
    return (low + high) // 2


@dataclass
class Trial:
    """One part size tried for `micro_batch_tokens: auto`: the layers that must recompute at that size, whether that
    fits, the peaks measured on the way, (layers, bytes or None), and the measured speed (tokens/s) if it fits."""

    size: int | None
    layers: int
    fits: bool
    probes: list[tuple[int, int | None]]
    speed: float | None = None


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


def _training_pass(module, batch: dict, layers: int | None) -> tuple[int | None, float]:
    """One forward and backward pass of `module` on `batch` (on its device) with the first `layers` decoder layers
    checkpointed (None: as the model is set up): the CUDA allocator's peak (None if it ran out of memory) and the
    seconds it took. Gradients are dropped after; the random state (dropout) is left as it was."""
    if layers is not None:
        set_checkpointing(module.model, layers, module.spec.compute.offload_layers)
    device = module.device
    with torch.random.fork_rng(devices=[device]):
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            with module.trainer.precision_plugin.forward_context():
                loss, count = module.loss_sum(batch)
            (loss / count.clamp(min=1)).backward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device), time.perf_counter() - started
        except torch.OutOfMemoryError:
            return None, math.inf
        finally:
            module.zero_grad(set_to_none=True)
            loss = count = None
            torch.cuda.empty_cache()


def probe_peak(module, batch: dict, layers: int | None) -> int | None:
    """The peak memory of a training pass on `batch` with `layers` layers checkpointed (None: as set up); None: out
    of memory."""
    return _training_pass(module, batch, layers)[0]


def probe_speed(module, batch: dict, layers: int) -> float:
    """Tokens per second of a training pass on `batch` (laid-out tokens) with `layers` layers checkpointed, timed
    after the memory probes at the same shapes (so not the first pass of its kind)."""
    return batch["input_ids"].numel() / _training_pass(module, batch, layers)[1]


def can_measure(device: torch.device) -> bool:
    """Whether peak memory can be measured on `device` (CUDA's allocator keeps it)."""
    return device.type == "cuda"


def budget_bytes(device: torch.device, gib: float | None) -> int:
    """`gib` GiB, or what this process holds on `device` plus what is free there."""
    if gib is not None:
        return int(gib * 2**30)
    free, _ = torch.cuda.mem_get_info(device)
    return torch.cuda.memory_allocated(device) + free


def fit_memory(module) -> None:
    """`compute.checkpoint_layers: auto` and/or `compute.micro_batch_tokens: auto` for `module` (a `QLoRAModule` at
    the start of fit; nothing if neither is asked for): measure (or take from the checkpoint resumed) how many layers
    must recompute their activations and in how large parts a batch runs, and set them; the same choice on every
    process."""
    compute = module.spec.compute
    auto_layers = compute.checkpoint_layers == "auto" and compute.gradient_checkpointing
    auto_micro = compute.micro_batch_tokens == "auto"
    if not (auto_layers or auto_micro):
        return  # nothing to choose: the settings say it all
    count = len(checkpointable_layers(module.model))
    offload = min(compute.offload_layers, count)
    total = count - offload  # the layers that may recompute: all but the offloaded ones
    of = f"{count} ({offload} offloading theirs to CPU memory)" if offload else str(count)  # for the log
    # what stays fixed: the configured layer count (None: all; no checkpointing: none), the configured part size
    layers = (module.auto_checkpoint_layers if auto_layers else
              total if compute.gradient_checkpointing and compute.checkpoint_layers is None else
              compute.checkpoint_layers if compute.gradient_checkpointing else 0)
    size = module.auto_micro_tokens if auto_micro else compute.micro_batch_tokens
    how = "from the checkpoint resumed"
    if (auto_layers and layers is None) or (auto_micro and not module.auto_micro_restored):
        if not can_measure(module.device):
            layers, size = (total if auto_layers else layers), (None if auto_micro else size)
            how = "no GPU memory to measure: " + ("every layer, " if auto_layers else "") + "whole batches"
        else:
            layers, size, how = _measure(module, total, layers, size, auto_layers, auto_micro)
    # every process takes the most cautious choice (their batches and free memory differ)
    if auto_layers:
        layers = int(module.trainer.strategy.reduce(torch.tensor(layers, device=module.device), reduce_op="max"))
        module.auto_checkpoint_layers = layers
        set_checkpointing(module.model, layers, compute.offload_layers)
        rank_zero_info(f"model.compute.checkpoint_layers=auto: {layers} of {of} decoder layers recompute their "
                       f"activations ({how}).")
    if auto_micro:
        whole = 2**62  # stands for None (whole batches) in the reduction
        size = -int(module.trainer.strategy.reduce(torch.tensor(-(size or whole), device=module.device),
                                                   reduce_op="max"))
        size = None if size == whole else size
        module.auto_micro_tokens = size
        shown = "whole batches" if size is None else f"parts of at most {size:,} tokens"
        rank_zero_info(f"model.compute.micro_batch_tokens=auto: {shown}, {layers} of {of} decoder layers "
                       f"recomputing their activations ({how}).")


def _measure(module, total: int, layers: int | None, size: int | None, auto_layers: bool,
             auto_micro: bool) -> tuple[int, int | None, str]:
    """The measurement behind `fit_memory`, on the epoch's largest batch: (layers, part size, what was seen)."""
    batch = module.trainer.strategy.batch_to_device(largest_batch(module.trainer))
    budget = budget_bytes(module.device, module.spec.compute.memory_budget_gib)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    reserve = 8 * trainable + int(MARGIN * budget)  # Adam's two float32 moments, and a margin
    module.model.train()

    def largest_part(tokens: int | None) -> dict:
        parts = [batch] if tokens is None else split_batch(batch, tokens)
        return max(parts, key=lambda part: part["input_ids"].numel())

    def try_size(tokens: int | None) -> Trial:
        part = largest_part(tokens)
        if auto_layers:
            n, probes = choose_checkpoint_layers(lambda k: probe_peak(module, part, k), total, budget, reserve)
        else:
            n, probes = layers, [(layers, probe_peak(module, part, None))]  # as configured
        fits = any(k == n and peak is not None and peak + reserve <= budget for k, peak in probes)
        return Trial(tokens, n, fits, probes)

    def shown(probes) -> str:
        return ", ".join(f"{n}: {'out of memory' if p is None else f'{p / 2**30:.1f} GiB'}" for n, p in probes)

    laid_out = batch["input_ids"].numel()
    if not auto_micro:
        trial = try_size(size)
        choice, how = trial, f"measured against {budget / 2**30:.1f} GiB ({shown(trial.probes)})"
    else:
        longest = batch["max_length"] if "cu_seq_lens" in batch else laid_out // len(batch["input_ids"])
        speed = (lambda t: probe_speed(module, largest_part(t.size), t.layers)) if auto_layers else None
        choice, trials = choose_micro_tokens(try_size, speed, part_sizes(laid_out, longest))
        how = f"measured against {budget / 2**30:.1f} GiB: " + "; ".join(
            f"{t.size:,} tokens: {shown(t.probes)}" + (f", {t.speed:,.0f} tokens/s" if t.speed else "")
            for t in trials)
        if choice.size == laid_out:
            choice.size = None  # the whole batch fits: no parts
    if not choice.fits:
        part = largest_part(choice.size)["input_ids"].numel()
        rank_zero_warn(f"model.compute: a training pass over {part} tokens with {choice.layers} of {total} decoder "
                       f"layers recomputing may not fit {budget / 2**30:.1f} GiB (measured: {how}). Fix: lower "
                       "--data.max_tokens (or --data.batch_size), or set --model.compute.micro_batch_tokens.")
    return choice.layers, choice.size, how


def largest_batch(trainer) -> dict:
    """The epoch's largest training batch (its batch plan's), collated; the first one for other loaders."""
    loader = trainer.train_dataloader
    plan = getattr(loader, "batch_sampler", None)
    if not hasattr(plan, "largest"):
        return next(iter(loader))
    return loader.collate_fn([loader.dataset[i] for i in plan.largest()])
