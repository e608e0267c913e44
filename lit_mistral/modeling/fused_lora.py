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
adapter in the base output's dtype. Anything else takes peft's own forward.

Optionally (`regenerate_dropout`) the adapter's dropout keeps nothing for backward but the random generator's state:
autograd's dropout keeps its output (the input of the A matrix multiply) and its mask, one of each per adapter, though
q/k/v and gate/up share one input. `_DroppedA` keeps the input (shared, so kept once per layer input) and the
generator's state, and in backward draws the same mask again: one more dropout pass per adapter, for the memory that
lets more layers keep their activations (`checkpoint_layers`) in the same budget. Measured on an H200 (Mistral-7B,
16,384 tokens): a decoder layer that keeps its activations takes ~1.05 GiB instead of ~2.0. Written by hand because
`torch.utils.checkpoint` recomputes whole regions (the matrix multiplies too) where only the mask is worth drawing
again."""

import types

import torch
import torch.nn.functional as F


def _get_rng(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class _DroppedA(torch.autograd.Function):
    """`dropout(x) @ A.T` (peft's `lora_A(lora_dropout(x))`, the same dropout call so the same mask) that keeps `x`
    and the generator's state, not the dropout's output and mask; backward draws the mask again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        # the dtype autocast would run the matrix multiply in (bf16-mixed), else x's (equal to A's: see the caller)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.state, ctx.p, ctx.dtype = _get_rng(x.device), p, dtype
        ctx.save_for_backward(x, weight)
        return F.linear(F.dropout(x, p, True).to(dtype), weight.to(dtype))

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        x, weight = ctx.saved_tensors
        cuda = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, device_type="cuda"), torch.enable_grad():  # their states put back
            _set_rng(x.device, ctx.state)
            leaf = x.detach().requires_grad_(ctx.needs_input_grad[0])
            dropped = F.dropout(leaf, ctx.p, True)  # the forward's draw again: same state, same call, same mask
        grad_h = grad_h.reshape(-1, grad_h.shape[-1]).to(ctx.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_h.t() @ dropped.detach().reshape(-1, x.shape[-1]).to(ctx.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_dropped = (grad_h @ weight.to(ctx.dtype)).view(dropped.shape).to(dropped.dtype)
            (grad_x,) = torch.autograd.grad(dropped, leaf, grad_dropped)
        return grad_x, grad_w, None


def _adapter_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
    """The rank-r intermediate `lora_A(lora_dropout(x))`, through `_DroppedA` where it may regenerate the mask."""
    lora_a, dropout = self.lora_A[name], self.lora_dropout[name]
    if (self._regenerate_dropout and isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0
            and lora_a.bias is None and x.device.type in ("cpu", "cuda") and torch.is_grad_enabled()):
        return _DroppedA.apply(x, lora_a.weight, dropout.p)
    return lora_a(dropout(x))


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(adapters) != 1
            or adapters[0] in getattr(self, "lora_variant", {}) or self.lora_B[adapters[0]].bias is not None):
        return self._peft_forward(x, *args, **kwargs)
    name = adapters[0]
    lora_b = self.lora_B[name]
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != self.lora_A[name].weight.dtype:
        return self._peft_forward(x, *args, **kwargs)  # peft casts between dtypes here; keep its exact arithmetic
    result = self.base_layer(x, *args, **kwargs)
    h = _adapter_input(self, name, x) * self.scaling[name]  # (..., r): the scale costs nothing here
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_b.weight.t())
    return out.view(result.shape)


def use_fused_lora(model: torch.nn.Module, regenerate_dropout: bool = False) -> int:
    """Give every peft LoRA linear layer of `model` the fused forward (in place; peft's stays as the fallback), its
    dropout regenerating its mask in backward if `regenerate_dropout`. Returns how many layers got it."""
    from peft.tuners.lora.layer import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module, torch.nn.Module) and hasattr(module, "lora_A") and (
                isinstance(module.get_base_layer(), torch.nn.Linear)):
            if "_peft_forward" not in module.__dict__:
                module._peft_forward = module.forward
                module.forward = types.MethodType(_fused_forward, module)
            module._regenerate_dropout = regenerate_dropout
            count += 1
    return count
