"""A leaner forward for peft's LoRA linear layers (plain and bitsandbytes 4-bit): the adapter's output is added to
the base output inside the B matrix multiply, and the scale is applied to the rank-r intermediate.

Written by hand because peft's forward (0.21) makes three full passes over the (tokens x out_features) output per
adapted layer that do no arithmetic worth the memory traffic: a defensive copy of the 4-bit base output
(`result.clone()`), the multiplication of the adapter output by its scale, and the addition to the base output (and
the scale again in backward). In a Mistral-7B QLoRA step on an H200 those were ~100 ms of a ~1,130 ms step
(BENCHMARKS.md, the profile of #17). Here `addmm(base_out, h * scale, B.T)` does all three in the matrix multiply's
epilogue, on an output that is new (so nothing is modified in place), with the same dropout calls in the same order
(so the same random masks for a given seed).

Used where it computes exactly what peft computes: one active adapter, plain LoRA (no DoRA or other variant), not
merged, no per-row adapter names, B without bias, and either autocast on (as Lightning's bf16-mixed runs) or the
adapter in the base output's dtype. Anything else takes peft's own forward."""

import types

import torch


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(adapters) != 1
            or adapters[0] in getattr(self, "lora_variant", {}) or self.lora_B[adapters[0]].bias is not None):
        return self._peft_forward(x, *args, **kwargs)
    name = adapters[0]
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != lora_a.weight.dtype:
        return self._peft_forward(x, *args, **kwargs)  # peft casts between dtypes here; keep its exact arithmetic
    result = self.base_layer(x, *args, **kwargs)
    h = lora_a(self.lora_dropout[name](x)) * self.scaling[name]  # (..., r): the scale costs nothing here
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_b.weight.t())
    return out.view(result.shape)


def use_fused_lora(model: torch.nn.Module) -> int:
    """Give every peft LoRA linear layer of `model` the fused forward (in place; peft's stays as the fallback).
    Returns how many layers got it."""
    from peft.tuners.lora.layer import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module, torch.nn.Module) and hasattr(module, "lora_A") and (
                isinstance(module.get_base_layer(), torch.nn.Linear)):
            if "_peft_forward" not in module.__dict__:
                module._peft_forward = module.forward
                module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
