"""A training step's scalars (its loss, gradient norm, whether the loss was finite, its time) read on the CPU once
the GPU has computed them, a step or so later, instead of at once.

Reading a GPU tensor's value at once (`.item()`, `float()`, `bool()`, `torch.cuda.synchronize()`; Lightning does it
for every tensor given to `self.log` when it updates the progress bar and the loggers) makes the CPU wait for all the
work queued before it; the GPU then idles while the CPU runs what comes next (the end of the step's loop, the next
batch, its first kernels): gaps of idle GPU in every step. Here each scalar is copied into pinned CPU memory behind
the work that makes it (`non_blocking`) and a CUDA event marks when it arrived; the CPU reads it when the event has
passed, and waits only for entries more than `behind` steps old, by which time the GPU has newer steps queued.
Lightning's loop has no such mode, and torch's `GradScaler` reads its inf flag at once too."""

from collections import deque

import torch


class StepScalars:
    """Entries of named scalars with what they belong to (`meta`), read back in the order they were pushed."""

    def __init__(self) -> None:
        self._pending: deque = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, meta: dict, device: torch.device, **values: torch.Tensor) -> None:
        """Queue `values` (0-d tensors) of the step `meta` describes. On CUDA they are copied to pinned memory behind
        the work queued so far, and an event marks when they, and that work, are done (CUDA events recorded before
        this call, e.g. a step's timing, are passed too when it is); elsewhere they are read at once (no queue runs
        ahead of a CPU)."""
        host = torch.stack([v.detach().reshape(()).float() for v in values.values()])
        event = None
        if device.type == "cuda":
            host = torch.empty(host.shape, dtype=torch.float32, pin_memory=True).copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending.append((meta, list(values), host, event))

    def ready(self, behind: int = 1) -> list[tuple[dict, dict[str, float]]]:
        """The entries whose values have arrived, oldest first, with every entry but the newest `behind` waited for
        (the GPU passed those a step or more ago, or is busy with what came after): `(meta, {name: value})`."""
        out = []
        while self._pending:
            meta, names, host, event = self._pending[0]
            if event is not None and not event.query():
                if len(self._pending) <= behind:
                    break
                event.synchronize()
            self._pending.popleft()
            out.append((meta, dict(zip(names, host.tolist()))))
        return out

    def flush(self) -> list[tuple[dict, dict[str, float]]]:
        """Every entry, waiting for the GPU as needed (the end of an epoch, a checkpoint)."""
        return self.ready(behind=0)


def log_at(trainer, metrics: dict[str, float], step: int) -> None:
    """Write `metrics` to the trainer's loggers at `step` (a step already past, for values read back later), from
    process 0 (`LightningModule.log` would log them at the current step, and on every process)."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
