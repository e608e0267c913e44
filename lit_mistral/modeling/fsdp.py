"""`--trainer.strategy fsdp_qlora`: Lightning's FSDP strategy made to shard a 4-bit QLoRA model.

Lightning's own `fsdp` cannot: FSDP flattens the parameters of each unit into one tensor of one dtype, and a QLoRA
decoder layer mixes the packed 4-bit weights with float32 adapters (and norms); its bf16 mixed precision would cast
the packed 4-bit storage as if it were numbers; and its checkpoints gather the whole model onto rank 0, where the
4-bit weights' quantization state does not survive. Here:

- Each decoder layer is one FSDP unit holding its frozen base weights (the 4-bit ones stored in the compute dtype,
  `model.quantization.storage`, so that they flatten with the rest), sharded across the GPUs: each GPU keeps 1/N of
  them.
  What is left (embeddings, final norm, head) is the root unit, sharded too.
- The adapters are left out of FSDP (`ignored_states`): every GPU holds all of them (80 MiB for Mistral-7B at r=8) and
  `QLoRAFSDPStrategy.post_backward` averages their gradients in one all-reduce, as DDP would. Written by hand
  because as FSDP units of their own (FSDP needs one dtype per unit) the hundreds of small LoRA matrices cost a
  large share of the speed in FSDP's per-unit hooks. Frozen weights of another dtype than the rest of their unit
  (float32 norms) are left out too, replicated.
- No FSDP dtype casting: the precision plugin's autocast does the mixed precision, as under DDP.
- A base loaded on the CPU (`--model.load_on cpu`) reaches the GPU one unit at a time, each sharded as it arrives
  (FSDP's `device_id`): no GPU holds the whole base, even while loading.
- Checkpoints hold the adapters, the optimizer and scheduler state, under the same names as without FSDP: a run
  resumes on another strategy or GPU count.
"""

from collections import Counter
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info

from lit_mistral.errors import LitMistralError
from lit_mistral.lightning_internals import finish_fsdp_setup
from lit_mistral.modeling.adapters import clean_name, trainable_state

NAME = "fsdp_qlora"


def shard_plan(root: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Parameter]]:
    """How to shard `root` (a QLoRAModule): its decoder layers, each an FSDP unit (the rest of the model is the root
    unit), and the parameters FSDP leaves alone: the trainable ones (replicated, their gradients averaged by the
    strategy) and frozen ones of another dtype than the bulk of their unit, which FSDP could not flatten with it.

    Raises LitMistralError when the model names no decoder layer class."""
    layer_types = set()
    for module in root.modules():
        layer_types.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in root.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise LitMistralError(f"{NAME}: found no decoder layers to shard (transformers' `_no_split_modules` is empty "
                              "for this model). Fix: train it with --trainer.strategy ddp.")
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    units = [list(layer.parameters()) for layer in layers] + [[p for p in root.parameters() if id(p) not in in_layers]]
    ignored = [p for p in root.parameters() if p.requires_grad]
    for params in units:
        frozen = Counter()
        for p in params:
            if not p.requires_grad:
                frozen[p.dtype] += p.numel()
        if len(frozen) > 1:
            bulk = frozen.most_common(1)[0][0]
            ignored += [p for p in params if not p.requires_grad and p.dtype != bulk]
    return layers, ignored


def _bytes(model: torch.nn.Module, trainable: bool) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad == trainable)


class AdapterPrecision(FSDPPrecision):
    """Lightning's FSDP precision, with gradient clipping by norm (`--trainer.gradient_clip_val`), which Lightning
    refuses under FSDP because torch's `clip_grad_norm_` would see only this rank's shards. The trainable parameters
    here are the replicated adapters, whose gradients are whole and averaged on every rank (by `post_backward`,
    before Lightning clips): the plain clip is exact."""

    def clip_grad_by_norm(self, optimizer, clip_val: float) -> None:
        Precision.clip_grad_by_norm(self, optimizer, clip_val)


class QLoRAFSDPStrategy(FSDPStrategy):
    """FSDP (full sharding) for a QLoRAModule: the frozen base sharded per decoder layer, the adapters replicated.
    Takes the arguments of Lightning's `FSDPStrategy`; `auto_wrap_policy`, `ignored_states` and `mixed_precision`
    are set here."""

    strategy_name = NAME

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._adapters: list[torch.nn.Parameter] = []
        for fixed in ("auto_wrap_policy", "ignored_states", "mixed_precision"):
            if kwargs.get(fixed) is not None:
                raise LitMistralError(f"trainer.strategy {NAME}: `{fixed}` is set by lit_mistral (see "
                                      "lit_mistral/fsdp.py). Fix: leave it out.")
        super().__init__(*args, **kwargs)

    @property
    def precision_plugin(self) -> FSDPPrecision:
        return FSDPStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        if type(plugin) is FSDPPrecision:  # what Lightning makes from --trainer.precision
            plugin = AdapterPrecision(plugin.precision, plugin.scaler)
        FSDPStrategy.precision_plugin.fset(self, plugin)

    @property
    def mixed_precision_config(self) -> None:
        return None  # FSDP would cast the packed 4-bit storage as numbers; autocast does the mixed precision

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap the LightningModule: its decoder layers as units, the rest as the root unit, trainable and odd-dtype
        parameters left out (`shard_plan`). Lightning's version, with the plan, and with the CPU given to FSDP as a
        device (gloo: how CI runs this code) instead of no device, which FSDP refuses."""
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import CustomPolicy

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):  # wrapped by fit, now validate
            return model
        layers, ignored = shard_plan(model)
        self._adapters = [p for p in model.parameters() if p.requires_grad]
        base, adapters = _bytes(model, trainable=False), _bytes(model, trainable=True)
        device = self.root_device
        with torch.no_grad():  # a base loaded on the CPU (`model.load_on`): FSDP moves each unit to the GPU as it
            for p in ignored:  # shards it, one at a time; what it leaves alone goes here
                p.data = p.to(device)
        if torch.distributed.is_initialized():
            # every rank starts from rank 0's adapters (fresh ones are random) rather than relying on equal seeds; the
            # base is the same everywhere (read from the same files, or random_init's fixed seed). FSDP's own
            # sync_module_states would send the whole base, and refuses CPU (gloo) processes.
            with torch.no_grad():
                for p in self._adapters:
                    torch.distributed.broadcast(p.data, src=0)
        unit_ids = {id(layer) for layer in layers}
        kwargs = {**self.kwargs, "auto_wrap_policy": CustomPolicy(lambda module: id(module) in unit_ids),
                  "ignored_states": ignored}
        try:
            model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload, mixed_precision=None,
                                             sharding_strategy=self.sharding_strategy,
                                             device_id=device if device.type == "cpu" else device.index, **kwargs)
        except ValueError as err:
            raise LitMistralError(f"{NAME}: FSDP could not shard this model ({err}). Fix: use --trainer.strategy "
                                  "ddp, or report the model and settings.") from None
        held = _bytes(model, trainable=False)  # this rank's shards of the base, and what is left out
        peak = (f" Peak GPU memory so far: {torch.cuda.max_memory_allocated(device) / 2**30:,.2f} GiB."
                if device.type == "cuda" else "")
        rank_zero_info(f"{NAME}: sharded the base over {self.world_size} processes in {len(layers) + 1} FSDP units: "
                       f"this process holds {held / 2**20:,.1f} MiB of its {base / 2**20:,.1f} MiB "
                       f"({held / max(base, 1):.0%}); the adapters ({adapters / 2**20:,.1f} MiB) are on every process."
                       + peak)
        finish_fsdp_setup(self, model, device)
        return model

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        """Average the adapters' gradients over the processes (FSDP leaves them alone): one all-reduce per dtype.
        After every backward, so before Lightning's gradient clipping, hooks and optimizer step."""
        super().post_backward(closure_loss)
        if self.world_size == 1 or not self._adapters:
            return
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self._adapters:
            if p.grad is None:  # the same shapes on every rank, whatever a batch touched
                p.grad = torch.zeros_like(p)
            groups.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in groups.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)  # a sum: gloo has no average
            flat /= self.world_size
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    # checkpoints: the adapters (whole on every rank), like every other strategy's

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return trainable_state(self.lightning_module)

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        params = {clean_name(n): p for n, p in self.lightning_module.named_parameters()}
        with torch.no_grad():
            for name, value in checkpoint["state_dict"].items():  # keys checked by QLoRAModule.on_load_checkpoint
                params[name].copy_(value)

    def optimizer_state(self, optimizer) -> dict:
        return Strategy.optimizer_state(self, optimizer)  # its parameters are the replicated adapters

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        Strategy.load_optimizer_state_dict(self, checkpoint)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        Strategy.save_checkpoint(self, checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        return Strategy.load_checkpoint(self, checkpoint_path, weights_only)
