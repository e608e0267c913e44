"""Building the model: the base from its source (hub, folder, GGUF, random init), quantized by bitsandbytes, with
fused kernels and activation checkpointing where asked, wrapped with fresh or saved LoRA adapters (peft). A plain
function with no Trainer in it: `fit`, `validate`, `predict`, `export` and the tests build the model alike."""

import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lit_mistral.config import DTYPES, Compute, LoRA, Quantization
from lit_mistral.errors import LitMistralError
from lit_mistral.modeling import lora_kernels, prefetch
from lit_mistral.modeling.adapters import check_targets, load_adapter
from lit_mistral.modeling.fused_lora import use_fused_lora
from lit_mistral.modeling.offload import ActivationOffload
from lit_mistral.modeling.random_base import random_quantized_model
from lit_mistral.modeling.registry import register
from lit_mistral.sources import load_tokenizer, model_folder, quantized_copy, random_init_folder, save_quantized_copy


@dataclass
class ModelSpec:
    """Everything that decides the model that is built (the module's settings, less training and generation)."""

    name_or_path: str
    gguf_file: str | None = None
    random_init: bool = False
    trust_remote_code: bool = False
    load_on: Literal["device", "cpu"] = "device"
    adapter_path: str | None = None
    quantization: Quantization = field(default_factory=Quantization)
    lora: LoRA = field(default_factory=LoRA)
    compute: Compute = field(default_factory=Compute)
    adapter_key: str = "model.adapter_path"  # the option that gave `adapter_path`, named in its errors

    def storage_dtype(self, compute_dtype: torch.dtype, sharded: bool) -> torch.dtype:
        """The dtype of the packed 4-bit weights (see `Quantization.storage`)."""
        if self.quantization.storage == "auto":
            return compute_dtype if sharded else torch.uint8
        return DTYPES[self.quantization.storage]

    def base_source(self) -> str:
        """What the adapter config names as its base: the folder the weights came from (or the id of a random
        initialization, which has no weights to load)."""
        return self.name_or_path if self.random_init else model_folder(self.name_or_path, self.gguf_file)


def build_model(spec: ModelSpec, device: torch.device, training: bool = True, sharded: bool = False):
    """`(model, tokenizer)`: the base of `spec` loaded and quantized for `device` (or on the CPU: `load_on`), made
    ready to train, and wrapped with LoRA adapters (a peft model, in train mode). `training`: for fit
    (`compute.kernels` are applied for fit, and on CUDA for generation too); `sharded`: the model will be sharded by
    `fsdp_qlora` (the 4-bit storage dtype)."""
    prefetch.wait()  # imports started before the data's setup (modeling/prefetch.py) are done before ours
    register()
    started = time.perf_counter()
    tokenizer = load_tokenizer(spec.name_or_path, spec.gguf_file, spec.trust_remote_code)
    dtype = spec.compute.torch_dtype(device)
    if spec.load_on == "cpu":  # the strategy moves it (fsdp_qlora: one layer at a time; checks.py)
        device = torch.device("cpu")
    model, kept = load_base(spec, device, dtype, sharded)
    model = wrap(prepare_base(model, spec, device, training), spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    via = f" from its 4-bit copy kept in {kept}" if kept else ""
    rank_zero_info(f"Loaded {spec.name_or_path} ({spec.quantization.method or 'unquantized'}){via} in "
                   f"{time.perf_counter() - started:.1f}s; {trainable:,} trainable parameters"
                   f"{build_notes(spec, device, training)}.")
    # from_pretrained hands back eval mode; Lightning keeps submodule modes, and checkpointing and LoRA dropout act
    # only in train mode (Lightning switches to eval for validation and predict, and back)
    return model.train(), tokenizer


def quantization_config(spec: ModelSpec, dtype: torch.dtype, sharded: bool):
    """bitsandbytes' settings for `spec`'s 4-bit base (None: unquantized)."""
    from transformers import BitsAndBytesConfig

    q = spec.quantization
    if not q.method:
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.method, bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=spec.storage_dtype(dtype, sharded))


def load_base(spec: ModelSpec, device: torch.device, dtype: torch.dtype, sharded: bool):
    """`(model, kept)`: the base of `spec` on `device`, quantized by bitsandbytes as it loads, or read from the 4-bit
    copy an earlier run kept (`Quantization.cache`; `kept` is then its folder, else None)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(dtype=dtype, trust_remote_code=spec.trust_remote_code,
                  attn_implementation=spec.compute.attn_implementation)
    q = spec.quantization
    if q.method:
        kwargs["quantization_config"] = quantization_config(spec, dtype, sharded)
    # random weights for a 4-bit base: made and quantized one decoder layer at a time (no 16-bit copy of the whole)
    layerwise = spec.random_init and q.method is not None
    folder = None if layerwise else (random_init_folder(spec.name_or_path, dtype, device) if spec.random_init else
                                     model_folder(spec.name_or_path, spec.gguf_file))
    # a 4-bit copy kept by an earlier run (Quantization.cache)
    copying = bool(q.method and q.cache and not spec.random_init and not sharded and spec.load_on == "device"
                   and not spec.trust_remote_code)
    settings = quantized_settings(kwargs["quantization_config"]) if copying else None
    copy = quantized_copy(folder, settings) if copying else None
    kept = copy[0] if copy and (copy[0] / "config.json").is_file() else None  # the copy, if written already
    try:
        if layerwise:
            config = AutoConfig.from_pretrained(model_folder(spec.name_or_path),
                                                trust_remote_code=spec.trust_remote_code)
            model = random_quantized_model(config, device, **kwargs)
        elif kept:
            load = {k: v for k, v in kwargs.items() if k != "quantization_config"}  # the copy's config says it
            model = AutoModelForCausalLM.from_pretrained(kept, device_map={"": device}, **load)
            _forget_4bit_deserialization(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": device}, **kwargs)
            if copying and rank_zero_only.rank == 0:
                copy = copy or quantized_copy(folder, settings)
                if copy:  # (None: a hub download's files were not local before the load)
                    save_quantized_copy(model, *copy)
    except OSError as err:
        raise LitMistralError(f"model.name_or_path: could not load {spec.name_or_path!r} ({err}). Fix: give a "
                              "local folder with weights, or a hub id while online.") from None
    except torch.OutOfMemoryError as err:
        raise _out_of_memory(spec, device, sharded, err) from None
    finally:
        if spec.random_init and folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return model, kept


def _out_of_memory(spec: ModelSpec, device: torch.device, sharded: bool, err: Exception) -> LitMistralError:
    fix = ("--model.load_on cpu: fsdp_qlora then brings the base to the GPUs one layer at a time, sharded"
           if sharded else "--trainer.strategy fsdp_qlora --model.load_on cpu on several GPUs "
           "(configs/qlora-fsdp.yaml): each then holds 1/N of the base, and never the whole of it")
    first = (str(err).strip().splitlines() or ["torch.OutOfMemoryError"])[0][:200]
    return LitMistralError(f"model.name_or_path: {spec.name_or_path!r} does not fit on {device} while loading "
                           f"({first}). Fix: {fix}; or a GPU with more memory.")


def prepare_base(model, spec: ModelSpec, device: torch.device, training: bool):
    """The loaded base made ready to train under adapters: no KV cache, the 4-bit layout kept, fp32 norms, fused
    kernels, activation checkpointing."""
    from peft import prepare_model_for_kbit_training

    q = spec.quantization
    model.config.use_cache = False  # training: a KV cache is dead weight (generation turns it back on)
    if q.method:
        keep_4bit_layout(model)
    if q.method and q.fp32_norms:
        # casts norms/embeddings to fp32 (and freezes the base); checkpointing is enabled below
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if spec.compute.kernels and (training or device.type == "cuda"):
        apply_kernels(model, required=training)
    compute = spec.compute.plain()  # `auto` settings as their plain values until fit's memory plan (plan.py)
    if compute.gradient_checkpointing:
        set_checkpointing(model, compute.checkpoint_layers, compute.offload_layers, compute.offload_inputs)
    return model


def wrap(model, spec: ModelSpec):
    """`model` wrapped with LoRA adapters (peft): those saved in `spec.adapter_path`, or fresh ones; with the fused
    LoRA forward if asked (`compute.fused_lora`)."""
    from peft import LoraConfig, get_peft_model

    if spec.adapter_path is not None:
        model = load_adapter(model, spec.adapter_path, spec.name_or_path, spec.adapter_key)
    else:
        check_targets(model, spec.lora.target_modules, spec.name_or_path)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **spec.lora.peft_kwargs()))
    compute = spec.compute
    if compute.fused_lora:
        # `keep_dequantized: auto` is off until fit's memory plan (plan.py)
        use_fused_lora(model, compute.regenerate_dropout(), compute.shared_dropout, compute.dropout_kernel,
                       compute.keep_dequantized is True)
    return model


def build_notes(spec: ModelSpec, device: torch.device, training: bool) -> str:
    """What the load message adds about how LoRA dropout and the 4-bit weights run in this build."""
    compute = spec.compute
    dropout = training and spec.lora.dropout > 0
    kernel = dropout and compute.fused_lora and compute.dropout_kernel and lora_kernels.available(device)
    regenerated = dropout and compute.regenerate_dropout() and not kernel
    notes = "; LoRA dropout masks drawn again in backward" if regenerated else ""
    if dropout and compute.fused_lora and compute.shared_dropout:
        notes += "; one LoRA dropout mask per shared input (q/k/v, gate/up)"
    if kernel:
        notes += "; LoRA dropout inside the multiply by A (Triton kernels), its masks kept as bits"
    if training and compute.fused_lora and compute.keep_dequantized is True and spec.quantization.method:
        notes += "; 4-bit weights dequantized once per layer and step (kept for backward)"
    return notes


def keep_4bit_layout(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking the 4-bit weights on CPUs with AVX512-BF16. It does so in place at the
    first forward in eval mode without gradients (a validation), for a kernel that multiplies in bf16 whatever the
    compute dtype and has no backward: training after a validation would then lose the gradient through every base
    layer, and validation numbers would depend on the CPU and on what ran before. The weights stay as loaded and
    multiply as on any other machine (dequantized, in the compute dtype)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _forget_4bit_deserialization(model) -> None:
    """Make a base loaded from its 4-bit copy look like one quantized while loading: transformers (5.x) keeps the
    conversions it applied on load (`_weight_conversions`) to reverse them in `save_pretrained`, and the 4-bit
    deserialization has no reverse, so saving the merged model (`export`) would fail; a base quantized while loading
    carries none."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if not any(
            type(op).__name__ == "Bnb4bitDeserialize" for op in getattr(c, "operations", []))]


def quantized_settings(config) -> str:
    """What decides the bytes of a quantized base besides its weights: the bitsandbytes settings and the versions of
    the libraries that quantize and serialize it (part of the key of its kept copy)."""
    import bitsandbytes
    import transformers

    return (f"{config.bnb_4bit_quant_type}|{config.bnb_4bit_use_double_quant}|{config.bnb_4bit_compute_dtype}|"
            f"{config.bnb_4bit_quant_storage}|transformers {transformers.__version__}|"
            f"bitsandbytes {bitsandbytes.__version__}")


def apply_kernels(model, required: bool = True) -> None:
    """Swap in Liger's fused kernels (in place; works before or after the LoRA wrapping). Not `required`
    (generation, where they only save time): without Liger installed, say so and go on."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        if not required:
            rank_zero_info("model.compute.kernels=liger: Liger-Kernel is not installed; generating with "
                           "transformers' own modules (pip install liger-kernel for the fused kernels).")
            return
        raise LitMistralError("model.compute.kernels=liger needs Liger-Kernel. Fix: pip install liger-kernel (GPU "
                              "only), or set --model.compute.kernels null.") from None
    # the chunked loss replaces the model's head + loss, so Liger's cross-entropy patches stay off
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def checkpointable_layers(model) -> list:
    """The decoder layers whose activations can be recomputed (transformers' GradientCheckpointingLayer), in order."""
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing") and
            type(m).__name__.endswith(("DecoderLayer", "Block"))]


def set_checkpointing(model, layers: int | None, offload: int = 0, inputs: bool = False) -> None:
    """Recompute the activations of `layers` decoder layers in backward (None: all but the offloaded ones), keep
    those of `offload` layers in CPU memory (`offload.py`), and those of the rest on the GPU. The offloaded layers are
    spread evenly among the first `layers + offload`, which recompute otherwise (their work hides the copies); the
    last layers keep their activations on the GPU (their backward follows forward at once). `inputs`: the
    recomputing layers keep their inputs in CPU memory too (`offload.py`)."""
    # transformers >= 5.20 renamed the switch (and warns on the old name); 5.17 has only the old one
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = checkpointable_layers(model)
    offload = min(offload, len(blocks))
    layers = len(blocks) - offload if layers is None else min(layers, len(blocks) - offload)
    spread = layers + offload
    offloaded = {k * spread // offload for k in range(offload)}
    offloader = ActivationOffload.install(model, blocks) if offload or inputs else None
    for i, block in enumerate(blocks):
        # per-layer flag of transformers' GradientCheckpointingLayer: the rest keep their activations
        block.gradient_checkpointing = i < spread and i not in offloaded
        if offloader is not None or hasattr(block, "offload_activations"):
            block.offload_activations = i in offloaded
            block.offload_inputs = inputs and block.gradient_checkpointing
        if block.gradient_checkpointing and inputs:
            # what transformers' layer calls to checkpoint itself (set again by the enabling above)
            block._gradient_checkpointing_func = partial(offloader.checkpoint_offloaded, i,
                                                         block._gradient_checkpointing_func)


def decoder(model) -> torch.nn.Module:
    """The transformer body of a peft model (embeddings, layers, final norm): hidden states, no logits."""
    return model.get_base_model().get_decoder()


def lm_head(model) -> torch.nn.Module:
    return model.get_base_model().get_output_embeddings()


def plain_head(model) -> bool:
    """Whether the output layer is a plain linear map, which the chunked loss can take; soft-capped or scaled
    logits need the model's own head + loss."""
    config = model.get_base_model().config
    return not any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
