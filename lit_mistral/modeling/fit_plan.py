"""The memory plan of a fit run (`plan.py` chooses it): made at the start of fit (measured on the epoch's largest
batch on the GPU, the plain settings where nothing can be measured, or the plan kept in the checkpoint resumed with
the settings the config now gives), agreed on by every process, applied to the model, logged in one line and kept on
the module for checkpoints.

Apart from `plan.py`, whose choice is a pure function of the probes and the facts (tested without a GPU), because
this part touches the run: the module, its trainer, the GPU and the CPU's memory."""

import logging
import os
import time
from dataclasses import replace

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_mistral.config import Compute
from lit_mistral.data.batching import split_batch
from lit_mistral.modeling import autofit
from lit_mistral.modeling.build import checkpointable_layers, set_checkpointing
from lit_mistral.modeling.offload import pinning_idle_seconds, pinning_seconds
from lit_mistral.modeling.plan import GIB, Facts, Layout, Plan, choose, describe, plain_plan

log = logging.getLogger(__name__)


def apply(model: torch.nn.Module, plan: Plan | Layout, keep_dequantized: bool | None = None) -> None:
    """Set `model` up as `plan` (or a probe's layout) says: which layers recompute or offload (`set_checkpointing`),
    and the fused LoRA layers' dropout masks and kept weights."""
    if isinstance(plan, Layout):
        layers, offload, regenerate, inputs = plan.recompute, plan.offload, plan.regenerate, plan.inputs
    else:
        layers, offload, regenerate = plan.checkpoint_layers, plan.offload_layers, plan.regenerate_dropout
        keep_dequantized, inputs = plan.keep_dequantized, plan.offload_inputs
    set_checkpointing(model, layers, offload, inputs)
    for module in model.modules():
        if "_regenerate_dropout" in module.__dict__:
            module._regenerate_dropout = regenerate
            if keep_dequantized is not None:
                module._keep_dequantized = keep_dequantized


def weights16_per_layer(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the 16-bit weights `keep_dequantized` holds for one decoder layer (the largest): its 4-bit bases
    that have the fused LoRA forward; 0 where there are none."""
    sizes = [0]
    for block in checkpointable_layers(model):
        total = 0
        for module in block.modules():
            if "_keep_dequantized" in module.__dict__:
                base = module.get_base_layer()
                if type(base).__name__ == "Linear4bit":
                    total += base.in_features * base.out_features * dtype.itemsize
        sizes.append(total)
    return max(sizes)


def optimizer_state_bytes(optimizer: str, trainable: int) -> int:
    """The optimizer's state for `trainable` parameters: AdamW's two moments, in float32 or 8 bits."""
    return (2 if "8bit" in optimizer else 8) * trainable


def cpu_available() -> int:
    """Bytes of CPU memory available (Linux's MemAvailable; else the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def override(plan: Plan, compute: Compute, layers: int) -> Plan:
    """A kept plan with the settings the config now gives in their place (they win)."""
    given = plain_plan(compute, layers, plan.how)
    changes = {}
    if compute.gradient_checkpointing is False or compute.checkpoint_layers != "auto":
        changes["checkpoint_layers"] = given.checkpoint_layers
    if compute.gradient_checkpointing is False or compute.offload_layers != "auto":
        changes["offload_layers"] = given.offload_layers
    if compute.gradient_checkpointing is False or compute.offload_inputs != "auto":
        changes["offload_inputs"] = given.offload_inputs
    if compute.micro_batch_tokens != "auto":
        changes["micro_batch_tokens"] = given.micro_batch_tokens
    if compute.keep_dequantized != "auto":
        changes["keep_dequantized"] = given.keep_dequantized
    if compute.dropout_masks != "auto":
        changes["regenerate_dropout"] = given.regenerate_dropout
    return replace(plan, **changes)


def agree(plan: Plan, strategy, device: torch.device) -> Plan:
    """The most cautious of every process's plan, field by field (their batches and free memory differ): the most
    layers recomputing and offloading, the smallest parts, weights kept only if all keep them, masks drawn again and
    inputs offloaded if any does so."""
    def most(value: int) -> int:
        return int(strategy.reduce(torch.tensor(value, device=device), reduce_op="max"))

    whole = 2**62  # stands for None (whole batches)
    size = -most(-(plan.micro_batch_tokens or whole))
    return replace(plan, checkpoint_layers=most(plan.checkpoint_layers), offload_layers=most(plan.offload_layers),
                   micro_batch_tokens=None if size == whole else size,
                   keep_dequantized=not most(int(not plan.keep_dequantized)),
                   regenerate_dropout=bool(most(int(plan.regenerate_dropout))),
                   offload_inputs=bool(most(int(plan.offload_inputs))))


def fit_plan(module) -> Plan:
    """Make (or take from the checkpoint resumed) the plan of `module` (a `QLoRAModule` at the start of fit), set
    the model up by it, log it in one line and keep it on the module (`memory_plan`, which checkpoints save)."""
    compute, model = module.spec.compute, module.model
    layers = len(checkpointable_layers(model))
    started = time.perf_counter()
    if module.memory_plan is not None:
        plan = override(module.memory_plan, compute, layers)
    elif not compute.auto():
        plan = plain_plan(compute, layers, "every setting given in the config")
    elif not autofit.can_measure(module.device) or module.sharded:
        why = "fsdp_qlora: each GPU cannot measure alone" if module.sharded else "no GPU memory to measure"
        plan = plain_plan(compute, layers, f"{why}: the plain settings")
    else:
        plan, spent, passes = _measure(module, compute, layers)
        plan.how += f", {time.perf_counter() - started:.1f} s, {spent:.1f} s of it in {passes} training passes"
    if module.trainer.world_size > 1:
        plan = agree(plan, module.trainer.strategy, module.device)
    apply(model, plan)
    module.memory_plan = plan
    plan.line = describe(plan, layers, compute)
    rank_zero_info(plan.line)
    return plan


def _measure(module, compute: Compute, layers: int) -> tuple[Plan, float, int]:
    """`choose` with the probes run on the epoch's largest batch on the GPU; the seconds its training passes took
    (the rest of planning's time: the layouts' setup, the largest batch) and their count."""
    batch = module.trainer.strategy.batch_to_device(autofit.largest_batch(module.trainer))
    budget, source = autofit.budget_bytes(module.device, compute.memory_budget_gib)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    reserve = optimizer_state_bytes(module.optimization.optimizer, trainable) + int(autofit.MARGIN * budget)
    tokens = batch["input_ids"].numel()
    longest = int(batch["max_length"]) if "cu_seq_lens" in batch else batch["input_ids"].shape[-1]
    quantized = module.spec.quantization.method is not None
    dtype = compute.torch_dtype(module.device)
    weights16 = weights16_per_layer(module.model, dtype) if quantized else 0
    layer_input = tokens * module.model.config.hidden_size * dtype.itemsize
    facts = Facts(layers, weights16, reserve, budget, tokens, longest, cpu_available(), layer_input)
    log.debug("memory plan facts: %s", facts)
    module.model.train()

    def parts(size: int | None) -> list[dict]:
        """The batch's parts at `size`, the largest first."""
        return [batch] if size is None else sorted(split_batch(batch, size), key=lambda p: -p["input_ids"].numel())

    # each training pass: its layout and tokens/s, less what the GPU lost waiting for CPU memory to be pinned (training
    # waits for it in its first step only: `offload.pinning_idle_seconds`); logged at DEBUG with its peak and times,
    # which with the facts show why the plan chose as it did. A probe runs the largest part of the batch (what the
    # peak needs) unless the plan asks for every part; a pass that times a part size runs every part, as a step does:
    # a pass's fixed costs (its first allocations, the synchronizations) are a step's, not a part's.
    passes: list[tuple[Layout, float, int]] = []
    spent = [0.0]  # seconds in training passes, their setup apart

    def run(layout: Layout, every_part: bool = False) -> int | None:
        apply(module.model, layout, keep_dequantized=False)
        batches = parts(layout.size)[:None if every_part else 1]
        started = time.perf_counter()
        try:
            peak, seconds = autofit.training_pass(module, *batches)
        finally:
            spent[0] += time.perf_counter() - started
        pinning = pinning_seconds(module.model)
        idle = 0.0 if peak is None else pinning_idle_seconds(module.model)  # (events read once the GPU is done)
        tokens = sum(b["input_ids"].numel() for b in batches)
        passes.append((layout, tokens / (seconds - idle), tokens))
        memory = "out of memory" if peak is None else f"peak {peak / GIB:.2f} GiB ({peak} bytes)"
        log.debug("memory plan pass %d: %s; %s; %d tokens in %d part%s; %.3f s, %.3f s of it pinning CPU memory "
                  "(the GPU idle %.3f s of it); %.0f tokens/s", len(passes), layout, memory, tokens, len(batches),
                  "" if len(batches) == 1 else "s", seconds, pinning, idle, passes[-1][1])
        return peak

    def speed(layout: Layout) -> float:
        run(layout, every_part=True)
        return passes[-1][1]

    def uncapped(layout: Layout) -> int | None:
        with autofit.capped(module.device, None):
            return run(layout)

    with autofit.capped(module.device, budget):
        plan = choose(run, speed, facts, compute, uncapped, passes)
    plan.how = f"measured against {budget / GIB:.1f} GiB, {source}, on the largest batch of {tokens:,} tokens: " \
               + plan.how
    return plan, spent[0], len(passes)
