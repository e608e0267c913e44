"""Lightning's private parts that lit_mistral relies on (lit_mistral/lightning_internals.py): each still exists and
takes what lit_mistral passes. When a Lightning upgrade breaks one, this fails first, naming the part."""

import inspect

from lightning.pytorch.strategies import FSDPStrategy

from lit_mistral import lightning_internals
from lit_mistral.modeling.fsdp import QLoRAFSDPStrategy


def test_fsdp_setup_model_is_still_the_method_that_wraps_the_model():
    method = getattr(FSDPStrategy, lightning_internals.FSDP_SETUP_MODEL, None)
    assert method is not None, "FSDPStrategy._setup_model is gone: QLoRAFSDPStrategy's override no longer runs"
    assert list(inspect.signature(method).parameters) == ["self", "model"]
    source = inspect.getsource(FSDPStrategy.setup)
    assert f"self.{lightning_internals.FSDP_SETUP_MODEL}(" in source, "FSDPStrategy.setup no longer calls it"
    assert lightning_internals.FSDP_SETUP_MODEL in QLoRAFSDPStrategy.__dict__


def test_what_setup_model_does_after_wrapping_is_still_there():
    from lightning.fabric.strategies import fsdp

    for name, params in (("_move_torchmetrics_to_device", ["module", "device"]),
                         ("_setup_activation_checkpointing", ["module", "activation_checkpointing_kwargs"])):
        function = getattr(fsdp, name, None)
        assert function is not None, f"lightning.fabric.strategies.fsdp.{name} is gone"
        assert list(inspect.signature(function).parameters) == params, name
    strategy = QLoRAFSDPStrategy()
    assert isinstance(strategy._activation_checkpointing_kwargs, dict), "the strategy's checkpointing settings moved"


def test_the_step_metrics_are_logged_at_and_whether_this_step_logs_are_still_there(tmp_path):
    import lightning as L

    trainer = L.Trainer(default_root_dir=tmp_path, log_every_n_steps=2, logger=False)
    assert lightning_internals.log_step(trainer) == 0, "fit_loop.epoch_loop._batches_that_stepped moved"
    assert isinstance(lightning_internals.logs_this_step(trainer), bool), "_logger_connector.should_update_logs moved"


def test_the_learning_rate_monitor_still_makes_its_tensors_on_the_strategys_root_device(tmp_path):
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor

    from lit_mistral.callbacks import LearningRateMonitor as Ours

    method = getattr(LearningRateMonitor, lightning_internals.LR_MONITOR_STATS, None)
    assert method is not None, "LearningRateMonitor._extract_stats is gone: callbacks.LearningRateMonitor waits again"
    assert list(inspect.signature(method).parameters) == ["self", "trainer", "interval"]
    assert "trainer.strategy.root_device" in inspect.getsource(method), "it makes its tensors elsewhere now"
    # through ours, on a trainer whose root device is not the CPU: the rates land in callback_metrics on the CPU
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.25)
    trainer = type("Trainer", (), {"lr_scheduler_configs": [], "optimizers": [optimizer], "callback_metrics": {},
                                   "strategy": type("Strategy", (), {"root_device": torch.device("meta")})()})()
    monitor = Ours(logging_interval="step")
    monitor.lrs = {"lr-SGD": []}
    monitor.last_momentum_values = {"lr-SGD-momentum": None}
    assert monitor._extract_stats(trainer, "step")["lr-SGD"] == 0.25
    assert trainer.callback_metrics["lr-SGD"].device.type == "cpu"
