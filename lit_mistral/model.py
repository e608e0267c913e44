"""`QLoRAModule`: a Hugging Face causal LM, 4-bit quantized by bitsandbytes (or not), with peft LoRA adapters,
trained and evaluated by Lightning. Checkpoints hold only what training changes."""

import math
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from lit_mistral import attention
from lit_mistral.checkpoint import unreadable
from lit_mistral.errors import LitMistralError, raise_problems
from lit_mistral.files import writing_folder
from lit_mistral.loss import linear_cross_entropy
from lit_mistral.sources import check_model_location, load_tokenizer, model_folder, random_init_folder

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw")


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
        quant_storage: Dtype the packed 4-bit weights are stored in. `bfloat16` lets FSDP shard them together with
            the other bf16 weights (FSDP flattens parameters of one dtype); the bits are the same.
        compute_dtype: Dtype of the 4-bit matmuls and of the unquantized base weights. `auto`: bfloat16 on GPUs,
            float32 on CPUs (most CPUs have no fast bf16 matmul).
        attn_implementation: transformers attention. `lit_varlen` (default) is SDPA for padded batches and
            variable-length flash attention for packed ones; `sdpa`, `eager`, `flex_attention` also work.
        gradient_checkpointing: Recompute activations in backward: much less memory, about a third more compute.
        checkpoint_layers: With gradient checkpointing, recompute only the first this-many decoder layers and keep
            the activations of the rest: spend spare memory on speed. None: all layers.
        kernels: `liger`: Liger-Kernel's fused Triton kernels for RMSNorm, SwiGLU and RoPE (GPU only;
            pip install liger-kernel). None: transformers' own modules.
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
        quant_storage: Literal["uint8", "bfloat16"] = "uint8",
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
        raise_problems(problems, "Fix: correct these model settings.")
        if adapter_path is not None and not (Path(adapter_path) / "adapter_config.json").is_file():
            raise LitMistralError(f"model.adapter_path: {adapter_path!r} is not a peft adapter folder (no "
                                  "adapter_config.json). Fix: point it at the `adapter` folder a fit run wrote.")
        if not random_init:
            check_model_location(name_or_path, gguf_file)
        self.name_or_path, self.gguf_file, self.random_init = name_or_path, gguf_file, random_init
        self.trust_remote_code = trust_remote_code
        self.quantize, self.double_quant, self._compute_dtype = quantize, double_quant, compute_dtype
        self.fp32_norms, self.quant_storage = fp32_norms, quant_storage
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
        self.inference, self.generation_cache = inference, generation_cache
        self.strict_loading = False  # checkpoints hold the adapter only; on_load_checkpoint checks it is complete
        self.model = None
        self.tokenizer = None
        self.val_loss = MeanMetric()
        self._clock = {}
        self.throughput: dict = {}  # the last tokens/s, peak memory and time-to-first-step measured

    # -- building the model ------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Called by Lightning after data setup (so bad data fails before the expensive load)."""
        if self.model is None:
            self.build(self.trainer.strategy.root_device if self._trainer is not None else self.device)

    def build(self, device: torch.device) -> None:
        """Load the base (quantizing it on `device`), then wrap it with LoRA adapters."""
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        self._clock["load_start"] = time.perf_counter()
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        self.tokenizer = getattr(datamodule, "tokenizer", None) or load_tokenizer(
            self.name_or_path, self.gguf_file, self.trust_remote_code)
        dtype = self.compute_dtype(device)
        folder = random_init_folder(self.name_or_path, dtype, device) if self.random_init else (
            model_folder(self.name_or_path, self.gguf_file))
        kwargs = dict(dtype=dtype, device_map={"": device}, trust_remote_code=self.trust_remote_code,
                      attn_implementation=self.attn_implementation)
        if self.quantize:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=self.quantize, bnb_4bit_use_double_quant=self.double_quant,
                bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=DTYPES.get(self.quant_storage, torch.uint8))
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except OSError as err:
            raise LitMistralError(f"model.name_or_path: could not load {self.name_or_path!r} ({err}). Fix: give a "
                                  "local folder with weights, or a hub id while online.") from None
        finally:
            if self.random_init:
                shutil.rmtree(folder, ignore_errors=True)
        model.config.use_cache = False  # training: a KV cache is dead weight (generation turns it back on)
        if self.quantize and self.fp32_norms:
            # casts norms/embeddings to fp32 (and freezes the base); checkpointing is enabled below
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if self.kernels:
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

        try:
            return PeftModel.from_pretrained(model, path, is_trainable=True)
        except pickle.UnpicklingError as err:  # peft reads a .bin adapter with torch.load(weights_only=True)
            raise unreadable(Path(path) / "adapter_model.bin", err) from None
        except (RuntimeError, ValueError, KeyError) as err:
            raise LitMistralError(f"model.adapter_path: the adapter in {path!r} does not fit {self.name_or_path} "
                                  f"({str(err).splitlines()[0][:300]}). Fix: use the base model it was trained on.") from None

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

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of token cross-entropies over labelled positions, and their count."""
        labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
        selected = labels != -100
        if not self._plain_head:
            logits = self.model(input_ids=batch["input_ids"], use_cache=False, **self._packed_kwargs(batch)).logits
            logits = logits[:, :-1][selected].float()
            return torch.nn.functional.cross_entropy(logits, labels[selected], reduction="sum"), selected.sum()
        hidden = self.decoder(input_ids=batch["input_ids"], use_cache=False,
                              **self._packed_kwargs(batch)).last_hidden_state  # (B, T, H)
        loss = linear_cross_entropy(hidden[:, :-1][selected], self.lm_head, labels[selected], self.loss_chunk_size)
        return loss, selected.sum()

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

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss_sum, count = self.loss_sum(batch)
        if count > 0:
            self.val_loss.update(loss_sum / count, weight=count)

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count == 0:
            return
        loss = self.val_loss.compute()  # token-weighted mean over all processes
        self.val_loss.reset()
        self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True, sync_dist=False)

    # -- what gets logged each step ----------------------------------------------------------------------------------

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
        self.throughput = metrics  # also read by benchmarks
        if self.trainer.is_global_zero:
            for logger in self.loggers:  # self.log would repeat these values at every later step
                logger.log_metrics(metrics, step=self.global_step)

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
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def _signature(self) -> dict:
        return {"name_or_path": self.name_or_path, "gguf_file": self.gguf_file, "quantize": self.quantize,
                "lora": self.lora}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self._trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lit_mistral"] = self._signature()
        checkpoint["skipped_batches"] = self.skipped_batches
        # RNG streams (LoRA dropout, sampling): a resumed run draws what the uninterrupted one would have
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

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
        rng = checkpoint.get("rng")
        if rng and self._trainer is not None and self.trainer.state.fn == "fit":
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def save_adapter(self, folder: str | os.PathLike) -> Path:
        """Write the adapter in peft's format (adapter_config.json + adapter_model.safetensors) with the tokenizer,
        loadable by `peft.PeftModel.from_pretrained(base, folder)`. Written under a temporary name, then renamed."""
        folder = Path(folder)
        with writing_folder(folder) as tmp:
            config = self.model.peft_config["default"]
            config.base_model_name_or_path = (self.name_or_path if self.random_init
                                              else model_folder(self.name_or_path, self.gguf_file))
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

        context = getattr(self.model.config, "max_position_embeddings", None)
        return generate(self.model, self.tokenizer, batch, context=context, cache=self.generation_cache,
                        **self.generation)
