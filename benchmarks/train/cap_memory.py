"""Training held to `model.compute.memory_budget_gib` as a card of that size holds it, on a larger GPU:

    python -m lit_mistral fit --config configs/qlora-fast.yaml --model.compute.memory_budget_gib 24 ... \\
        --trainer.callbacks+=benchmarks.train.cap_memory.CapMemory

(run from the repository root, or with it on PYTHONPATH). The plan's probes run with the CUDA allocator capped at
the budget, the training steps without a cap: on an 80 GB card the allocator then keeps freed blocks cached beyond
the budget, where a card of the budget's size would hand them back and allocate again, or run out of memory if its
blocks are too fragmented. `CapMemory` keeps the cap on for the steps, so that a run on a large GPU shows what a
card of the budget's size does: the same peak, the cached blocks freed when the cap is reached (at some cost in
speed), and an out-of-memory error where fragmentation would cause one. Without a budget, or on a device without
CUDA's allocator, it does nothing."""

import lightning as L
import torch


class CapMemory(L.Callback):
    """Caps the allocator at the first training batch: after the memory plan (made in the module's `on_train_start`,
    which runs after the callbacks' and lifts its own cap when its probes are done), before the first step."""

    def __init__(self) -> None:
        self.capped = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.capped:
            return
        self.capped = True
        gib = pl_module.spec.compute.memory_budget_gib
        device = pl_module.device
        if gib is None or device.type != "cuda":
            return
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), device)
        print(f"CapMemory: the CUDA allocator capped at {gib:g} GiB of {total / 2**30:.1f} for the training steps",
              flush=True)
