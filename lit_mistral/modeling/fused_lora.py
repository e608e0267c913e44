"""A leaner LoRA linear layer for peft's adapters on a frozen base (plain or bitsandbytes 4-bit): one autograd
function computes `base(x) + scale * B(A(dropout(x)))` and its backward.

Written by hand because peft's forward (0.21) and autograd's bookkeeping make full passes over the (tokens x
features) tensors of every adapted layer that do no arithmetic worth the memory traffic:
- forward: a defensive copy of the 4-bit base output (`result.clone()`), the multiplication of the adapter output by
  its scale, and the addition to the base output (and the scale again in backward). Here the scale is applied to the
  rank-r intermediate and `out.addmm_(h, B.T)` adds the adapter's output to the base output in place, inside the B
  matrix multiply's epilogue;
- backward: the input's gradient of the base path and of the adapter path written separately and then added by
  autograd. Here the base's `grad @ W` (W dequantized, as bitsandbytes' own backward does) is accumulated into the
  adapter path's gradient inside that matrix multiply (`addmm_`);
- one autograd node per adapted layer instead of five or six (dropout, A, scale, B, add, the base), so less Python
  per step.
In a Mistral-7B QLoRA step on an H200 peft's copy, scale and add were ~100 ms of a ~1,130 ms step (BENCHMARKS.md, the
profile of #17); the out-of-place `addmm` that replaced them still copied each base output once (21 ms).

Dropout is the call peft makes: `F.dropout` runs `torch.native_dropout` on CUDA, and on the CPU both draw `bernoulli_`
on a tensor like the input, so the masks are the same for a given seed. What it keeps for backward, per adapter: its
output and mask (as autograd's dropout and A multiply would), or, with `regenerate_dropout`, only the random
generator's state, the mask drawn again in backward by the same call: the input is kept instead, once per layer input
(q/k/v and gate/up share theirs). One more dropout pass per adapter, for the memory that lets more layers keep their
activations (`checkpoint_layers`) in the same budget. Measured on an H200 (Mistral-7B, 16,384 tokens, the probes of
`checkpoint_layers auto`): the first two decoder layers that keep their activations took 2.1 GiB instead of 4.0.
`torch.utils.checkpoint` would recompute whole regions (the matrix multiplies too) where only the mask is worth drawing
again.

Used where it computes what peft computes: one active adapter, plain LoRA (no DoRA or other variant), not merged, no
per-row adapter names, B without bias, a frozen `torch.nn.Linear` or `bitsandbytes.nn.Linear4bit` base (not the
CPU-packed inference layout bitsandbytes converts to on AVX512-BF16 machines), and either autocast on (as Lightning's
bf16-mixed runs) or the input in the adapter's dtype. Anything else takes peft's own forward."""

import sys
import types

import torch


def _get_rng(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _base_kind(base: torch.nn.Module) -> str | None:
    """How backward gets the frozen base's (out, in) weight: "4bit" (dequantized), "linear", or None (unsupported)."""
    if any(p.requires_grad for p in base.parameters()):
        return None
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None and isinstance(base, bnb.nn.Linear4bit):
        state = getattr(base.weight, "quant_state", None)
        return None if getattr(state, "packing_format_for_cpu", False) else "4bit"
    return "linear" if type(base) is torch.nn.Linear else None


def _dequantized(weight: torch.Tensor, quant_state) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.view(-1, 1), quant_state)  # (out, in), as bitsandbytes' backward takes it


class _LoRALinear(torch.autograd.Function):
    """`base(x) + scale * dropout(x) @ A.T @ B.T` over a frozen base; see the module's docstring."""

    @staticmethod
    def forward(ctx, x, a, b, base, kind: str, scale: float, p: float, regenerate: bool):
        # the dtype autocast runs the matrix multiplies in (bf16-mixed), else x's (equal to A's: see the caller)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        mask = None
        if p > 0:
            ctx.state = _get_rng(x.device) if regenerate else None
            dropped, mask = torch.native_dropout(flat, p, True)
        else:
            dropped = flat
        h = (dropped.to(dtype) @ a.to(dtype).t()) * scale  # (tokens, r): the scale costs nothing here
        result = base(x).contiguous()  # autograd is off in here: the base keeps nothing for backward
        out = result.view(-1, result.shape[-1])  # (tokens, out)
        out.addmm_(h.to(out.dtype), b.to(out.dtype).t())
        weight = base.weight
        ctx.weight, ctx.quant_state = weight, getattr(weight, "quant_state", None) if kind == "4bit" else None
        ctx.kind, ctx.dtype, ctx.scale, ctx.p, ctx.x_shape, ctx.x_dtype = kind, dtype, scale, p, x.shape, x.dtype
        ctx.regenerate = p > 0 and regenerate
        # regenerating: the input (shared by the adapters of one layer input); else the dropout's output and mask
        ctx.save_for_backward(flat if ctx.regenerate else dropped, None if ctx.regenerate else mask, h, a, b)
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kept, mask, h, a, b = ctx.saved_tensors
        dtype = ctx.dtype
        if ctx.regenerate:
            cuda = [kept.device] if kept.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda, device_type="cuda"):  # the generators' states put back
                _set_rng(kept.device, ctx.state)
                kept, mask = torch.native_dropout(kept, ctx.p, True)  # the forward's draw again: same state, same mask
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)  # (tokens, out)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = (g.t() @ h.to(dtype)).to(b.dtype)
        dh = (g @ b.to(dtype)) * ctx.scale  # (tokens, r)
        if ctx.needs_input_grad[1]:
            grad_a = (dh.t() @ kept.to(dtype)).to(a.dtype)
        if ctx.needs_input_grad[0]:
            gx = dh @ a.to(dtype)  # (tokens, in): the gradient of the dropout's output
            if mask is not None:
                gx = torch.ops.aten.native_dropout_backward(gx, mask, 1 / (1 - ctx.p))
            w = _dequantized(ctx.weight, ctx.quant_state) if ctx.kind == "4bit" else ctx.weight
            gx.addmm_(g, w.to(dtype))  # + the base path's grad @ W, in the multiply's epilogue
            grad_x = gx.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if (self.disable_adapters or self.merged or args or kwargs or len(adapters) != 1
            or adapters[0] in getattr(self, "lora_variant", {}) or self.lora_B[adapters[0]].bias is not None
            or self.lora_A[adapters[0]].bias is not None):
        return self._peft_forward(x, *args, **kwargs)
    name = adapters[0]
    base, dropout = self.get_base_layer(), self.lora_dropout[name]
    kind = _base_kind(base)
    if kind is None or not isinstance(dropout, torch.nn.Dropout | torch.nn.Identity):
        return self._peft_forward(x, *args, **kwargs)
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != self.lora_A[name].weight.dtype:
        return self._peft_forward(x, *args, **kwargs)  # peft casts between dtypes here; keep its exact arithmetic
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    regenerate = self._regenerate_dropout and x.device.type in ("cpu", "cuda")
    return _LoRALinear.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, base, kind, self.scaling[name],
                             p, regenerate)


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
