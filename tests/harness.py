"""A callback that tests pass to `python -m lit_mistral fit --trainer.callbacks+=harness.PauseAtStep` to interrupt
a real run at a known point: it writes a marker file and waits there (for a signal, or up to `timeout` s)."""

import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class PauseAtStep(Callback):
    """Before the batch that would make optimizer step `step + 1`, write `marker` (holding the process id) and wait
    until SIGTERM is received or `timeout` seconds pass."""

    def __init__(self, step: int, marker: str, timeout: float = 120.0) -> None:
        self.step, self.marker, self.timeout = step, marker, timeout

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)


class PauseAtHook(Callback):
    """At `hook` (`on_predict_batch_start` of batch `batch`, or `on_validation_epoch_end`: before the answers of
    validation), write `marker` (holding the process id) and wait until SIGTERM is received or `timeout` s pass."""

    def __init__(self, hook: str, marker: str, batch: int = 0, timeout: float = 120.0) -> None:
        self.hook, self.marker, self.batch, self.timeout = hook, marker, batch, timeout

    def _pause(self, trainer) -> None:
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.hook == "on_predict_batch_start" and batch_idx == self.batch:
            self._pause(trainer)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.hook == "on_validation_epoch_end":
            self._pause(trainer)
