"""Callbacks around training: telemetry per optimizer step, the adapter written at the end of fit."""

import pytest
from conftest import make_module, trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from lit_mistral.callbacks import SaveAdapter, Telemetry
from lit_mistral.data.datamodule import InstructionDataModule


class Recorder(Logger):
    """Keeps every logged (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.logged = []

    name, version = "recorder", 0

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def steps_of(self, key: str) -> list[int]:
        return [step for step, metrics in self.logged if key in metrics]


def test_telemetry_logs_once_per_optimizer_step_and_adapter_is_saved(tiny_model_dir, demo_file, tmp_path, caplog):
    """Under accumulate_grad_batches=2, tokens/s comes once per optimizer step (not per batch) and counts the tokens
    of both batches; the first step reports the time to it instead, and where it went; SaveAdapter writes the peft
    folder."""
    import re

    module = make_module(tiny_model_dir, lora={"dropout": 0.0})
    dm = InstructionDataModule(path=str(demo_file), tokenizer=str(tiny_model_dir), max_length=256, batch_size=4,
                               train_records=(0, 24))
    recorder, telemetry = Recorder(), Telemetry()
    tokens = []

    class Tokens(Callback):  # what each batch brings
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            tokens.append(batch["num_tokens"])

    with caplog.at_level("INFO"):
        trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, logger=recorder, log_every_n_steps=1,
                callbacks=[telemetry, Tokens(), SaveAdapter()]).fit(module, dm)
    assert recorder.steps_of("train/time_to_first_step_s") == [1]
    spans = re.search(r"Time to the first optimizer step: ([0-9.]+)s \(model built and set up ([0-9.]+)s, the "
                      r"loop's start ([0-9.]+)s, the first step ([0-9.]+)s\)", caplog.text)
    assert spans, caplog.text[-2000:]
    total, *parts = map(float, spans.groups())
    assert sum(parts) == pytest.approx(total, abs=0.15)
    assert recorder.steps_of("train/tokens_per_s") == [2, 3]  # 6 batches, 3 optimizer steps
    assert telemetry.last["train/tokens_per_s"] > 0 and len(tokens) == 6
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
