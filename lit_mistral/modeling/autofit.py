"""`--model.compute.checkpoint_layers auto`: how many decoder layers recompute their activations, chosen at the start
of fit by measuring, so that the run is as fast as the memory allows: every layer that keeps its activations saves
its share of the recomputation (about a third of its forward), and costs its activations' memory.

A probe is one forward and backward pass on a real training batch (the largest of the first few) with a given number
of checkpointed layers, measured by the CUDA allocator's peak. Three to five probes: all layers checkpointed (the
least memory; if even that does not fit, all it is), two fewer (the memory one layer's activations take), then the
count that estimate says fits, checked, and stepped back towards more checkpointing until a probe fits. The budget is
`--model.compute.memory_budget_gib` or, unset, the memory the process has plus what the GPU has free; the optimizer's
state (allocated at the first step, outside the probes; the paged optimizers' outside PyTorch's allocator) and a 5%
margin are kept aside. The choice is logged, saved in checkpoints and reused when a run resumes."""

import math
from collections.abc import Callable

import torch

MARGIN = 0.05  # of the budget, kept free: batches larger than the probe's, allocator fragmentation


def choose_checkpoint_layers(measure: Callable[[int], int | None], total: int, budget: int,
                             reserve: int) -> tuple[int, list[tuple[int, int | None]]]:
    """The fewest checkpointed layers (of `total`) whose measured peak plus `reserve` bytes fits `budget` bytes.
    `measure(layers)` is the peak of a training pass with that many layers checkpointed, or None if it ran out of
    memory. Returns the count and the probes made, as (layers, peak)."""
    probes: list[tuple[int, int | None]] = []

    def fits(layers: int) -> bool:
        peak = measure(layers)
        probes.append((layers, peak))
        return peak is not None and peak + reserve <= budget

    if total == 0 or not fits(total):
        return total, probes  # nothing to choose, or not even full checkpointing fits: the caller says so
    kept = min(2, total)
    if not fits(total - kept):
        return (total - 1 if kept == 2 and fits(total - 1) else total), probes
    everything, fewer = probes[0][1], probes[1][1]
    per_layer = max((fewer - everything) / kept, 1.0)  # the activations one non-checkpointed layer keeps
    layers = max(0, total - math.floor((budget - reserve - everything) / per_layer))
    if layers >= total - kept:
        return total - kept, probes
    step = max(1, total // 16)
    while layers < total - kept and not fits(layers):
        layers = min(total - kept, layers + step)  # the estimate was optimistic: recompute a few more
    return layers, probes


def probe_peak(module, batch: dict, layers: int) -> int | None:
    """The CUDA allocator's peak over one forward and backward pass of `module` on `batch` (on its device) with the
    first `layers` decoder layers checkpointed; None if it ran out of memory. Gradients are dropped after; the random
    state (dropout) is left as it was."""
    from lit_mistral.modeling.build import set_checkpointing

    set_checkpointing(module.model, layers)
    device = module.device
    with torch.random.fork_rng(devices=[device]):
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            with module.trainer.precision_plugin.forward_context():
                loss, count = module.loss_sum(batch)
            (loss / count.clamp(min=1)).backward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        except torch.OutOfMemoryError:
            return None
        finally:
            module.zero_grad(set_to_none=True)
            loss = count = None
            torch.cuda.empty_cache()


def can_measure(device: torch.device) -> bool:
    """Whether peak memory can be measured on `device` (CUDA's allocator keeps it)."""
    return device.type == "cuda"


def budget_bytes(device: torch.device, gib: float | None) -> int:
    """`gib` GiB, or what this process holds on `device` plus what is free there."""
    if gib is not None:
        return int(gib * 2**30)
    free, _ = torch.cuda.mem_get_info(device)
    return torch.cuda.memory_allocated(device) + free
