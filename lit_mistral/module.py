"""`QLoRAModule`: the LightningModule. It trains and validates a causal LM with LoRA adapters on a (4-bit) frozen
base: the steps, the loss, the optimizer and schedule, and checkpoints that hold only what training changes.
Building the model is `modeling.build.build_model`; evaluation, telemetry and writers are callbacks."""

import math
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from lit_mistral.config import Compute, Generation, LoRA, Optimization, Quantization
from lit_mistral.data.batching import split_batch
from lit_mistral.data.tokenize import IGNORE_INDEX
from lit_mistral.distributed import reduce_queued
from lit_mistral.errors import LitMistralError, raise_problems
from lit_mistral.generation.answering import for_inference
from lit_mistral.generation.predictor import Predictor
from lit_mistral.lightning_internals import log_step, logs_this_step
from lit_mistral.modeling import autofit, build
from lit_mistral.modeling.adapters import check_adapter_folder, trainable_state
from lit_mistral.modeling.attention import packed_kwargs
from lit_mistral.modeling.loss import linear_cross_entropy
from lit_mistral.sources import check_model_location
from lit_mistral.step_scalars import StepScalars, log_at


def targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's (B, T-1) next-token labels (position t predicts token t+1) and the mask of those that count."""
    labels = batch["labels"][:, 1:]
    return labels, labels != IGNORE_INDEX


def at_labels(states: torch.Tensor, batch: dict, labels: torch.Tensor, selected: torch.Tensor):
    """(n, ...) rows of (B, T, ...) `states` at the positions whose next token is labelled, in row-major order, and
    those (n,) labels: gathered at the positions the collate found on the CPU (`labelled`), which leaves the CPU
    free to queue the rest of the step; a batch without them (a part of one, one made elsewhere) by its mask
    `selected`, which makes the CPU wait for the GPU (a nonzero)."""
    index = batch.get("labelled")
    if index is None:
        return states[:, :-1][selected], labels[selected]
    index = index.to(states.device, non_blocking=True)
    return states.reshape(-1, *states.shape[2:]).index_select(0, index), batch["labels"].reshape(-1)[index + 1]


class QLoRAModule(LightningModule):
    """A causal LM with LoRA adapters on a (4-bit) frozen base.

    Args:
        name_or_path: Base model: a Hugging Face hub id, a local folder, or `pkg://package/dir` (a folder inside an
            installed Python package).
        gguf_file: A .gguf file inside `name_or_path` (or an absolute path): dequantized on load, converted once
            into a cached safetensors folder.
        random_init: Initialize the weights randomly from the model's config instead of loading them (dry runs,
            benchmarks). Only the config and tokenizer of `name_or_path` are needed. A 4-bit base is built one
            decoder layer at a time, each quantized as it is made (`modeling/random_base.py`): nothing on disk, and
            never a 16-bit copy of the whole (a 70B architecture on one GPU).
        trust_remote_code: Let transformers run code shipped with the model. Off unless you trust the source.
        load_on: Where the base is loaded (and quantized): `device`, the GPU of each process (fast); or `cpu`, for
            `--trainer.strategy fsdp_qlora`, which then moves it to the GPU one decoder layer at a time, sharding
            each as it arrives: no GPU ever holds the whole base, so a base larger than one GPU trains on several.
            Quantizing on the CPU is slower (about 20M weights/s per core), and while loading each process holds the
            4-bit base in CPU memory.
        adapter_path: Start from this peft adapter folder instead of fresh adapters.
        max_length: Longest sequence in tokens; linked to `data.max_length` by the CLI.
        quantization: Quantization of the frozen base.
        lora: The LoRA adapters.
        compute: How forward and backward run (dtype, attention, activation checkpointing, kernels).
        optimization: Optimizer, schedule, non-finite losses.
        generation: How `predict` generates.
    """

    def __init__(
        self,
        name_or_path: str = "mistralai/Mistral-7B-v0.1",
        gguf_file: str | None = None,
        random_init: bool = False,
        trust_remote_code: bool = False,
        load_on: Literal["device", "cpu"] = "device",
        adapter_path: str | None = None,
        max_length: int = 2048,
        quantization: Quantization = Quantization(),
        lora: LoRA = LoRA(),
        compute: Compute = Compute(),
        optimization: Optimization = Optimization(),
        generation: Generation = Generation(),
    ) -> None:
        super().__init__()
        raise_problems([*lora.problems(), *compute.problems(quantization.method is not None),
                        *optimization.problems(), *generation.problems()], "Fix: correct these model settings.")
        if adapter_path is not None:
            check_adapter_folder(adapter_path, "model.adapter_path")
        if not random_init:
            check_model_location(name_or_path, gguf_file)
        self.spec = build.ModelSpec(name_or_path, gguf_file, random_init, trust_remote_code, load_on, adapter_path,
                                    quantization, lora, compute)
        self.max_length, self.optimization, self.generation = max_length, optimization, generation
        self.strict_loading = False  # checkpoints hold the adapter only; on_load_checkpoint checks it is complete
        self.skipped_batches = 0
        self.val_loss = MeanMetric()  # token-weighted mean over the validation split, synced across processes
        self.model = self.tokenizer = None
        self.predictor: Predictor | None = None
        self.kept_adapter: dict[str, torch.Tensor] | None = None  # adapter weights (CPU) while the model is released
        self.auto_checkpoint_layers: int | None = None  # `checkpoint_layers: auto`: measured, or from a checkpoint
        self.auto_micro_tokens: int | None = None  # `micro_batch_tokens: auto`: likewise (None: whole batches)
        self.auto_micro_restored = False  # auto_micro_tokens came from the checkpoint resumed
        self._grads_from_parts = False  # this step's first parts left their gradients in .grad (`optimizer_zero_grad`)
        self._undecided: tuple | None = None  # a batch's loss whose finiteness `on_after_backward` decides
        self._deciding: dict | None = None  # that loss and its flag, when the optimizer decides on the GPU
        self._scalars = StepScalars()  # the steps' losses and flags, read once the GPU has computed them

    # -- the model ---------------------------------------------------------------------------------------------------

    @property
    def sharded(self) -> bool:
        """Whether the trainer shards the model with FSDP (`--trainer.strategy fsdp_qlora`)."""
        return isinstance(self.trainer.strategy, FSDPStrategy)

    def configure_model(self) -> None:
        """Called by Lightning after data setup (so bad data fails before the expensive load)."""
        if self.model is None:
            self.build(self.trainer.strategy.root_device, training=self.trainer.state.fn == "fit",
                       sharded=self.sharded)

    def build(self, device: torch.device, training: bool = True, sharded: bool = False) -> "QLoRAModule":
        """Build the model for `device` (`modeling.build.build_model`), outside a Trainer too (scripts, tests), with
        the adapter weights an earlier run kept (`release`; a checkpoint Lightning restores next wins over them)."""
        self.model, self.tokenizer = build.build_model(self.spec, device, training=training, sharded=sharded)
        if self.kept_adapter is not None:
            self.load_state_dict(self.kept_adapter, strict=False)
            self.kept_adapter = None
        return self

    # -- loss --------------------------------------------------------------------------------------------------------

    def _token_losses(self, batch: dict, reduction: Literal["sum", "none"]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token cross-entropies over labelled positions (summed, or (N,) row-major), and the (B, T-1) mask of them."""
        labels, selected = targets(batch)
        layout = packed_kwargs(batch, self.model.config._attn_implementation)
        if not build.plain_head(self.model):
            logits = self.model(input_ids=batch["input_ids"], use_cache=False, **layout).logits
            logits, wanted = at_labels(logits, batch, labels, selected)
            return torch.nn.functional.cross_entropy(logits.float(), wanted, reduction=reduction), selected
        hidden = build.decoder(self.model)(input_ids=batch["input_ids"], use_cache=False,
                                           **layout).last_hidden_state  # (B, T, H)
        hidden, wanted = at_labels(hidden, batch, labels, selected)
        loss = linear_cross_entropy(hidden, build.lm_head(self.model), wanted, self.spec.compute.loss_chunk_size,
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

    # -- steps -------------------------------------------------------------------------------------------------------

    @property
    def micro_batch_tokens(self) -> int | None:
        """The part size batches train in (`compute.micro_batch_tokens`, measured if `auto`); None: whole batches."""
        size = self.spec.compute.micro_batch_tokens
        return self.auto_micro_tokens if size == "auto" else size

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        self._grads_from_parts, self._undecided = False, None
        size = self.micro_batch_tokens
        parts = [batch] if size is None else split_batch(batch, size)
        if len(parts) > 1:
            return self._step_in_parts(parts, batch, batch_idx)
        loss_sum, count = self.loss_sum(batch)
        count = int(batch.get("num_labels", count))  # counted by the collate: no wait for the GPU
        loss = loss_sum / max(count, 1)
        if self.trainer.accumulate_grad_batches == 1:
            # decided after backward (`on_after_backward`): deciding here would make the CPU wait for the forward
            # to finish and the GPU wait, idle, for the backward's first kernels. A batch in parts decides there too:
            # the decision is a collective, which every process must reach at the same point
            self._undecided = (loss.detach(), batch_idx, count)
            return loss
        if self._nonfinite(loss, batch_idx):  # other batches' gradients are in .grad: this one's must not join them
            return None  # Lightning skips backward and the optimizer update for this batch
        self.log("train/loss", loss, prog_bar=True, batch_size=count)
        return loss

    def on_after_backward(self) -> None:
        """A batch's finite loss logged, or (NaN/inf) training stopped or the batch's gradients (of all its parts)
        dropped before the optimizer steps on them: the decision `training_step` left when no other batch's
        gradients are in .grad (no gradient accumulation). With torch's fused AdamW the optimizer itself skips the
        update of a non-finite batch on the GPU, told by a flag tensor (its `found_inf`, as `GradScaler` uses it),
        and the CPU reads the loss and the flag a step later (`StepScalars`, `_settle`) without waiting for the
        backward to finish."""
        if self._undecided is None:
            return
        loss, batch_idx, count = self._undecided
        self._undecided = None
        optimizer = self._skips_on_device()
        if optimizer is not None:
            # every process's flag is the largest of all: they all skip the batch or none does
            bad = reduce_queued((~torch.isfinite(loss)).float(), "max")
            optimizer.found_inf = bad
            self._deciding = {"loss": loss, "bad": bad, "batch_idx": batch_idx}
            return
        if self._nonfinite(loss, batch_idx):
            self.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient: no update
            return
        self.log("train/loss", loss, prog_bar=True, batch_size=int(count))

    def _skips_on_device(self) -> torch.optim.Optimizer | None:
        """The optimizer, if it skips an update itself when its `found_inf` flag is set (torch's fused Adam and
        AdamW) and one decision covers one optimizer step (no gradient accumulation; not sharded: FSDP's
        parameters and a plain flag tensor do not mix in its kernel)."""
        optimizers = self.trainer.strategy.optimizers
        if self.trainer.accumulate_grad_batches != 1 or self.sharded or len(optimizers) != 1:
            return None
        optimizer = optimizers[0]
        fused = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and optimizer.defaults.get("fused")
        return optimizer if fused else None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._settle(self._scalars.ready(), in_step=True)

    def on_train_epoch_end(self) -> None:
        self._settle(self._scalars.flush())

    def _settle(self, entries: list, in_step: bool = False) -> None:
        """What the steps' scalars read back from the GPU say: a non-finite loss stops training or is counted as
        skipped (its update was skipped on the GPU already); finite ones are logged at their own step."""
        latest = None
        for meta, values in entries:
            if values["bad"]:
                self._report_nonfinite(values["loss"], meta["where"], meta["step"])
                continue
            metrics = {"train/loss": values["loss"]}
            if "grad_norm" in values:
                metrics["train/grad_norm"] = values["grad_norm"]
            if meta["log"]:
                log_at(self.trainer, metrics, meta["step"])
            latest = values["loss"]
        if in_step and latest is not None:  # the progress bar's and monitors' value: a CPU tensor, read without a wait
            self.log("train/loss", torch.tensor(latest), prog_bar=True, logger=False)

    def _step_in_parts(self, parts: list[dict], batch: dict, batch_idx: int) -> torch.Tensor | None:
        """A batch in parts (`compute.micro_batch_tokens`): backward on each part but the last here, the last by
        Lightning, each part's token-loss sum divided by the whole batch's labelled-token count, so that the summed
        gradients are those of the batch's mean loss. Lightning's gradient accumulation would divide each part's own
        mean by the number of parts instead (wrong when parts hold different numbers of labelled tokens) and takes a
        fixed number of batches per step, whereas the number of parts varies from batch to batch.

        The earlier parts' backward runs inside the training step, before Lightning zeroes gradients, so this step
        zeroes them itself at the start of an accumulation window and `optimizer_zero_grad` leaves them. Under DDP
        the gradient hooks are not armed inside the forward (the training step), so the earlier parts accumulate
        locally and the last part's backward reduces the sum across processes once, as `no_sync` accumulation does."""
        accumulate = self.trainer.accumulate_grad_batches
        if batch_idx % accumulate == 0:
            self.zero_grad(set_to_none=True)
            self._grads_from_parts = True
        count = targets(batch)[1].sum().clamp(min=1)
        total = torch.zeros((), device=self.device)
        for part in parts[:-1]:
            part_sum, _ = self.loss_sum(part)
            self.trainer.strategy.backward(part_sum / (count * accumulate), None)
            total += part_sum.detach()
        part_sum, _ = self.loss_sum(parts[-1])
        loss = (total + part_sum.detach()) / count
        if accumulate == 1:  # as for a whole batch: every process decides at the same point, after backward
            self._undecided = (loss, batch_idx, count)
            return part_sum / count
        if self._nonfinite(loss, batch_idx):
            self.zero_grad(set_to_none=True)  # the earlier parts' gradients must not reach the optimizer
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=int(count))
        return part_sum / count  # Lightning divides by accumulate_grad_batches and runs its backward

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if self._grads_from_parts:
            return  # zeroed at the training step's start; its first parts' gradients are in .grad
        optimizer.zero_grad()

    def _nonfinite(self, loss: torch.Tensor, batch_idx: int) -> bool:
        """Stop on a NaN/inf loss (or report it to be skipped) instead of training on garbage gradients."""
        # all processes decide together, so that they all skip or all stop
        if not self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False):
            return False
        self._report_nonfinite(loss.item(), self._where(batch_idx), log_step(self.trainer))
        return True

    def _where(self, batch_idx: int) -> str:
        return f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx} of the epoch)"

    def _report_nonfinite(self, value: float, where: str, step: int) -> None:
        if self.optimization.nonfinite == "stop":
            raise LitMistralError(
                f"the training loss is {value} at {where}. Checkpoints written so far hold finite weights. "
                "Fix: lower --model.optimization.learning_rate or add --model.optimization.warmup_steps; train in "
                "bf16-mixed or 32-true rather than float16; then continue with --ckpt_path last. Or set "
                "--model.optimization.nonfinite skip to skip such batches.")
        self.skipped_batches += 1
        rank_zero_warn(f"the training loss is {value} at {where}: batch skipped (model.optimization.nonfinite="
                       f"skip; {self.skipped_batches} so far).")
        log_at(self.trainer, {"train/skipped_batches": float(self.skipped_batches)}, step)

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        """The loss of each example of the batch (what evaluation breaks down by category); logs `val/loss`."""
        sums, counts = self.example_losses(batch)
        if counts.sum() > 0:  # a filler batch (keeping processes in step) has no labels
            self.val_loss.update(sums.sum() / counts.sum(), weight=counts.sum())
        self.log("val/loss", self.val_loss, prog_bar=True)
        return {"sums": sums, "counts": counts}

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count:  # perplexity = exp(mean token loss), from the loss synced over processes
            self.log("val/ppl", math.exp(float(self.val_loss.compute())), prog_bar=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
        if self._deciding is not None:  # read back with the loss and its flag (`on_after_backward`)
            deciding, self._deciding = self._deciding, None
            log = logs_this_step(self.trainer)
            meta = {"where": self._where(deciding["batch_idx"]), "step": log_step(self.trainer), "log": log}
            extra = {} if norm is None else {"grad_norm": norm}
            self._scalars.push(meta, self.device, loss=deciding["loss"], bad=deciding["bad"], **extra)
        elif norm is not None:
            self.log("train/grad_norm", norm)

    def on_train_start(self) -> None:
        autofit.fit_memory(self)

    # -- optimizer ---------------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        return optimizer_and_schedule([p for p in self.parameters() if p.requires_grad], self.optimization,
                                      max(1, int(self.trainer.estimated_stepping_batches)))

    # -- checkpoints: the adapter, not the 4-bit base ----------------------------------------------------------------

    def _signature(self) -> dict:
        """What a checkpoint's adapter must have been trained with to fit this model."""
        spec = self.spec
        return {"name_or_path": spec.name_or_path, "gguf_file": spec.gguf_file, "quantize": spec.quantization.method,
                "lora": spec.lora.peft_kwargs()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._settle(self._scalars.flush())  # the skipped-batch count up to date (or a NaN found first: stop)
        trainable = set(trainable_state(self))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lit_mistral"] = self._signature()
        if self.auto_checkpoint_layers is not None:
            checkpoint["lit_mistral"]["checkpoint_layers"] = self.auto_checkpoint_layers
        if self.spec.compute.micro_batch_tokens == "auto":
            checkpoint["lit_mistral"]["micro_batch_tokens"] = self.auto_micro_tokens or 0  # 0: whole batches
        checkpoint["skipped_batches"] = self.skipped_batches

    def checkpoint_problems(self, saved: dict) -> list[str]:
        """How the settings a checkpoint was trained with (its `lit_mistral` record) differ from this module's: known
        before the model is built, so the CLI checks them before loading anything."""
        ours = self._signature()
        keys = {"name_or_path": "name_or_path", "gguf_file": "gguf_file", "quantize": "quantization.method"}
        diffs = [f"model.{option}: checkpoint has {saved.get(k)!r}, this run has {ours[k]!r}"
                 for k, option in keys.items() if saved.get(k) != ours[k]]
        options = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
                   "bias": "bias"}
        return diffs + [f"model.lora.{options[k]}: checkpoint has {saved.get('lora', {}).get(k)!r}, this run has "
                        f"{v!r}" for k, v in ours["lora"].items() if saved.get("lora", {}).get(k) != v]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("lit_mistral")
        if saved is None:
            raise LitMistralError("ckpt_path: this checkpoint was not written by lit_mistral (no adapter record). "
                                  "Fix: pass a checkpoint from a lit_mistral fit run, or its adapter folder.")
        diffs = self.checkpoint_problems(saved)
        state, expected = checkpoint["state_dict"], set(trainable_state(self))
        if not diffs and set(state) != expected:
            diffs.append(f"the checkpoint's {len(state)} adapter tensors do not match this model's {len(expected)}")
        if diffs:
            raise_problems(diffs, "Fix: run with the config the checkpoint was trained with (its run folder holds "
                                  "config.yaml).")
        self.skipped_batches = checkpoint.get("skipped_batches", 0)
        if self.spec.compute.checkpoint_layers == "auto" and saved.get("checkpoint_layers") is not None:
            self.auto_checkpoint_layers = int(saved["checkpoint_layers"])  # the run's choice, not measured again
        if self.spec.compute.micro_batch_tokens == "auto" and saved.get("micro_batch_tokens") is not None:
            self.auto_micro_tokens = int(saved["micro_batch_tokens"]) or None
            self.auto_micro_restored = True

    # -- generation --------------------------------------------------------------------------------------------------

    def _keep_adapter(self) -> None:
        if self.kept_adapter is None:
            self.kept_adapter = {k: v.to("cpu", copy=True) for k, v in trainable_state(self).items()}

    def release(self) -> None:
        """Free the model at the end of predict and of a stand-alone validate, keeping the adapter weights on the
        CPU: Lightning's teardown would next copy the whole model to the CPU (16 s for a merged Mistral-7B,
        measured), and a module used again rebuilds it (`configure_model`, about as long as one load) with those
        weights. A randomly initialized base cannot be rebuilt the same, so it stays. (At the end of fit the model
        stays: the evaluation against the base runs on it next.)"""
        self.predictor = None  # the engine's KV cache and CUDA graphs
        if self.model is None or self.spec.random_init:
            return
        self._keep_adapter()
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "validate":  # not the validations inside fit
            self.release()

    def on_predict_end(self) -> None:
        self.release()

    def on_predict_start(self) -> None:
        """Runs after a checkpoint was restored, so the adapter weights are final: fold them in if asked (the
        unfolded weights are kept for a later run: `release`)."""
        torch.manual_seed(self.generation.seed)
        if not self.spec.random_init:
            self._keep_adapter()
        self.model = for_inference(self.model, self.generation.weights, self.device,
                                   self.spec.compute.torch_dtype(self.device))
        self.model.config.use_cache = True
        self.predictor = Predictor(self.model, self.tokenizer, self.generation)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """The answers that finished (`generation.predictor`): with the continuous engine, of this batch and
        earlier ones; the last batch drains them all."""
        # after a SIGTERM this batch is the last: the engine finishes the rows it holds, so they are written before
        # predict stops (checkpointing.StopOnSigterm, at the next batch)
        last = batch_idx == self.trainer.num_predict_batches[dataloader_idx] - 1 or self.trainer.received_sigterm
        return self.predictor(batch, last)


def optimizer_and_schedule(params: list[torch.nn.Parameter], o: Optimization, total_steps: int) -> dict:
    """AdamW (bitsandbytes' paged or 8-bit, or torch's) over `params`, with linear warmup then the decay of
    `o.lr_scheduler` over `total_steps`, stepped per optimizer step, as Lightning's `configure_optimizers` returns
    them. Chosen by name rather than through LightningCLI's `--optimizer`/`--lr_scheduler` class paths: the warmup
    and decay need the run's total step count, known only once the Trainer has the data."""
    from transformers import get_scheduler

    kwargs = dict(lr=o.learning_rate, betas=tuple(o.betas), weight_decay=o.weight_decay)
    if o.optimizer == "adamw":
        # fused on CUDA: one kernel launch for all adapters, where bitsandbytes' optimizers make one Python call and
        # kernel per parameter (448 for Mistral-7B: ~35 ms of a ~1 s step on an H200, BENCHMARKS.md)
        fused = all(p.device.type == "cuda" for p in params) or None
        optimizer = torch.optim.AdamW(params, fused=fused, **kwargs)
    else:
        import bitsandbytes as bnb

        cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "adamw_8bit": bnb.optim.AdamW8bit}[o.optimizer]
        optimizer = cls(params, **kwargs)
    warmup = o.warmup_steps or math.ceil(o.warmup_ratio * total_steps)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[o.lr_scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
