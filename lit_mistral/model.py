"""`QLoRAModule`: a Hugging Face causal LM, 4-bit quantized by bitsandbytes (or not), with peft LoRA adapters,
trained and evaluated by Lightning. Checkpoints hold only what training changes."""

import contextlib
import json
import math
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_mistral import attention, evaluate
from lit_mistral.checkpoint import unreadable
from lit_mistral.errors import LitMistralError, raise_problems
from lit_mistral.evaluate import SplitMetrics
from lit_mistral.files import writing_folder
from lit_mistral.fsdp import save_adapter_files, trainable_state
from lit_mistral.loss import linear_cross_entropy
from lit_mistral.sources import check_model_location, load_tokenizer, model_folder, random_init_folder

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw")


def adapter_mismatches(model, folder: str | os.PathLike) -> list[str]:
    """What keeps the peft adapter in `folder` from fitting the (unwrapped) `model`: target modules it lacks, adapter
    weights for modules it does not have, and weights whose shapes differ from its layers'. Read from the adapter's
    files without loading it: peft reports a shape mismatch one tensor at a time, and loads an adapter made for a
    deeper model of the same family without a word, leaving the extra layers' weights out."""
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    trained_on = f" (trained on {config['base_model_name_or_path']})" if config.get("base_model_name_or_path") else ""
    modules = dict(model.named_modules())
    leaf_names = {name.rsplit(".", 1)[-1] for name in modules}
    problems = []
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regular expression over full module names (or peft's "all-linear")
        if targets != "all-linear" and not any(re.fullmatch(targets, name) for name in modules):
            problems.append(f"target_modules {targets!r}{trained_on} matches no module of the base model")
    else:
        missing = sorted(t for t in targets if t not in leaf_names)
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if hasattr(m, "in_features")})
            problems.append(f"target_modules {missing}{trained_on} are not in the base model, whose linear layers "
                            f"are {linear}")
    weights = folder / "adapter_model.safetensors"
    if problems or not weights.is_file():  # a .bin adapter is left to peft's own checks
        return problems
    absent, shapes = [], []
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            # base_model.model.<module path>.lora_A.weight (peft leaves the adapter name out of saved keys)
            path, _, part = key.removeprefix("base_model.model.").partition(".lora_")
            if not part:  # a fully saved module (modules_to_save, resized embeddings): its path is what matters
                path = re.sub(r"\.(base_layer|modules_to_save)\b.*|\.(weight|bias)$", "", path)
            module = modules.get(path)
            if module is None:
                absent.append(path)
                continue
            shape = tuple(f.get_slice(key).get_shape())
            expected = _lora_shape(module, part, shape)
            if expected is not None and expected != shape:
                shapes.append(f"{key.removeprefix('base_model.model.')}: adapter {list(shape)}, base layer needs "
                              f"{list(expected)}")
    if absent:
        absent = sorted(set(absent))
        problems.append(f"the adapter{trained_on} has weights for {len(absent)} module(s) the base model does not "
                        f"have, e.g. {absent[:3]}: it was made for a deeper or different model")
    if shapes:
        problems.append(f"{len(shapes)} adapter weight(s) have other shapes than the base model's layers{trained_on}, "
                        f"e.g. {'; '.join(shapes[:3])}")
    return problems


def _lora_shape(module, part: str, shape: tuple) -> tuple | None:
    """The shape a LoRA factor (`A.weight`: (r, in), `B.weight`: (out, r); embeddings alike) must have on `module`,
    keeping the adapter's rank; None when there is nothing to compare."""
    if isinstance(module, torch.nn.Embedding):
        n_in, n_out = module.num_embeddings, module.embedding_dim
    else:
        n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if n_in is None or n_out is None or len(shape) != 2:
        return None
    if part in ("A.weight", "embedding_A"):
        return (shape[0], n_in)
    if part in ("B.weight", "embedding_B"):
        return (n_out, shape[1])
    return None


class QLoRAModule(LightningModule):
    """A causal LM with LoRA adapters on a (4-bit) frozen base.

    Args:
        name_or_path: Base model: a Hugging Face hub id, a local folder, or `pkg://package/dir` (a folder inside an
            installed Python package).
        gguf_file: A .gguf file inside `name_or_path` (or an absolute path): dequantized on load, converted once
            into a cached safetensors folder.
        random_init: Initialize the weights randomly from the model's config instead of loading them (dry runs,
            benchmarks). Only the config and tokenizer of `name_or_path` are needed.
        trust_remote_code: Let transformers run code shipped with the model. Off unless you trust the source.
        quantize: 4-bit quantization of the frozen base by bitsandbytes: nf4, fp4, or null (no quantization).
        double_quant: Also quantize the quantization constants (about 0.4 bits per weight less).
        fp32_norms: With a quantized base, keep its norms and embeddings - and so the residual stream - in float32, as
            peft's `prepare_model_for_kbit_training` does (the QLoRA recipe). False keeps them in the compute dtype:
            less memory and memory traffic, slightly coarser residual sums.
        quant_storage: Dtype the packed 4-bit weights are stored in (the bits are the same). `auto`: uint8, and
            the compute dtype under `--trainer.strategy fsdp_qlora`, which shards them together with the other
            weights (FSDP flattens the parameters of a decoder layer into one tensor of one dtype).
        load_on: Where the base is loaded (and quantized): `device`, the GPU of each process (fast); or `cpu`, for
            `--trainer.strategy fsdp_qlora`, which then moves it to the GPU one decoder layer at a time, sharding
            each as it arrives: no GPU ever holds the whole base, so a base larger than one GPU trains on several.
            Quantizing on the CPU is slower (about 20M weights/s per core), and while loading each process holds the
            4-bit base in CPU memory.
        compute_dtype: Dtype of the 4-bit matmuls and of the unquantized base weights. `auto`: bfloat16 on GPUs,
            float32 on CPUs (most CPUs have no fast bf16 matmul).
        attn_implementation: transformers attention. `lit_varlen` (default) is variable-length flash attention for
            packed batches, and, outside training, for the real tokens of padded ones, grouped-head matmuls for
            decoding steps, SDPA otherwise (`lit_mistral/attention.py`); `sdpa`, `eager`, `flex_attention` also work.
        gradient_checkpointing: Recompute activations in backward: much less memory, about a third more compute.
        checkpoint_layers: With gradient checkpointing, recompute only the first this-many decoder layers and keep
            the activations of the rest: spend spare memory on speed. None: all layers.
        kernels: `liger`: Liger-Kernel's fused Triton kernels for RMSNorm, SwiGLU and RoPE (GPU only;
            pip install liger-kernel), for `fit`. None: transformers' own modules. `predict` and `validate` keep
            transformers' modules either way: in generation, where a step is a single token per row, the kernels
            made it slower (1,837 vs 2,861 new tokens/s on one H200, BENCHMARKS.md).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: Dropout on the LoRA input.
        lora_target_modules: Module names that get adapters. Default: all attention and MLP projections; add
            `lm_head` to adapt the output layer too, as the seed recipe did.
        lora_bias: Which biases train: none, all, lora_only.
        adapter_path: Start from this peft adapter folder instead of fresh adapters.
        optimizer: paged_adamw_32bit, paged_adamw_8bit, adamw_8bit (bitsandbytes) or adamw (torch).
        learning_rate: Peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        lr_scheduler: After warmup: linear decay to 0, cosine decay to 0, or constant.
        warmup_steps: Linear warmup steps (takes precedence over `warmup_ratio`).
        warmup_ratio: Warmup as a fraction of all optimizer steps.
        max_length: Longest sequence in tokens; linked to `data.max_length` by the CLI.
        loss_chunk_size: Positions per chunk of the output-layer cross-entropy (bounds logits memory).
        inference: Generation (predict) runs on `merged` weights (the adapter folded into a dequantized copy of the
            base: plain matmuls, no LoRA overhead, as much memory as the unquantized model) or on the 4-bit base
            with the `adapter` applied. `auto`: merged on CPUs, and on GPUs when the unquantized model fits in a
            third of the free memory.
        generation_cache: Generation KV cache: `dynamic` (grows as needed), or `static` (preallocated; on a GPU,
            transformers then compiles the decoding step with torch.compile: slow first batch, faster after).
        nonfinite: What a NaN or infinite training loss does: `stop` the run with an error naming the step and
            batch, or `skip` that batch (no optimizer update; counted in `train/skipped_batches`).
        max_new_tokens: Generation: most new tokens per answer.
        do_sample: Generation: sample (True) or greedy (False).
        temperature: Generation: sampling temperature.
        top_p: Generation: nucleus sampling mass.
        top_k: Generation: sample among the k most likely tokens.
        generation_seed: Generation: seed of sampling.
        eval_max_examples: Generation metrics: how many validation examples (the first ones) `validate` answers
            greedily and scores against their references (ROUGE-L; exact match and contains-answer in the
            closed-form categories). 0 turns generation metrics off (loss and perplexity are always reported).
        eval_max_new_tokens: Generation metrics and samples: most new tokens per answer.
        eval_in_fit: Also compute generation metrics at every validation during `fit` (by default only `validate`
            does: generating costs far more than the loss).
        compare_base: `validate` also evaluates the base model (the adapter switched off) on the same examples, and
            its report (evaluation.md and .json in the run folder) puts both side by side; needs an adapter
            (`--ckpt_path`). With `fit`, the CLI ends the run with this comparison, in the same run folder.
        report_examples: How many answers the report shows side by side (all are in evaluation.json).
        sample_every_n_val: During `fit`, every this-many validation runs, answer the first `num_samples`
            validation prompts greedily and log them to TensorBoard as text. 0: never.
        num_samples: How many validation prompts `sample_every_n_val` answers.
    """

    def __init__(
        self,
        name_or_path: str = "mistralai/Mistral-7B-v0.1",
        gguf_file: str | None = None,
        random_init: bool = False,
        trust_remote_code: bool = False,
        quantize: Literal["nf4", "fp4"] | None = "nf4",
        double_quant: bool = False,
        fp32_norms: bool = True,
        quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto",
        load_on: Literal["device", "cpu"] = "device",
        compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto",
        attn_implementation: str = attention.NAME,
        gradient_checkpointing: bool = True,
        checkpoint_layers: int | None = None,
        kernels: Literal["liger"] | None = None,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        lora_bias: Literal["none", "all", "lora_only"] = "none",
        adapter_path: str | None = None,
        optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw"] = "paged_adamw_32bit",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_scheduler: Literal["linear", "cosine", "constant"] = "linear",
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        max_length: int = 2048,
        loss_chunk_size: int = 4096,
        inference: Literal["auto", "merged", "adapter"] = "auto",
        generation_cache: Literal["dynamic", "static"] = "dynamic",
        nonfinite: Literal["stop", "skip"] = "stop",
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.95,
        top_k: int = 50,
        generation_seed: int = 0,
        eval_max_examples: int = 64,
        eval_max_new_tokens: int = 128,
        eval_in_fit: bool = False,
        compare_base: bool = False,
        report_examples: int = 3,
        sample_every_n_val: int = 0,
        num_samples: int = 2,
    ) -> None:
        super().__init__()
        problems = []
        if lora_r < 1:
            problems.append(f"model.lora_r={lora_r}: expected >= 1")
        if not 0 <= lora_dropout < 1:
            problems.append(f"model.lora_dropout={lora_dropout}: expected 0 <= dropout < 1")
        if learning_rate <= 0:
            problems.append(f"model.learning_rate={learning_rate}: expected > 0")
        if warmup_steps < 0 or not 0 <= warmup_ratio < 1:
            problems.append(f"model.warmup_steps={warmup_steps}, model.warmup_ratio={warmup_ratio}: expected "
                            "warmup_steps >= 0 and 0 <= warmup_ratio < 1")
        if quantize is not None and compute_dtype == "float16":
            problems.append("model.compute_dtype=float16 with 4-bit weights overflows in LoRA training; "
                            "use bfloat16 (or float32 on CPUs without bf16)")
        if checkpoint_layers is not None and (checkpoint_layers < 0 or not gradient_checkpointing):
            problems.append(f"model.checkpoint_layers={checkpoint_layers}: needs model.gradient_checkpointing=true "
                            "and a count >= 0")
        if max_new_tokens < 1:
            problems.append(f"model.max_new_tokens={max_new_tokens}: expected >= 1")
        if eval_max_new_tokens < 1:
            problems.append(f"model.eval_max_new_tokens={eval_max_new_tokens}: expected >= 1")
        for key, value in (("eval_max_examples", eval_max_examples), ("report_examples", report_examples),
                           ("sample_every_n_val", sample_every_n_val), ("num_samples", num_samples)):
            if value < 0:
                problems.append(f"model.{key}={value}: expected >= 0")
        raise_problems(problems, "Fix: correct these model settings.")
        if adapter_path is not None and not (Path(adapter_path) / "adapter_config.json").is_file():
            raise LitMistralError(f"model.adapter_path: {adapter_path!r} is not a peft adapter folder (no "
                                  "adapter_config.json). Fix: point it at the `adapter` folder a fit run wrote.")
        if not random_init:
            check_model_location(name_or_path, gguf_file)
        self.name_or_path, self.gguf_file, self.random_init = name_or_path, gguf_file, random_init
        self.trust_remote_code = trust_remote_code
        self.quantize, self.double_quant, self._compute_dtype = quantize, double_quant, compute_dtype
        self.fp32_norms, self.quant_storage, self.load_on = fp32_norms, quant_storage, load_on
        self.attn_implementation, self.gradient_checkpointing = attn_implementation, gradient_checkpointing
        self.checkpoint_layers, self.kernels = checkpoint_layers, kernels
        self.lora = dict(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         target_modules=list(lora_target_modules or DEFAULT_TARGETS), bias=lora_bias)
        self.adapter_path = adapter_path
        self.optim = dict(name=optimizer, lr=learning_rate, weight_decay=weight_decay, betas=tuple(betas),
                          scheduler=lr_scheduler, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio)
        self.max_length, self.loss_chunk_size = max_length, loss_chunk_size
        self.nonfinite, self.skipped_batches = nonfinite, 0
        self.generation = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                               top_p=top_p, top_k=top_k)
        self.generation_seed = generation_seed
        self.eval_max_examples, self.eval_max_new_tokens, self.eval_in_fit = eval_max_examples, eval_max_new_tokens, eval_in_fit
        self.compare_base, self.report_examples = compare_base, report_examples
        self.sample_every_n_val, self.num_samples = sample_every_n_val, num_samples
        self._val_metrics: dict[str, SplitMetrics] = {}  # column ("model", "base") -> its metrics of this run
        self._val_run_examples, self._val_run_answered = [], []  # set by on_validation_start
        self._val_runs = 0  # validation runs of this fit, for sample_every_n_val
        self.inference, self.generation_cache = inference, generation_cache
        self.strict_loading = False  # checkpoints hold the adapter only; on_load_checkpoint checks it is complete
        self.model = None
        self.tokenizer = None
        self._clock = {}
        self.throughput: dict = {}  # the last tokens/s, peak memory and time-to-first-step measured

    # -- building the model ------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Called by Lightning after data setup (so bad data fails before the expensive load)."""
        if self.model is None:
            self.build(self.trainer.strategy.root_device if self._trainer is not None else self.device)

    def build(self, device: torch.device) -> None:
        """Load the base for `device` (quantizing it there, or on the CPU: `load_on`), then wrap it with LoRA
        adapters."""
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        self._clock["load_start"] = time.perf_counter()
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        self.tokenizer = getattr(datamodule, "tokenizer", None) or load_tokenizer(
            self.name_or_path, self.gguf_file, self.trust_remote_code)
        dtype = self.compute_dtype(device)
        if self.load_on == "cpu":  # the strategy moves it (fsdp_qlora: one layer at a time; checks.py)
            device = torch.device("cpu")
        folder = random_init_folder(self.name_or_path, dtype, device) if self.random_init else (
            model_folder(self.name_or_path, self.gguf_file))
        kwargs = dict(dtype=dtype, device_map={"": device}, trust_remote_code=self.trust_remote_code,
                      attn_implementation=self.attn_implementation)
        if self.quantize:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=self.quantize, bnb_4bit_use_double_quant=self.double_quant,
                bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=self.storage_dtype(dtype))
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except OSError as err:
            raise LitMistralError(f"model.name_or_path: could not load {self.name_or_path!r} ({err}). Fix: give a "
                                  "local folder with weights, or a hub id while online.") from None
        except torch.OutOfMemoryError as err:
            fix = ("--model.load_on cpu: fsdp_qlora then brings the base to the GPUs one layer at a time, sharded"
                   if self.sharded else "--trainer.strategy fsdp_qlora --model.load_on cpu on several GPUs "
                   "(configs/qlora-fsdp.yaml): each then holds 1/N of the base, and never the whole of it")
            first = (str(err).strip().splitlines() or ["torch.OutOfMemoryError"])[0][:200]
            raise LitMistralError(f"model.name_or_path: {self.name_or_path!r} does not fit on {device} while loading "
                                  f"({first}). Fix: {fix}; or a GPU with more memory.") from None
        finally:
            if self.random_init:
                shutil.rmtree(folder, ignore_errors=True)
        model.config.use_cache = False  # training: a KV cache is dead weight (generation turns it back on)
        if self.quantize and self.fp32_norms:
            # casts norms/embeddings to fp32 (and freezes the base); checkpointing is enabled below
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        stage = self._trainer.state.fn if self._trainer is not None else None
        if self.kernels and stage in (None, "fit"):
            self.apply_kernels(model)
        if self.gradient_checkpointing:
            self.set_checkpointing(model, self.checkpoint_layers)
        if self.adapter_path is not None:
            model = self._load_adapter(model, self.adapter_path)
        else:
            self._check_targets(model)
            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **self.lora))
        # from_pretrained hands back eval mode; Lightning keeps submodule modes, and checkpointing and LoRA dropout
        # act only in train mode (Lightning switches to eval for validation and predict, and back)
        self.model = model.train()
        base = model.get_base_model()
        # soft-capped or scaled logits need the model's own head + loss; plain heads take the chunked path
        self._plain_head = not any(getattr(base.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rank_zero_info(f"Loaded {self.name_or_path} ({self.quantize or 'unquantized'}) in "
                       f"{time.perf_counter() - self._clock['load_start']:.1f}s; {trainable:,} trainable parameters.")

    def apply_kernels(self, model) -> None:
        """Swap in fused kernels (in place; works before or after the LoRA wrapping)."""
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError:
            raise LitMistralError("model.kernels=liger needs Liger-Kernel. Fix: pip install liger-kernel "
                                  "(GPU only), or set --model.kernels null.") from None
        # our chunked loss replaces the model's head + loss, so Liger's cross-entropy patches stay off
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)

    @staticmethod
    def set_checkpointing(model, layers: int | None) -> None:
        """Recompute the activations of the first `layers` decoder layers in backward (all when None)."""
        # transformers >= 5.20 renamed the switch (and warns on the old name); 5.17 has only the old one
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if layers is not None:
            # per-layer flag of transformers' GradientCheckpointingLayer: the rest keep their activations
            blocks = [m for m in model.modules() if hasattr(m, "gradient_checkpointing") and
                      type(m).__name__.endswith(("DecoderLayer", "Block"))]
            for i, block in enumerate(blocks):
                block.gradient_checkpointing = i < layers

    @property
    def decoder(self) -> torch.nn.Module:
        """The transformer body (embeddings, layers, final norm) under the adapters: hidden states, no logits."""
        return self.model.get_base_model().get_decoder()

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_base_model().get_output_embeddings()

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        if self._compute_dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self._compute_dtype]

    @property
    def sharded(self) -> bool:
        """Whether the trainer shards the model with FSDP (`--trainer.strategy fsdp_qlora`)."""
        from lightning.pytorch.strategies import FSDPStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)

    def storage_dtype(self, compute_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the packed 4-bit weights (see `quant_storage`)."""
        if self.quant_storage == "auto":
            return compute_dtype if self.sharded else torch.uint8
        return DTYPES[self.quant_storage]

    def _check_targets(self, model) -> None:
        leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in self.lora["target_modules"] if t not in leaf_names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__})
            raise LitMistralError(f"model.lora_target_modules: {missing} match no module of {self.name_or_path}. "
                                  f"Fix: choose among {linear}.")

    def _load_adapter(self, model, path: str):
        from peft import PeftModel

        fix = "Fix: evaluate the adapter on the base model it was trained on (its adapter_config.json names it)."
        problems = adapter_mismatches(model, path)
        if problems:
            raise LitMistralError(f"model.adapter_path: the adapter in {path!r} does not fit {self.name_or_path}:\n"
                                  + "".join(f"  {p}\n" for p in problems) + fix)
        try:
            return PeftModel.from_pretrained(model, path, is_trainable=True)
        except pickle.UnpicklingError as err:  # peft reads a .bin adapter with torch.load(weights_only=True)
            raise unreadable(Path(path) / "adapter_model.bin", err) from None
        except (RuntimeError, ValueError, KeyError) as err:
            raise LitMistralError(f"model.adapter_path: the adapter in {path!r} does not fit {self.name_or_path} "
                                  f"({str(err).splitlines()[0][:300]}). {fix}") from None

    # -- loss --------------------------------------------------------------------------------------------------------

    def _packed_kwargs(self, batch: dict) -> dict:
        if "cu_seq_lens" not in batch:
            return {"attention_mask": batch["attention_mask"]}
        kwargs = {"position_ids": batch["position_ids"]}
        if self.model.config._attn_implementation == attention.NAME:
            cu, longest = batch["cu_seq_lens"], batch["max_length"]
            # an all-ones 2D mask stops transformers from building a dense block-diagonal mask we would not use
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest,
                          attention_mask=torch.ones_like(batch["input_ids"]))
        # other implementations isolate examples through transformers' own mask from position_ids
        return kwargs

    def _token_losses(self, batch: dict, reduction: Literal["sum", "none"]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token cross-entropies over labelled positions (summed, or (N,) row-major), and the (B, T-1) mask of them."""
        labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
        selected = labels != -100
        if not self._plain_head:
            logits = self.model(input_ids=batch["input_ids"], use_cache=False, **self._packed_kwargs(batch)).logits
            logits = logits[:, :-1][selected].float()
            return torch.nn.functional.cross_entropy(logits, labels[selected], reduction=reduction), selected
        hidden = self.decoder(input_ids=batch["input_ids"], use_cache=False,
                              **self._packed_kwargs(batch)).last_hidden_state  # (B, T, H)
        loss = linear_cross_entropy(hidden[:, :-1][selected], self.lm_head, labels[selected], self.loss_chunk_size,
                                    reduction)
        return loss, selected

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of token cross-entropies over labelled positions, and their count."""
        loss, selected = self._token_losses(batch, "sum")
        return loss, selected.sum()

    def example_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example of the batch: the sum of its token cross-entropies and its count of labelled tokens, (E,)
        each (E = rows of a padded batch, examples of a packed row)."""
        losses, selected = self._token_losses(batch, "none")  # (N,) in the row-major order of `selected`
        if "cu_seq_lens" in batch:
            # one packed row: position t is labelled with token t+1, which belongs to the example whose span holds it
            bounds = batch["cu_seq_lens"].to(selected.device, torch.long)
            targets = torch.arange(1, selected.shape[1] + 1, device=selected.device)
            owner = torch.bucketize(targets, bounds[1:], right=True)[None]  # (1, T-1)
            n = len(bounds) - 1
        else:
            owner = torch.arange(selected.shape[0], device=selected.device)[:, None]  # (B, 1): the row
            n = selected.shape[0]
        owner = owner.expand_as(selected)[selected]
        sums = torch.zeros(n, dtype=torch.float32, device=losses.device).index_add_(0, owner, losses.float())
        return sums, torch.bincount(owner, minlength=n)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss_sum, count = self.loss_sum(batch)
        loss = loss_sum / count.clamp(min=1)
        if self._nonfinite(loss, batch_idx):
            return None  # Lightning skips backward and the optimizer update for this batch
        self.log("train/loss", loss, prog_bar=True, batch_size=int(count))
        return loss

    def _nonfinite(self, loss: torch.Tensor, batch_idx: int) -> bool:
        """Stop on a NaN/inf loss (or report it to be skipped) instead of training on garbage gradients."""
        # all ranks decide together, so that they all skip or all stop
        if not self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False):
            return False
        where = f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx} of the epoch)"
        if self.nonfinite == "stop":
            raise LitMistralError(
                f"the training loss is {loss.item()} at {where}. Checkpoints written so far hold finite weights. "
                "Fix: lower --model.learning_rate or add --model.warmup_steps; train in bf16-mixed or 32-true rather "
                "than float16; then continue with --ckpt_path last. Or set --model.nonfinite skip to skip such "
                "batches.")
        self.skipped_batches += 1
        rank_zero_warn(f"the training loss is {loss.item()} at {where}: batch skipped (model.nonfinite=skip; "
                       f"{self.skipped_batches} so far).")
        self.log("train/skipped_batches", float(self.skipped_batches))
        return True

    # -- validation: loss per category, generation metrics, the base alongside, samples ------------------------------

    def _val_examples(self) -> list:
        """The validation examples of the datamodule (empty with a DataModule that does not keep them)."""
        return list(getattr(getattr(self._trainer, "datamodule", None), "val_examples", None) or [])

    def _generating(self) -> bool:
        fn = self.trainer.state.fn
        return (self.eval_max_examples > 0 and not self.trainer.sanity_checking
                and (fn == "validate" or (fn == "fit" and self.eval_in_fit)))

    def _adapter_state(self, column: str):
        """`model`: the model as loaded (with its adapter); `base`: the same model with the adapter switched off."""
        return self.model.disable_adapter() if column == "base" else contextlib.nullcontext()

    def on_validation_start(self) -> None:
        comparing = self.compare_base and self.trainer.state.fn == "validate"
        trained = self.global_step > 0  # validate right after fit (the CLI's compare_base): the adapter just trained
        if comparing and self.adapter_path is None and self.trainer.ckpt_path is None and not trained:
            raise LitMistralError("model.compare_base: there is no adapter to compare with the base model. Fix: pass "
                                  "--ckpt_path with the `adapter` folder (or a .ckpt file) of a fit run.")
        # read once per validation run: the examples, and those answered for generation metrics
        examples = self._val_run_examples = self._val_examples()
        answered = self._val_run_answered = examples[: self.eval_max_examples] if self._generating() else []
        self._val_metrics = {column: SplitMetrics([e.category for e in examples], [e.category for e in answered],
                                                  self.device)
                             for column in (("model", "base") if comparing else ("model",))}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        examples = self._val_run_examples
        # our batches carry each example's position in val_examples, and so its category
        categories = [examples[i].category if i is not None else None
                      for i in batch.get("index", [])] if examples else None
        for column, metrics in self._val_metrics.items():
            with self._adapter_state(column):
                sums, counts = self.example_losses(batch)
            metrics.update_loss(sums, counts, categories)

    def on_validation_epoch_end(self) -> None:
        examples, answered = self._val_run_examples, self._val_run_answered
        results, records, counts = {}, {}, {}
        for column, metrics in self._val_metrics.items():
            if answered:
                with self._adapter_state(column):
                    records[column] = self.answer(answered)
                metrics.score(records[column])
            results[column], counts = metrics.compute(), metrics.counts()
            metrics.reset()
        if "loss" not in results.get("model", {}):
            return  # no validation batches ran
        for column, values in results.items():
            for key, value in values.items():  # already reduced over processes by torchmetrics
                name = evaluate.COLUMNS[column] + key
                self.log(name, value, prog_bar=name in ("val/loss", "val/ppl"), sync_dist=False)
        if self.trainer.state.fn == "validate":
            self._report(results, records, counts, len(examples))
        elif self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._val_runs += 1
            boards = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
            if (self.sample_every_n_val and self._val_runs % self.sample_every_n_val == 0 and examples
                    and self.num_samples and boards):
                shown = examples[: self.num_samples]
                done = records.get("model", [])  # eval_in_fit has answered them already
                self._log_samples(boards, done[: len(shown)] if len(done) >= len(shown) else self.answer(shown))

    def answer(self, examples: list) -> list[dict]:
        """Greedy answers of the model in its current adapter state to `examples` (bounded by
        eval_max_new_tokens), split across processes and gathered, so every process returns all of them."""
        datamodule = self.trainer.datamodule
        rank, world = self.trainer.global_rank, self.trainer.world_size
        settings = dict(self.generation, do_sample=False, max_new_tokens=self.eval_max_new_tokens)
        mine = examples[rank::world]
        lockstep = self.sharded and world > 1
        if lockstep:
            # every decoding step is a collective under FSDP: the same number of batches on every rank (a rank short
            # of one example answers its first again, dropped below), and generate's synced_gpus, which keeps
            # stepping a rank whose answers have ended until all have
            settings["synced_gpus"] = True
            n = len(mine)
            mine = mine + examples[:1] * (-(-len(examples) // world) - n)
        with self._whole_root():
            mine = evaluate.answer(self.model, self.tokenizer, datamodule.style, mine, datamodule.batch_size,
                                   self.device, settings, self.context_window)
        if lockstep:
            mine = mine[:n]
        for record in mine:
            record["index"] = record["index"] * world + rank  # position in `examples`
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, mine)
            mine = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
        return mine

    def _whole_root(self):
        """Under FSDP the weights of the root unit (embeddings, final norm, head) are whole only inside its forward,
        which Lightning runs around the step methods; generation from a hook runs outside it and gathers them. The
        decoder layers gather their own in their forward."""
        if not self.sharded:
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(self.trainer.strategy.model, recurse=False, writeback=False)

    def _report(self, results: dict, records: dict, counts: dict, n_examples: int) -> None:
        """Write evaluation.json and evaluation.md into the run folder and log the Markdown to TensorBoard."""
        # trainer.log_dir is a collective call when several processes run: every rank asks, rank 0 writes
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if not self.trainer.is_global_zero:
            return
        adapter = self.adapter_path or self.trainer.ckpt_path or (
            str(folder / "adapter") if self.global_step > 0 else None)  # right after fit: the adapter it saved
        info = {"model": self.name_or_path, "gguf_file": self.gguf_file, "adapter": str(adapter) if adapter else None,
                "quantize": self.quantize, "global_step": self.global_step, "max_new_tokens": self.eval_max_new_tokens,
                "val_examples": n_examples, "counts": counts,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "versions": evaluate.versions()}
        document, markdown = evaluate.build_report(results, records, info, self.report_examples)
        json_path, md_path = evaluate.write_report(folder, document, markdown)
        rank_zero_info(f"Wrote the evaluation report to {md_path} and {json_path.name}")
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("evaluation", markdown, global_step=self.global_step)

    def _log_samples(self, boards: list[TensorBoardLogger], records: list[dict]) -> None:
        """Log answers to fixed validation prompts as TensorBoard text, one tag per prompt (a slider over steps)."""
        if not self.trainer.is_global_zero:
            return
        for logger in boards:
            for i, record in enumerate(records):
                context = f"\n\n**Context:** {record['context']}" if record["context"] else ""
                text = (f"**Instruction:** {record['instruction']}{context}\n\n**Reference:** {record['reference']}"
                        f"\n\n**Step {self.global_step}** ({record['finish']}): {record['response'] or record.get('error', '')}")
                logger.experiment.add_text(f"samples/{i}", text, global_step=self.global_step)

    # -- what gets logged each step ----------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        if self.device.type == "cuda":  # the model is loaded and set up (sharded, under FSDP); nothing has run yet
            self._clock["load_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30

    def on_train_start(self) -> None:
        if self.device.type == "cuda":  # what the model takes on this GPU (a 1/N share of the base under FSDP), and
            # the most it took while loading (the whole 4-bit base, unless `load_on` cpu under FSDP)
            self._log_once({"train/model_mem_gib": torch.cuda.memory_allocated(self.device) / 2**30,
                            "train/load_peak_mem_gib": self._clock["load_peak_gib"]})

    def _log_once(self, metrics: dict[str, float]) -> None:
        """Log `metrics` at this step from rank 0 (self.log would repeat the values at every later step)."""
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._clock.setdefault("window_start", time.perf_counter())
        self._clock.setdefault("tokens", 0)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self._clock["tokens"] += batch["num_tokens"]
        first = "first_step" not in self._clock
        if not first and (batch_idx + 1) % self.trainer.log_every_n_steps:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        metrics = {}
        if first:  # model load + data + first step: what a user waits before training really starts
            metrics["train/time_to_first_step_s"] = self._clock["first_step"] = now - self._clock.get("load_start", now)
        else:  # all processes' tokens (every process reaches this line at the same step)
            tokens = self.trainer.strategy.reduce(torch.tensor(float(self._clock["tokens"]), device=self.device),
                                                  reduce_op="sum")
            metrics["train/tokens_per_s"] = float(tokens) / (now - self._clock["window_start"])
        if self.device.type == "cuda":
            metrics["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._clock.update(window_start=now, tokens=0)
        self.throughput = metrics  # for callers of fit in Python
        self._log_once(metrics)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    # -- optimizer ---------------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        from transformers import get_scheduler

        params = [p for p in self.parameters() if p.requires_grad]
        o = self.optim
        if o["name"] == "adamw":
            optimizer = torch.optim.AdamW(params, lr=o["lr"], betas=o["betas"], weight_decay=o["weight_decay"])
        else:
            import bitsandbytes as bnb

            cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                   "adamw_8bit": bnb.optim.AdamW8bit}[o["name"]]
            optimizer = cls(params, lr=o["lr"], betas=o["betas"], weight_decay=o["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = o["warmup_steps"] or math.ceil(o["warmup_ratio"] * total)
        name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[o["scheduler"]]
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints: the adapter, not the 4-bit base ----------------------------------------------------------------

    def _trainable_names(self) -> set[str]:
        return set(trainable_state(self))

    def _signature(self) -> dict:
        return {"name_or_path": self.name_or_path, "gguf_file": self.gguf_file, "quantize": self.quantize,
                "lora": self.lora}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self._trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lit_mistral"] = self._signature()
        checkpoint["skipped_batches"] = self.skipped_batches
        # RNG streams (LoRA dropout, sampling): a resumed run draws what the uninterrupted one would have. Every
        # process's: they drift apart (each draws dropout masks for batches of its own shapes)
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        states = [state]
        if self._trainer is not None and self.trainer.world_size > 1:  # every process runs this hook
            states = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(states, state)
        checkpoint["rng"] = states

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("lit_mistral")
        if saved is None:
            raise LitMistralError("ckpt_path: this checkpoint was not written by lit_mistral (no adapter record). "
                                  "Fix: pass a checkpoint from a lit_mistral fit run, or its adapter folder.")
        ours = self._signature()
        diffs = [f"model.{k}: checkpoint has {saved.get(k)!r}, this run has {ours[k]!r}"
                 for k in ("name_or_path", "gguf_file", "quantize") if saved.get(k) != ours[k]]
        diffs += [f"model.lora_{k.replace('lora_', '')}: checkpoint has {saved['lora'].get(k)!r}, this run has {v!r}"
                  for k, v in ours["lora"].items() if saved["lora"].get(k) != v]
        state, expected = checkpoint["state_dict"], self._trainable_names()
        if not diffs and set(state) != expected:
            diffs.append(f"the checkpoint's {len(state)} adapter tensors do not match this model's {len(expected)}")
        if diffs:
            raise_problems(diffs, "Fix: run with the config the checkpoint was trained with (its run folder holds "
                                  "config.yaml).")
        self.skipped_batches = checkpoint.get("skipped_batches", 0)
        states = checkpoint.get("rng")
        if states and self._trainer is not None and self.trainer.state.fn == "fit":
            # on another process count, the streams of the first processes go on (none is exactly as it would be)
            state = states[self.trainer.global_rank % len(states)]
            torch.set_rng_state(state["torch"])
            random.setstate(state["python"])
            if "cuda" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda"], self.device)

    def save_adapter(self, folder: str | os.PathLike) -> Path:
        """Write the adapter in peft's format (adapter_config.json + adapter_model.safetensors) with the tokenizer,
        loadable by `peft.PeftModel.from_pretrained(base, folder)`. Written under a temporary name, then renamed."""
        folder = Path(folder)
        with writing_folder(folder) as tmp:
            config = self.model.peft_config["default"]
            config.base_model_name_or_path = (self.name_or_path if self.random_init
                                              else model_folder(self.name_or_path, self.gguf_file))
            if self.sharded:
                save_adapter_files(self.model, tmp)
            else:
                self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
        return folder

    def on_train_end(self) -> None:
        # trainer.log_dir is a collective call under DDP: every rank asks, rank 0 writes
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "adapter"
        if self.trainer.is_global_zero:
            self.save_adapter(folder)
            rank_zero_info(f"Saved the peft adapter to {folder}")

    # -- generation --------------------------------------------------------------------------------------------------

    def _merge_for_inference(self) -> bool:
        if self.inference == "adapter":
            return False
        if self.inference == "merged" or self.device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        unquantized = sum(p.numel() for p in self.model.parameters()) * self.compute_dtype(self.device).itemsize
        return 3 * unquantized < free + unquantized // 4  # the 4-bit copy is freed layer by layer while merging

    @property
    def context_window(self) -> int | None:
        """Longest prompt + answer the model takes, in tokens (None: not stated by its config)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def on_predict_start(self) -> None:
        """Runs after a checkpoint was restored, so the adapter weights are final: fold them in if asked."""
        from peft import PeftModel

        from lit_mistral.export import merge_adapter

        torch.manual_seed(self.generation_seed)
        if isinstance(self.model, PeftModel) and self._merge_for_inference():
            started = time.perf_counter()
            self.model = merge_adapter(self.model, self.compute_dtype(self.device))
            rank_zero_info(f"Merged the adapter into a dequantized copy of the base for generation "
                           f"({time.perf_counter() - started:.1f}s; --model.inference adapter keeps them apart).")
        self.model.config.use_cache = True

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        from lit_mistral.predict import generate

        return generate(self.model, self.tokenizer, batch, context=self.context_window, cache=self.generation_cache,
                        **self.generation)
