"""Settings that fail together or on this machine, checked on the parsed config before anything loads."""

import pytest
import torch
from jsonargparse import Namespace

from lit_mistral.checks import check_settings
from lit_mistral.errors import LitMistralError


def model_settings(method="nf4", optimizer="paged_adamw_32bit", kernels=None, storage="auto", load_on="device"):
    """A parsed `model` config, as the CLI hands it to the checks."""
    return Namespace(load_on=load_on, quantization=Namespace(method=method, storage=storage),
                     optimization=Namespace(optimizer=optimizer), compute=Namespace(kernels=kernels))


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
