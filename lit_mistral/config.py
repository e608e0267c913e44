"""The model's settings, grouped by concern. Each group is a small typed dataclass that jsonargparse nests under
`--model.<group>.<field>` (and `--help` shows as a section of its own); each says what is wrong with its values in
`problems()`, collected and raised together before anything loads."""

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


@dataclass
class Quantization:
    """Quantization of the frozen base (bitsandbytes).

    Args:
        method: 4-bit format of the frozen base weights: nf4, fp4, or null (no quantization: LoRA on a base in the
            compute dtype).
        double_quant: Also quantize the quantization constants (about 0.4 bits per weight less).
        storage: Dtype the packed 4-bit weights are stored in. `auto`: uint8, the compute dtype under
            `fsdp_qlora`.
        fp32_norms: Keep a quantized base's norms and embeddings (the residual stream) in float32, as
            peft's `prepare_model_for_kbit_training` does.
        cache: Keep a copy of the base as quantized (`$LIT_MISTRAL_CACHE`, else `~/.cache/lit_mistral`)
            and load it on later runs with the same weights and settings.
    """

    method: Literal["nf4", "fp4"] | None = "nf4"
    double_quant: bool = False
    storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"
    fp32_norms: bool = True
    cache: bool = True


@dataclass
class LoRA:
    """LoRA adapters (peft) on the frozen base: the only weights that train.

    Args:
        r: Rank.
        alpha: Scaling numerator (scale = alpha / r).
        dropout: Dropout on the adapters' input.
        target_modules: Module names that get adapters. Default: all attention and MLP projections; add `lm_head` to
            adapt the output layer too, as the seed recipe did.
        bias: Which biases train: none, all, lora_only.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    bias: Literal["none", "all", "lora_only"] = "none"

    def problems(self) -> list[str]:
        problems = []
        if self.r < 1:
            problems.append(f"model.lora.r={self.r}: expected >= 1")
        if not 0 <= self.dropout < 1:
            problems.append(f"model.lora.dropout={self.dropout}: expected 0 <= dropout < 1")
        return problems

    def peft_kwargs(self) -> dict:
        """These settings as `peft.LoraConfig` arguments."""
        return dict(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                    target_modules=list(self.target_modules), bias=self.bias)


@dataclass
class Compute:
    """How the forward and backward passes run: dtype, attention, activation memory, fused kernels (each setting in
    full: docs/configuration.md).

    The settings that trade memory for speed without changing what is trained are `auto` by default: at the start
    of fit on one GPU the memory plan (`modeling/plan.py`) chooses the fastest that fits `memory_budget_gib`; a
    value set here wins.

    Args:
        dtype: Dtype of the 4-bit matmuls and of the unquantized base weights. `auto`: bfloat16 on GPUs, float32 on
            CPUs (most CPUs have no fast bf16 matmul).
        attn_implementation: transformers attention: `lit_varlen` (packed-aware flash attention,
            `modeling/attention.py`), `sdpa`, `eager`, `flex_attention`.
        gradient_checkpointing: Recompute activations in backward: much less memory, about a third more compute.
            `auto` (default): the memory plan decides, with `checkpoint_layers` and `offload_layers`.
        checkpoint_layers: With gradient checkpointing, recompute only the first this-many decoder layers.
            None: all. `auto`: the memory plan's choice, as few as fit (measured at the start of fit).
        offload_layers: With gradient checkpointing, this many decoder layers keep their activations in
            pinned CPU memory instead of recomputing them (`modeling/offload.py`). 0: none. `auto`: the plan's.
        offload_inputs: With gradient checkpointing, the recomputing layers keep their inputs (a batch's hidden
            states each) in pinned CPU memory, copied while they compute (`modeling/offload.py`). `auto`: the plan's.
        memory_budget_gib: The GPU memory the memory plan may take (e.g. 8, 16, 24 on a larger or shared GPU), less
            if less is free at the start. None: what the GPU has free.
        micro_batch_tokens: Tokens per forward and backward pass: each batch runs in parts of at most this
            many, gradients summed. None: whole batches. `auto`: the plan's, the fastest size that fits.
        kernels: `liger`: Liger-Kernel's fused Triton kernels for RMSNorm, SwiGLU and RoPE (GPU; pip install
            liger-kernel). None: transformers' own modules.
        loss_chunk_size: Positions per chunk of the output-layer cross-entropy (bounds logits memory).
        fused_lora: Each LoRA-adapted layer as one autograd function (`modeling/fused_lora.py`): the same
            values as peft's forward, with fewer passes over the outputs. False: peft's own forward.
        dropout_masks: What LoRA dropout keeps for backward: `keep` its masks, or `regenerate` them in backward.
            `auto`: the plan's (regenerate where layers recompute or offload). Needs `fused_lora`.
        shared_dropout: One LoRA dropout mask per shared input (q/k/v, gate/up) instead of one per adapter:
            faster, less kept for backward. Needs `fused_lora`.
        dropout_kernel: On a GPU, LoRA dropout inside the multiply by A (Triton, `modeling/lora_kernels.py`),
            its mask kept as bits. Needs `fused_lora`.
        keep_dequantized: Keep each 4-bit weight dequantized in forward for its backward: one dequantization
            less per step, more memory. Needs `fused_lora`; not with `offload_layers`. `auto`: the plan's.
    """

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: str = "lit_varlen"
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    checkpoint_layers: int | Literal["auto"] | None = "auto"
    offload_layers: int | Literal["auto"] = "auto"
    offload_inputs: bool | Literal["auto"] = "auto"
    memory_budget_gib: float | None = None
    micro_batch_tokens: int | Literal["auto"] | None = "auto"
    kernels: Literal["liger"] | None = None
    loss_chunk_size: int = 4096
    fused_lora: bool = True
    dropout_masks: Literal["auto", "keep", "regenerate"] = "auto"
    shared_dropout: bool = False
    dropout_kernel: bool = False
    keep_dequantized: bool | Literal["auto"] = "auto"

    # the settings the memory plan decides where they are `auto` (`modeling/plan.py`)
    PLANNED = ("gradient_checkpointing", "checkpoint_layers", "offload_layers", "offload_inputs",
               "micro_batch_tokens", "keep_dequantized", "dropout_masks")

    def auto(self) -> set[str]:
        """The settings of `PLANNED` left to the memory plan."""
        return {name for name in self.PLANNED if getattr(self, name) == "auto"}

    def checkpointing(self) -> bool:
        """Whether layers may recompute or offload (`gradient_checkpointing` true or `auto`)."""
        return self.gradient_checkpointing is not False

    def plain(self) -> "Compute":
        """These settings with each `auto` of `PLANNED` as its plain value, what runs without a plan (no GPU to
        measure, `fsdp_qlora`, validate and predict) and what the model is built with before the plan: every layer
        recomputes (unless `gradient_checkpointing` is false), none offloads, whole batches, weights dequantized
        again in backward, dropout masks by `regenerate_dropout`'s rule."""
        checkpointing = self.checkpointing()
        layers = self.checkpoint_layers if self.checkpoint_layers != "auto" else None
        return replace(self, gradient_checkpointing=checkpointing, checkpoint_layers=layers if checkpointing else None,
                       offload_layers=0 if self.offload_layers == "auto" or not checkpointing else self.offload_layers,
                       offload_inputs=checkpointing and self.offload_inputs is True,
                       micro_batch_tokens=None if self.micro_batch_tokens == "auto" else self.micro_batch_tokens,
                       keep_dequantized=self.keep_dequantized is True)

    def problems(self, quantized: bool) -> list[str]:
        problems = []
        if quantized and self.dtype == "float16":
            problems.append("model.compute.dtype=float16 with 4-bit weights overflows in LoRA training; use bfloat16 "
                            "(or float32 on CPUs without bf16)")
        if self.memory_budget_gib is not None and (self.memory_budget_gib <= 0 or not self.auto()):
            problems.append(f"model.compute.memory_budget_gib={self.memory_budget_gib}: a positive number, for the "
                            "memory plan; it decides nothing when every one of model.compute."
                            f"{{{','.join(self.PLANNED)}}} is set (leave some of them auto)")
        if self.micro_batch_tokens not in (None, "auto") and self.micro_batch_tokens < 1:
            problems.append(f"model.compute.micro_batch_tokens={self.micro_batch_tokens}: expected a count >= 1, auto "
                            "or null (the whole batch at once)")
        counted = self.checkpoint_layers not in ("auto", None)
        if counted and (self.checkpoint_layers < 0 or not self.checkpointing()):
            problems.append(f"model.compute.checkpoint_layers={self.checkpoint_layers}: needs "
                            "model.compute.gradient_checkpointing true or auto, and a count >= 0")
        offload = self.offload_layers not in ("auto", 0)
        if offload and (self.offload_layers < 0 or not self.checkpointing()):
            problems.append(f"model.compute.offload_layers={self.offload_layers}: needs "
                            "model.compute.gradient_checkpointing true or auto, and a count >= 0")
        if self.offload_inputs is True and not self.checkpointing():
            problems.append("model.compute.offload_inputs=true: needs model.compute.gradient_checkpointing true or "
                            "auto (only recomputing layers keep just their inputs); set it, or offload_inputs false")
        if self.dropout_masks == "regenerate" and not self.fused_lora:
            problems.append("model.compute.dropout_masks=regenerate: needs model.compute.fused_lora=true (the fused "
                            "forward draws the masks again); set it, or dropout_masks keep")
        if self.shared_dropout and not self.fused_lora:
            problems.append("model.compute.shared_dropout=true: needs model.compute.fused_lora=true (the fused forward "
                            "runs the layers that share an input together); set it, or shared_dropout false")
        if self.dropout_kernel and not self.fused_lora:
            problems.append("model.compute.dropout_kernel=true: needs model.compute.fused_lora=true (the fused forward "
                            "calls the kernels); set it, or dropout_kernel false")
        if self.keep_dequantized is True and (not self.fused_lora or offload):
            problems.append("model.compute.keep_dequantized=true: needs model.compute.fused_lora=true and "
                            "model.compute.offload_layers 0 or auto (offloaded layers would copy the weights to CPU "
                            "memory); set them, or keep_dequantized false or auto")
        if self.loss_chunk_size < 1:
            problems.append(f"model.compute.loss_chunk_size={self.loss_chunk_size}: expected >= 1")
        return problems

    def regenerate_dropout(self) -> bool:
        """Whether LoRA dropout draws its masks again in backward without a plan (`dropout_masks`, `auto` resolved
        on the plain settings: where some layers keep their activations beside others that recompute or offload)."""
        if self.dropout_masks != "auto":
            return self.dropout_masks == "regenerate"
        plain = self.plain()
        some_layers_keep = plain.gradient_checkpointing and (plain.checkpoint_layers is not None or
                                                             plain.offload_layers > 0)
        return self.fused_lora and bool(some_layers_keep)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


@dataclass
class Optimization:
    """Optimizer, learning-rate schedule, and what a non-finite loss does.

    Args:
        optimizer: paged_adamw_32bit, paged_adamw_8bit, adamw_8bit (bitsandbytes) or adamw (torch).
        learning_rate: Peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        lr_scheduler: After warmup: linear decay to 0, cosine decay to 0, or constant.
        warmup_steps: Linear warmup steps (takes precedence over `warmup_ratio`).
        warmup_ratio: Warmup as a fraction of all optimizer steps.
        nonfinite: What a NaN or infinite training loss does: `stop` the run with an error naming the step and
            batch, or `skip` that batch (no optimizer update; counted in `train/skipped_batches`).
    """

    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw"] = "paged_adamw_32bit"
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    nonfinite: Literal["stop", "skip"] = "stop"

    def problems(self) -> list[str]:
        problems = []
        if self.learning_rate <= 0:
            problems.append(f"model.optimization.learning_rate={self.learning_rate}: expected > 0")
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1:
            problems.append(f"model.optimization.warmup_steps={self.warmup_steps}, model.optimization.warmup_ratio="
                            f"{self.warmup_ratio}: expected warmup_steps >= 0 and 0 <= warmup_ratio < 1")
        return problems


@dataclass
class Generation:
    """How `predict` generates answers.

    Args:
        max_new_tokens: Most new tokens per answer.
        do_sample: Sample (True) or greedy (False).
        temperature: Sampling temperature, >= 0; 0 with `do_sample` is greedy decoding (as in OpenAI's API and
            vLLM).
        top_p: Nucleus sampling mass, in (0, 1]; 1 keeps every token.
        top_k: Sample among the k most likely tokens, >= 0; 0 keeps every token.
        seed: Seed of sampling.
        weights: Generate with `merged` weights (adapter folded into a dequantized base) or the 4-bit base
            with the `adapter`. `auto`: merged on CPUs, and on GPUs where it fits.
        engine: `continuous`: lit_mistral's engine (`generation/engine.py`; Llama/Mistral/Qwen2 families).
            `static`: transformers' `generate`. `auto`: continuous where it runs the model.
        max_rows: Answers generated together at most (rows of a decoding step).
        max_cache_tokens: KV-cache positions for all rows together (prompt + new tokens): bounds generation's
            memory. None: what `max_rows` rows of the longest prompt + answer need.
        cuda_graphs: On a GPU, replay each decoding step of the engine as a CUDA graph (captured once per batch
            size bucket): no launch overhead per kernel.
        cache: The static engine's KV cache: `dynamic` (grows as needed), or `static` (preallocated; on a GPU,
            transformers then compiles the decoding step with torch.compile: slow first batch, faster after).
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    seed: int = 0
    weights: Literal["auto", "merged", "adapter"] = "auto"
    engine: Literal["auto", "continuous", "static"] = "auto"
    max_rows: int = 64
    max_cache_tokens: int | None = None
    cuda_graphs: bool = True
    cache: Literal["dynamic", "static"] = "dynamic"

    def problems(self) -> list[str]:
        problems = [f"model.generation.{k}={v}: expected >= 1" for k, v in (
            ("max_new_tokens", self.max_new_tokens), ("max_rows", self.max_rows),
            ("max_cache_tokens", self.max_cache_tokens or 1)) if v < 1]
        # checked whatever do_sample says: a config that samples later must not hold a value that breaks it then
        if not self.temperature >= 0:  # NaN too
            problems.append(f"model.generation.temperature={self.temperature}: expected >= 0 (0 with do_sample: "
                            "greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"model.generation.top_p={self.top_p}: expected 0 < top_p <= 1 (1: every token)")
        if self.top_k < 0:
            problems.append(f"model.generation.top_k={self.top_k}: expected >= 0 (0: every token)")
        return problems

    def sampling(self, greedy: bool = False, max_new_tokens: int | None = None) -> dict:
        """Arguments of `generation.generate`: these settings, or greedy decoding (asked for, or temperature 0),
        bounded by `max_new_tokens`."""
        do_sample = self.do_sample and not greedy and self.temperature > 0
        return dict(max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=do_sample,
                    temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def answers_made_with(self) -> dict:
        """What decides an answer, as each row of predictions records it (a resumed run must match it): the answer
        limit, greedy or sampled, and how it samples."""
        made = {"max_new_tokens": self.max_new_tokens, "do_sample": self.sampling()["do_sample"]}
        if made["do_sample"]:
            made.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)
        return made


# Options before the settings were grouped: the new name of each, for the one error that an old config
# or command line gets (no aliases: two names for one setting would let a config set both).
RENAMED = {
    "model.quantize": "model.quantization.method",
    "model.double_quant": "model.quantization.double_quant",
    "model.quant_storage": "model.quantization.storage",
    "model.fp32_norms": "model.quantization.fp32_norms",
    "model.compute_dtype": "model.compute.dtype",
    "model.attn_implementation": "model.compute.attn_implementation",
    "model.gradient_checkpointing": "model.compute.gradient_checkpointing",
    "model.checkpoint_layers": "model.compute.checkpoint_layers",
    "model.kernels": "model.compute.kernels",
    "model.loss_chunk_size": "model.compute.loss_chunk_size",
    "model.lora_r": "model.lora.r",
    "model.lora_alpha": "model.lora.alpha",
    "model.lora_dropout": "model.lora.dropout",
    "model.lora_target_modules": "model.lora.target_modules",
    "model.lora_bias": "model.lora.bias",
    "model.optimizer": "model.optimization.optimizer",
    "model.learning_rate": "model.optimization.learning_rate",
    "model.weight_decay": "model.optimization.weight_decay",
    "model.betas": "model.optimization.betas",
    "model.lr_scheduler": "model.optimization.lr_scheduler",
    "model.warmup_steps": "model.optimization.warmup_steps",
    "model.warmup_ratio": "model.optimization.warmup_ratio",
    "model.nonfinite": "model.optimization.nonfinite",
    "model.max_new_tokens": "model.generation.max_new_tokens",
    "model.do_sample": "model.generation.do_sample",
    "model.temperature": "model.generation.temperature",
    "model.top_p": "model.generation.top_p",
    "model.top_k": "model.generation.top_k",
    "model.generation_seed": "model.generation.seed",
    "model.inference": "model.generation.weights",
    "model.generation_cache": "model.generation.cache",
    "model.eval_max_examples": "evaluation.max_examples",
    "model.eval_max_new_tokens": "evaluation.max_new_tokens",
    "model.eval_in_fit": "evaluation.in_fit",
    "model.compare_base": "evaluation.compare_base",
    "model.report_examples": "evaluation.report_examples",
    "model.sample_every_n_val": "evaluation.sample_every_n_val",
    "model.num_samples": "evaluation.num_samples",
    "data.instruction_field": "data.fields.instruction",
    "data.context_field": "data.fields.context",
    "data.response_field": "data.fields.response",
    "data.category_field": "data.fields.category",
    "data.predict_batch_size": "model.generation.max_rows",
    "data.predict_max_tokens": "model.generation.max_cache_tokens",
}
