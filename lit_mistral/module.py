"""`QLoRAModule`: the LightningModule. It trains and validates a causal LM with LoRA adapters on a (4-bit) frozen
base: the steps, the loss, the optimizer and schedule, and checkpoints that hold only what training changes.
Building the model is `modeling.build.build_model`; evaluation, telemetry and writers are callbacks."""

import math
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import FSDPStrategy
from torchmetrics import MeanMetric

from lit_mistral.checkpointing import load_adapter_checkpoint, save_adapter_checkpoint
from lit_mistral.config import Compute, Generation, LoRA, Optimization, Quantization
from lit_mistral.data.batching import split_batch
from lit_mistral.data.tokenize import IGNORE_INDEX
from lit_mistral.errors import raise_problems
from lit_mistral.generation import lifecycle
from lit_mistral.generation.predictor import Predictor
from lit_mistral.modeling import build, fit_plan, plan
from lit_mistral.modeling.adapters import check_adapter_folder
from lit_mistral.modeling.attention import packed_kwargs
from lit_mistral.modeling.loss import linear_cross_entropy
from lit_mistral.sources import check_model_location
from lit_mistral.steps import LossGuard, Pending, StepState, step_in_parts


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
            benchmarks); only the config and tokenizer of `name_or_path` are needed.
        trust_remote_code: Let transformers run code shipped with the model. Off unless you trust the source.
        load_on: Where the base is loaded and quantized: `device` (each process's GPU, fast) or `cpu` (for
            `--trainer.strategy fsdp_qlora`: sharded layer by layer, so no GPU holds the whole base).
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
        self.val_loss = MeanMetric()  # token-weighted mean over the validation split, synced across processes
        self.model = self.tokenizer = None
        self.predictor: Predictor | None = None
        self.kept_adapter: dict[str, torch.Tensor] | None = None  # adapter weights (CPU) while the model is released
        self.memory_plan: plan.Plan | None = None  # the memory settings fit runs with (`modeling/plan.py`)
        self.losses = LossGuard(optimization.nonfinite)  # non-finite losses; the steps' scalars read back later
        self.step_state = StepState()  # what a training step leaves for the hooks after it

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
        """The part size batches train in (the memory plan's, else `compute.micro_batch_tokens`); None: whole."""
        if self.memory_plan is not None:
            return self.memory_plan.micro_batch_tokens
        return self.spec.compute.plain().micro_batch_tokens

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        self.step_state.begin()
        size = self.micro_batch_tokens
        parts = [batch] if size is None else split_batch(batch, size)
        if len(parts) > 1:
            return step_in_parts(self, parts, targets(batch)[1].sum().clamp(min=1), batch_idx)
        loss_sum, count = self.loss_sum(batch)
        count = int(batch.get("num_labels", count))  # counted by the collate: no wait for the GPU
        loss = loss_sum / max(count, 1)
        if self.trainer.accumulate_grad_batches == 1:
            # decided after backward (`on_after_backward`): deciding here would make the CPU wait for the forward
            # to finish and the GPU wait, idle, for the backward's first kernels. A batch in parts decides there too:
            # the decision is a collective, which every process must reach at the same point
            self.step_state.decide_after_backward(loss.detach(), batch_idx, count)
            return loss
        # other batches' gradients are in .grad: this one's must not join them
        if self.losses.check(self.trainer, loss, batch_idx):
            return None  # Lightning skips backward and the optimizer update for this batch
        self.log("train/loss", loss, prog_bar=True, batch_size=count)
        return loss

    def on_after_backward(self) -> None:
        """A batch's finite loss logged, or (NaN/inf) training stopped or the batch's gradients (of all its parts)
        dropped before the optimizer steps on them: the decision `training_step` left when no other batch's
        gradients are in .grad (no gradient accumulation). With torch's fused AdamW the optimizer itself skips the
        update of a non-finite batch on the GPU, told by a flag tensor (its `found_inf`, as `GradScaler` uses it),
        and the CPU reads the loss and the flag a step later (`steps.LossGuard`) without waiting for the backward to
        finish."""
        state = self.step_state
        if not state.take(Pending.AFTER_BACKWARD):
            return
        optimizer = self.losses.optimizer_on_device(self.trainer, self.sharded)
        if optimizer is not None:
            state.decide_on_device(self.losses.flag_for(optimizer, state.loss))
            return
        if self.losses.check(self.trainer, state.loss, state.batch_idx):
            self.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient: no update
            return
        self.log("train/loss", state.loss, prog_bar=True, batch_size=int(state.count))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        latest = self.losses.settle(self.trainer)
        if latest is not None:  # the progress bar's and monitors' value: a CPU tensor, read without a wait
            self.log("train/loss", torch.tensor(latest), prog_bar=True, logger=False)

    def on_train_epoch_end(self) -> None:
        self.losses.settle(self.trainer, wait=True)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if self.step_state.grads_from_parts:
            return  # zeroed at the training step's start; its first parts' gradients are in .grad
        optimizer.zero_grad()

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
        if self.step_state.take(Pending.ON_DEVICE):  # read back with the loss and its flag (`on_after_backward`)
            self.losses.push(self.trainer, self.device, self.step_state, norm)
        elif norm is not None:
            self.log("train/grad_norm", norm)

    def on_train_start(self) -> None:
        fit_plan.fit_plan(self)

    # -- optimizer ---------------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        return optimizer_and_schedule([p for p in self.parameters() if p.requires_grad], self.optimization,
                                      max(1, int(self.trainer.estimated_stepping_batches)))

    # -- checkpoints: the adapter, not the 4-bit base (`checkpointing`) -----------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.losses.settle(self.trainer, wait=True)  # the skipped-batch count up to date (or a NaN found first: stop)
        save_adapter_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        load_adapter_checkpoint(self, checkpoint)

    # -- predict and release (`generation.lifecycle`) ----------------------------------------------------------------

    def release(self) -> None:
        """Free the model, keeping the adapter weights on the CPU (`generation.lifecycle.release`)."""
        lifecycle.release(self)

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "validate":  # not the validations inside fit
            self.release()

    def on_predict_end(self) -> None:
        self.release()

    def on_predict_start(self) -> None:
        lifecycle.start_predict(self)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        return lifecycle.predict_batch(self, batch, batch_idx, dataloader_idx)


def optimizer_and_schedule(params: list[torch.nn.Parameter], o: Optimization, total_steps: int) -> dict:
    """AdamW (bitsandbytes' paged or 8-bit, or torch's) over `params`, with linear warmup then the decay of
    `o.lr_scheduler` over `total_steps`, stepped per optimizer step, as Lightning's `configure_optimizers` returns
    them. Chosen by name rather than through LightningCLI's `--optimizer`/`--lr_scheduler` class paths: the warmup
    and decay need the run's total step count, known only once the Trainer has the data."""
    from transformers import get_scheduler

    kwargs = dict(lr=o.learning_rate, betas=tuple(o.betas), weight_decay=o.weight_decay)
    if o.optimizer == "adamw":
        # fused on CUDA: one kernel launch for all adapters, where bitsandbytes' optimizers make one Python call and
        # kernel per parameter (hundreds for a 7B base with adapters on every projection)
        fused = all(p.device.type == "cuda" for p in params) or None
        optimizer = torch.optim.AdamW(params, fused=fused, **kwargs)
    else:
        import bitsandbytes as bnb

        name = o.optimizer
        if all(p.device.type == "cpu" for p in params):  # paging moves states between GPU and CPU memory: on the
            name = name.removeprefix("paged_")  # CPU the same optimizer unpaged (bitsandbytes warns, then does so)
        cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "adamw_32bit": bnb.optim.AdamW32bit, "adamw_8bit": bnb.optim.AdamW8bit}[name]
        optimizer = cls(params, **kwargs)
    warmup = o.warmup_steps or math.ceil(o.warmup_ratio * total_steps)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[o.lr_scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
