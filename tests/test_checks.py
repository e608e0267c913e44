"""Settings that fail together or on this machine, checked on the parsed config before anything loads."""

import pytest
import torch
from jsonargparse import Namespace

from lit_mistral.checks import check_settings
from lit_mistral.errors import LitMistralError


def model_settings(method="nf4", optimizer="paged_adamw_32bit", kernels=None, storage="auto", load_on="device",
                   checkpoint_layers=None, micro_batch_tokens=None):
    """A parsed `model` config, as the CLI hands it to the checks."""
    return Namespace(load_on=load_on, quantization=Namespace(method=method, storage=storage),
                     optimization=Namespace(optimizer=optimizer),
                     compute=Namespace(kernels=kernels, checkpoint_layers=checkpoint_layers,
                                       micro_batch_tokens=micro_batch_tokens))


def test_a_gpu_machine_is_fine_without_bitsandbytes_in_the_way(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("lit_mistral.checks.bitsandbytes_has_cuda", lambda: False)
    check_settings("fit", model_settings(method=None, optimizer="adamw"),
                   Namespace(precision="bf16-mixed", accelerator="gpu"))


@pytest.mark.parametrize("subcommand", ["predict", "export"])
def test_fsdp_is_for_training_only(subcommand):
    with pytest.raises(LitMistralError, match=f"trainer.strategy=fsdp_qlora with {subcommand}: FSDP is for training"):
        check_settings(subcommand, model_settings(),
                       Namespace(precision="bf16-mixed", accelerator="cpu", strategy="fsdp_qlora"))


def test_fsdp_takes_the_plain_settings_for_auto():
    """Under FSDP the memory plan does not measure (each GPU cannot alone): `auto` is accepted and means the plain
    settings; a count is kept."""
    trainer = Namespace(precision="bf16-mixed", accelerator="cpu", strategy="fsdp_qlora")
    check_settings("fit", model_settings(checkpoint_layers="auto", micro_batch_tokens="auto"), trainer)
    check_settings("fit", model_settings(checkpoint_layers=8), trainer)


def test_batches_in_parts_are_not_for_fsdp():
    """FSDP reduces gradients at the end of each backward pass; the parts run one backward each."""
    trainer = Namespace(precision="bf16-mixed", accelerator="cpu", strategy="fsdp_qlora")
    with pytest.raises(LitMistralError, match="micro_batch_tokens with trainer.strategy=fsdp_qlora"):
        check_settings("fit", model_settings(micro_batch_tokens=4096), trainer)
    check_settings("fit", model_settings(micro_batch_tokens=4096), Namespace(precision="bf16-mixed",
                                                                              accelerator="cpu", strategy="ddp"))


@pytest.mark.parametrize("strategy", ["auto", "ddp"])
def test_loading_on_the_cpu_is_for_fsdp_qlora(strategy, monkeypatch):
    """Elsewhere the whole base would move to each GPU: no memory saved, only a slower load."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("lit_mistral.checks.bitsandbytes_has_cuda", lambda: True)
    model = model_settings(load_on="cpu")
    with pytest.raises(LitMistralError, match=f"model.load_on=cpu with trainer.strategy={strategy}: only fsdp_qlora "
                                              "moves a base loaded on the CPU to the GPU a layer at a time"):
        check_settings("fit", model, Namespace(precision="bf16-mixed", accelerator="gpu", strategy=strategy))
    check_settings("fit", model, Namespace(precision="bf16-mixed", accelerator="gpu", strategy="fsdp_qlora"))
    check_settings("fit", model, Namespace(precision="32-true", accelerator="cpu", strategy="ddp"))  # already there


@pytest.mark.parametrize("monitor,data,in_fit,message", [
    ("val/loss", Namespace(val_records=[0, 8]), False, None),
    ("val/closed_qa/ppl", Namespace(val_fraction=0.1), False, None),
    ("train/loss", Namespace(), False, None),
    ("lr-PagedAdamW32bit", Namespace(), False, None),
    ("val/rougeL", Namespace(val_path="v.jsonl"), True, None),
    ("val_loss", Namespace(val_records=[0, 8]), False, "checkpoint.monitor=val_loss: a fit logs no such metric"),
    ("val/ppl", Namespace(val_fraction=0.0), False, "there is no validation data, so it is never logged"),
    ("val/rougeL", Namespace(val_records=[0, 8]), False, "generation metrics are computed during fit only with "
                                                         "--evaluation.in_fit true"),
])
def test_the_checkpoint_monitor_is_a_metric_the_fit_logs(monitor, data, in_fit, message):
    def check():
        check_settings("fit", model_settings(method=None, optimizer="adamw"),
                       Namespace(precision="32-true", accelerator="cpu"), data, Namespace(monitor=monitor),
                       Namespace(in_fit=in_fit))

    if message is None:
        check()
    else:
        with pytest.raises(LitMistralError, match=message):
            check()
