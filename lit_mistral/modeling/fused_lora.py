"""A leaner LoRA linear layer for peft's adapters on a frozen base (plain or bitsandbytes 4-bit): one autograd
function computes `base(x) + scale * B(A(dropout(x)))` and its backward.

Written by hand because peft's forward (0.21) and autograd's bookkeeping make full passes over the (tokens x
features) tensors of every adapted layer that do no arithmetic worth the memory traffic:
- forward: a defensive copy of the 4-bit base output (`result.clone()`), the multiplication of the adapter output by
  its scale, and the addition to the base output (and the scale again in backward). Here the scale is applied to the
  rank-r intermediate, the adapter's output `h @ B.T` is written first and the base's `x @ W.T` (W dequantized, as
  bitsandbytes' own forward does) is added onto it inside that big multiply's epilogue (`addmm_`; with a bias, or a
  base computing in another dtype: the base's own forward, and `out.addmm_(h, B.T)` in place after it);
- backward: the input's gradient of the base path and of the adapter path written separately and then added by
  autograd. Here the base's `grad @ W` (W dequantized, as bitsandbytes' own backward does) is accumulated into the
  adapter path's gradient inside that matrix multiply (`addmm_`);
- one autograd node per adapted layer instead of five or six (dropout, A, scale, B, add, the base), so less Python
  per step.
peft's copy, scale and add are passes over every adapted layer's output; an out-of-place `addmm` still copies each
base output once, and adding the adapter's output after the base's takes one more pass over each output than adding
the base's onto it (the measured gains: BENCHMARKS.md).

Dropout is the call peft makes: `F.dropout` runs `torch.native_dropout` on CUDA, and on the CPU both draw `bernoulli_`
on a tensor like the input, so the masks are the same for a given seed. What it keeps for backward, per adapter: its
output and mask (as autograd's dropout and A multiply would), or, with `regenerate_dropout`, only the random
generator's state, the mask drawn again in backward by the same call: the input is kept instead, once per layer input
(q/k/v and gate/up share theirs). One more dropout pass per adapter, for the memory that lets more layers keep their
activations (`checkpoint_layers`) in the same budget: a layer that keeps its activations keeps about half as much.
`torch.utils.checkpoint` would recompute whole regions (the matrix multiplies too) where only the mask is worth drawing
again.

Used where it computes what peft computes: one active adapter, plain LoRA (no DoRA or other variant), not merged, no
per-row adapter names, B without bias, a frozen `torch.nn.Linear` or `bitsandbytes.nn.Linear4bit` base (not the
CPU-packed inference layout bitsandbytes converts to on AVX512-BF16 machines), and either autocast on (as Lightning's
bf16-mixed runs) or the input in the adapter's dtype. Anything else takes peft's own forward.

With `shared_dropout`, the adapted layers that read one input (q/k/v of an attention block, gate/up of an MLP:
`GROUPS`) run in training as one autograd function: one dropout mask for the input they share (LitGPT's way for its
fused qkv; peft draws one per adapter: each adapter still sees its input dropped with probability p, but the three
masks are one), one multiply by the stacked A matrices, and in backward one multiply back through them, one dropout
backward and the bases' input gradients accumulated into it: the input is read, dropped and kept once instead of
once per adapter, and autograd sums no gradients of the shared input. (A single adapted layer is the same function
with one member.) The first member called with
an input computes every member's output and hands the others theirs when they are called with that same input
(transformers' modules call q, k, v and gate, up one after another on one tensor); called with another input, a
member computes its group anew. Outside training each layer runs alone, as above.

With `dropout_kernel`, on CUDA the dropout and the multiply by A run as one Triton kernel (`lora_kernels.py`), which
keeps the input and the mask as bits for backward, and backward writes the input's gradient masked in one pass."""

import sys
import types

import torch

from lit_mistral.modeling import lora_kernels


def _get_rng(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast runs the matrix multiplies in (bf16-mixed), else x's (equal to A's: see `_plan`)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _dropout(ctx, flat: torch.Tensor, p: float, regenerate: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dropped, mask) as peft's `F.dropout` draws them (mask None without dropout); with `regenerate`, the random
    generator's state kept on `ctx` for `_redraw`."""
    if p <= 0:
        return flat, None
    ctx.state = _get_rng(flat.device) if regenerate else None
    return torch.native_dropout(flat, p, True)


def _redraw(ctx, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's (dropped, mask) of `flat` drawn again from the state `_dropout` kept; the generators' states
    are put back after."""
    cuda = [flat.device] if flat.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        _set_rng(flat.device, ctx.state)
        return torch.native_dropout(flat, ctx.p, True)


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


def _quant_state_on_weight(base) -> bool:
    """Whether `base`'s 4-bit weight carries its quantization state, putting it back from the layer first as the
    layer's own forward does (bitsandbytes keeps it there too: FSDP's flat parameters lose it from the weight)."""
    if getattr(base.weight, "quant_state", None) is None and getattr(base, "quant_state", None) is not None:
        try:
            from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
        except ImportError:  # another bitsandbytes: its own forward will do it
            return False
        fix_4bit_weight_quant_state_from_module(base)
    return getattr(base.weight, "quant_state", None) is not None


def _base_plus(x: torch.Tensor, flat: torch.Tensor, base, kind: str, dtype: torch.dtype, h: torch.Tensor,
               b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(`base(x) + h @ B.T` (h: the scaled (tokens, r) adapter intermediate), as the base returns it (shape, dtype);
    the 4-bit base's weight dequantized for it, or None).

    Without a bias, and in the dtype the base computes in: the adapter's output first (a rank-r multiply writing
    (tokens, out)), then `addmm_` adds x @ W.T to it (W dequantized, as bitsandbytes' own forward does), the adapter
    output read in the big multiply's epilogue: one pass over the output less than adding it afterwards. Otherwise
    the base's own forward, and the adapter output added to it in place."""
    compute = getattr(base, "compute_dtype", None) if kind == "4bit" else dtype
    if base.bias is None and compute in (None, dtype) and (kind != "4bit" or _quant_state_on_weight(base)):
        w = _dequantized(base.weight, base.weight.quant_state) if kind == "4bit" else base.weight
        out = h.to(dtype) @ b.to(dtype).t()  # (tokens, out)
        out.addmm_(flat.to(dtype), w.to(dtype).t())
        out = out.view(*x.shape[:-1], out.shape[-1])
        if kind == "4bit":
            return out.to(x.dtype), w  # bitsandbytes hands back the input's dtype
        return out, None  # Linear its own
    result = base(x).contiguous()
    out = result.view(-1, result.shape[-1])  # (tokens, out)
    out.addmm_(h.to(out.dtype), b.to(out.dtype).t())
    return result, None


WEIGHTS = 6  # where `_LoRALinear`'s A and B arguments start
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # sibling layers that read one input


class _LoRALinear(torch.autograd.Function):
    """`base_i(x) + scale_i * dropout(x) @ A_i.T @ B_i.T` over frozen bases for the members i of a group sharing x
    and one dropout mask - one adapted layer, or a `GROUPS` entry with `shared_dropout`; `members` holds (base,
    kind, scale) per member, `weights` their A and B in turn. See the module's docstring."""

    @staticmethod
    def forward(ctx, x, members: tuple, p: float, regenerate: bool, kernel: bool, keep_dequantized: bool, *weights):
        dtype = _compute_dtype(x)
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        a_s, b_s = weights[0::2], weights[1::2]
        ranks, scales = [a.shape[0] for a in a_s], [scale for _, _, scale in members]
        ctx.kernel = kernel
        if kernel:  # the dropout drawn inside the multiply: only the (tokens, sum of r) result and the mask's bits
            flat = flat.contiguous()
            h, mask = lora_kernels.dropout_a(flat, _stacked(a_s, dtype), p)
            kept = flat  # backward rebuilds the dropped values from the input and the bits
        else:
            dropped, mask = _dropout(ctx, flat, p, regenerate)
            h = dropped.to(dtype) @ _stacked(a_s, dtype).t()  # (tokens, sum of r)
            # regenerating: the input (shared by the adapters of one layer input); else the dropout's output and mask
            kept, mask = (flat, None) if p > 0 and regenerate else (dropped, mask)
        results, dequantized, start = [], [], 0
        for (base, kind, _), b, r, scale in zip(members, b_s, ranks, scales):
            block = h[:, start:start + r]
            block.mul_(scale)  # the scale costs nothing on (tokens, r)
            out, w = _base_plus(x, flat, base, kind, dtype, block, b)  # autograd is off: the bases keep nothing
            results.append(out)
            # kept where backward needs it (x's gradient): backward does not dequantize it again
            dequantized.append(w if keep_dequantized and ctx.needs_input_grad[0] else None)
            start += r
        ctx.weights = [(base.weight, getattr(base.weight, "quant_state", None) if kind == "4bit" else None, kind)
                       for base, kind, _ in members]
        ctx.scales, ctx.ranks, ctx.dtype, ctx.p = scales, ranks, dtype, p
        ctx.x_shape, ctx.x_dtype, ctx.regenerate = x.shape, x.dtype, p > 0 and regenerate and not kernel
        ctx.save_for_backward(kept, mask, h, *a_s, *b_s, *dequantized)
        return tuple(results)

    @staticmethod
    def backward(ctx, *grads):
        kept, mask, h, *weights = ctx.saved_tensors
        n = len(ctx.ranks)
        a_s, b_s, dequantized = weights[:n], weights[n:2 * n], weights[2 * n:]
        dtype = ctx.dtype
        if ctx.regenerate:
            kept, mask = _redraw(ctx, kept)  # the forward's draw again: same state, same mask
        gs = [g.reshape(-1, g.shape[-1]).to(dtype) for g in grads]  # (tokens, out_i)
        grad_w, dhs, start = [None] * (2 * n), [], 0
        for i, (g, b, r, scale) in enumerate(zip(gs, b_s, ctx.ranks, ctx.scales)):
            if ctx.needs_input_grad[WEIGHTS + 1 + 2 * i]:
                grad_w[2 * i + 1] = (g.t() @ h[:, start:start + r]).to(b.dtype)
            dhs.append((g @ b.to(dtype)) * scale)  # (tokens, r)
            start += r
        dh = torch.cat(dhs, dim=1) if n > 1 else dhs[0]  # (tokens, sum of r)
        if any(ctx.needs_input_grad[WEIGHTS::2]):
            if ctx.kernel:
                grad_stacked = lora_kernels.dh_t_dropped(dh, kept, mask, ctx.p)  # (sum of r, in), float32
            else:
                grad_stacked = dh.t() @ kept.to(dtype)  # (sum of r, in)
            start = 0
            for i, (a, r) in enumerate(zip(a_s, ctx.ranks)):
                if ctx.needs_input_grad[WEIGHTS + 2 * i]:
                    grad_w[2 * i] = grad_stacked[start:start + r].to(a.dtype)
                start += r
        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.kernel:  # (tokens, in): the gradient of the dropout's input, masked as it is written
                gx = lora_kernels.masked_dh_a(dh, _stacked(a_s, dtype), mask, ctx.p)
            else:
                gx = dh @ _stacked(a_s, dtype)  # (tokens, in): the gradient of the dropout's output
                if mask is not None:
                    gx = torch.ops.aten.native_dropout_backward(gx, mask, 1 / (1 - ctx.p))
            for g, (weight, quant_state, kind), w in zip(gs, ctx.weights, dequantized):
                if w is None:
                    w = _dequantized(weight, quant_state) if kind == "4bit" else weight
                gx.addmm_(g, w.to(dtype))  # + each base path's grad @ W, in the multiply's epilogue
            grad_x = gx.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, None, None, None, *grad_w


def _stacked(a_s, dtype: torch.dtype) -> torch.Tensor:
    """The A matrices of a group one above the other, in `dtype`: (sum of r, in)."""
    return torch.cat([a.to(dtype) for a in a_s]) if len(a_s) > 1 else a_s[0].to(dtype)


class _Group:
    """The adapted layers of one `GROUPS` entry in one block, and the outputs computed for members not called yet."""

    def __init__(self, members: list) -> None:
        self.members = members
        self.pending: dict[int, torch.Tensor] = {}
        self.input: tuple[torch.Tensor, int] | None = None  # the input those outputs are of, and its version

    def take(self, member, x: torch.Tensor) -> torch.Tensor | None:
        """`member`'s output computed with its group's, if that was for this very `x` (unchanged since)."""
        if self.input is None or self.input[0] is not x or self.input[1] != x._version:
            return None
        out = self.pending.pop(id(member), None)
        if not self.pending:
            self.input = None  # the last member took its output: hold nothing
        return out


def _plan(layer, x: torch.Tensor, args: tuple, kwargs: dict):
    """(A, B, base, base kind, scale, p) for the one-function forward of `layer` on `x`, or None: peft's forward."""
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if (layer.disable_adapters or layer.merged or args or kwargs or len(adapters) != 1
            or adapters[0] in getattr(layer, "lora_variant", {}) or layer.lora_B[adapters[0]].bias is not None
            or layer.lora_A[adapters[0]].bias is not None):
        return None
    name = adapters[0]
    base, dropout = layer.get_base_layer(), layer.lora_dropout[name]
    kind = _base_kind(base)
    if kind is None or not isinstance(dropout, torch.nn.Dropout | torch.nn.Identity):
        return None
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != layer.lora_A[name].weight.dtype:
        return None  # peft casts between dtypes here; keep its exact arithmetic
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return layer.lora_A[name].weight, layer.lora_B[name].weight, base, kind, layer.scaling[name], p


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    plan = _plan(self, x, args, kwargs)
    if plan is None:
        return self._peft_forward(x, *args, **kwargs)
    regenerate = self._regenerate_dropout and x.device.type in ("cpu", "cuda")
    group = self.__dict__.get("_lora_group")
    if group is not None and self.training:
        out = group.take(self, x)
        if out is not None:
            return out
        group.pending, group.input = {}, None  # outputs of an earlier input no member took (a forward cut short)
        plans = [plan if m is self else _plan(m, x, (), {}) for m in group.members]
        if all(q is not None for q in plans) and len({q[5] for q in plans}) == 1 and all(
                m.training for m in group.members):
            weights = [w for q in plans for w in q[:2]]
            outs = _LoRALinear.apply(x, tuple((q[2], q[3], q[4]) for q in plans), plan[5], regenerate,
                                     _kernel(self, x, plan[5]), self._keep_dequantized, *weights)
            group.pending = {id(m): o for m, o in zip(group.members, outs) if m is not self}
            group.input = (x, x._version)
            return outs[group.members.index(self)]
    a, b, base, kind, scale, p = plan
    return _LoRALinear.apply(x, ((base, kind, scale),), p, regenerate, _kernel(self, x, p),
                             self._keep_dequantized and self.training, a, b)[0]


def _kernel(layer, x: torch.Tensor, p: float) -> bool:
    """Whether the dropout runs inside the multiply by A (`lora_kernels`): asked for, dropout on, on CUDA (or in
    Triton's interpreter, for tests)."""
    return layer._dropout_kernel and p > 0 and lora_kernels.available(x.device)


def use_fused_lora(model: torch.nn.Module, regenerate_dropout: bool = False, shared_dropout: bool = False,
                   dropout_kernel: bool = False, keep_dequantized: bool = False) -> int:
    """Give every peft LoRA linear layer of `model` the fused forward (in place; peft's stays as the fallback), its
    dropout regenerating its mask in backward if `regenerate_dropout`; with `shared_dropout`, the layers of each
    `GROUPS` entry within one module run together in training, one dropout mask for their shared input. Returns how
    many layers got the fused forward. With `keep_dequantized`, in training a 4-bit base's weight dequantized in
    forward is kept for backward (one dequantization less per layer and step, for the 16-bit weight's memory until
    its backward)."""
    from peft.tuners.lora.layer import LoraLayer

    def adapted(module) -> bool:
        return isinstance(module, LoraLayer) and isinstance(module, torch.nn.Module) and hasattr(module, "lora_A") \
            and isinstance(module.get_base_layer(), torch.nn.Linear)

    count = 0
    for module in model.modules():
        if adapted(module):
            if "_peft_forward" not in module.__dict__:
                module._peft_forward = module.forward
                module.forward = types.MethodType(_fused_forward, module)
            module._regenerate_dropout = regenerate_dropout
            module._dropout_kernel = dropout_kernel
            module._keep_dequantized = keep_dequantized
            module._lora_group = None
            count += 1
    if shared_dropout:
        for module in model.modules():
            children = dict(module.named_children())
            for names in GROUPS:
                members = [children[n] for n in names if n in children and adapted(children[n])]
                if len(members) > 1:
                    group = _Group(members)
                    for member in members:
                        member._lora_group = group
    return count
