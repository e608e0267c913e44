"""Lightning's private parts that lit_mistral relies on, in one place. Each is used because no public API does the
job; `tests/test_lightning_internals.py` fails loudly, naming the part, when a Lightning upgrade moves one.

- `FSDPStrategy._setup_model`: the one place where Lightning wraps the model in FSDP; `fsdp_qlora` overrides it to
  choose the units and what FSDP leaves alone (the public `FSDPStrategy` arguments cannot exclude parameters by
  dtype, nor give FSDP the CPU as a device).
- What that method does after wrapping, which the override must do too: moving torchmetrics states to the device and
  applying the strategy's activation-checkpointing settings.
- The step a training batch's metrics are logged at (the fit loop's `_batches_that_stepped`) and whether Lightning
  logs at this step (`log_every_n_steps`: the logger connector's `should_update_logs`): the module logs the loss
  read back from the GPU a step later (`step_scalars.py`) at the step `self.log` would have used.
- `LearningRateMonitor._extract_stats(trainer, interval)`, which puts the rates into `trainer.callback_metrics` as
  tensors on `trainer.strategy.root_device`: `callbacks.LearningRateMonitor` hands it the trainer with the CPU as
  that device (a tensor made on a GPU from a number makes the CPU wait for the GPU).
"""

import torch
from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing

FSDP_SETUP_MODEL = "_setup_model"  # the FSDPStrategy method QLoRAFSDPStrategy overrides
LR_MONITOR_STATS = "_extract_stats"  # the LearningRateMonitor method that reads the rates at each step


def finish_fsdp_setup(strategy, model, device) -> None:
    """What Lightning's `FSDPStrategy._setup_model` does after wrapping `model`."""
    _move_torchmetrics_to_device(model, device)
    _setup_activation_checkpointing(model, strategy._activation_checkpointing_kwargs)


def log_step(trainer) -> int:
    """The step Lightning logs the metrics a training batch gives `self.log` at."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def logs_this_step(trainer) -> bool:
    """Whether Lightning writes this training batch's metrics to the loggers (`log_every_n_steps`)."""
    return trainer._logger_connector.should_update_logs


class _Overridden:
    """`obj` with some attributes replaced, everything else its own."""

    def __init__(self, obj, **attributes) -> None:
        self._obj = obj
        self.__dict__.update(attributes)

    def __getattr__(self, name: str):
        return getattr(self._obj, name)


def on_the_cpu(trainer):
    """`trainer`, with the CPU as its strategy's root device (everything else its own)."""
    return _Overridden(trainer, strategy=_Overridden(trainer.strategy, root_device=torch.device("cpu")))
