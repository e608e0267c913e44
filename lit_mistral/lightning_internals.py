"""Lightning's private parts that lit_mistral relies on, in one place. Each is used because no public API does the
job; `tests/test_lightning_internals.py` fails loudly, naming the part, when a Lightning upgrade moves one.

- `FSDPStrategy._setup_model`: the one place where Lightning wraps the model in FSDP; `fsdp_qlora` overrides it to
  choose the units and what FSDP leaves alone (the public `FSDPStrategy` arguments cannot exclude parameters by
  dtype, nor give FSDP the CPU as a device).
- What that method does after wrapping, which the override must do too: moving torchmetrics states to the device and
  applying the strategy's activation-checkpointing settings.
"""

from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing

FSDP_SETUP_MODEL = "_setup_model"  # the FSDPStrategy method QLoRAFSDPStrategy overrides


def finish_fsdp_setup(strategy, model, device) -> None:
    """What Lightning's `FSDPStrategy._setup_model` does after wrapping `model`."""
    _move_torchmetrics_to_device(model, device)
    _setup_activation_checkpointing(model, strategy._activation_checkpointing_kwargs)
