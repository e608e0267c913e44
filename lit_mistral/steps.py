"""What a training step leaves for the hooks after it and what becomes of its loss: `StepState`, one explicit
state instead of flags shared across four hooks; `step_in_parts`, the step of a batch in micro-batch parts; and
`LossGuard`, how a non-finite loss stops training or is skipped, with the steps' scalars read back from the GPU a step
later (`step_scalars.py`)."""

from enum import Enum

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_mistral.distributed import reduce_queued
from lit_mistral.errors import LitMistralError
from lit_mistral.lightning_internals import log_step, logs_this_step
from lit_mistral.step_scalars import StepScalars, log_at


class Pending(Enum):
    NOTHING = "nothing"  # the step's loss was decided in the step itself (or no step ran yet)
    AFTER_BACKWARD = "after_backward"  # a loss whose finiteness `on_after_backward` decides
    ON_DEVICE = "on_device"  # the optimizer decides on the GPU; the loss and its flag are read back later


class StepState:
    """What the training step of one batch leaves for the hooks after it: a loss to decide after backward, or one
    the optimizer decides on the GPU (`pending`, with its `loss`, `batch_idx`, `count` and `bad` flag); and whether
    the step's first parts left their gradients in .grad (`grads_from_parts`: the optimizer must not zero them)."""

    def __init__(self) -> None:
        self.pending = Pending.NOTHING
        self.loss: torch.Tensor | None = None
        self.bad: torch.Tensor | None = None
        self.batch_idx, self.count = 0, 0
        self.grads_from_parts = False

    def begin(self) -> None:
        """A new batch: no loss waits for backward, and no part has put gradients in .grad yet."""
        self.grads_from_parts = False
        if self.pending is Pending.AFTER_BACKWARD:
            self.pending = Pending.NOTHING

    def decide_after_backward(self, loss: torch.Tensor, batch_idx: int, count) -> None:
        self.pending, self.loss, self.batch_idx, self.count = Pending.AFTER_BACKWARD, loss, batch_idx, count

    def decide_on_device(self, bad: torch.Tensor) -> None:
        """The loss just taken from AFTER_BACKWARD is decided by the optimizer, told by `bad` (a 0-d flag tensor)."""
        assert self.pending is Pending.NOTHING and self.loss is not None, self.pending
        self.pending, self.bad = Pending.ON_DEVICE, bad

    def take(self, pending: Pending) -> bool:
        """Whether a loss waits in state `pending`; if so, the state goes back to NOTHING (its values stay readable)."""
        if self.pending is not pending:
            return False
        self.pending = Pending.NOTHING
        return True


def where(trainer, batch_idx: int) -> str:
    return f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx} of the epoch)"


class LossGuard:
    """Stops on a NaN/inf training loss, or skips its batch (`optimization.nonfinite`), instead of training on
    garbage gradients; and holds the steps' scalars (`StepScalars`) whose finiteness is read on the CPU a step later,
    when the optimizer itself skipped the update on the GPU."""

    def __init__(self, policy: str) -> None:
        self.policy = policy  # "stop" or "skip"
        self.skipped_batches = 0
        self.scalars = StepScalars()

    @staticmethod
    def optimizer_on_device(trainer, sharded: bool) -> torch.optim.Optimizer | None:
        """The optimizer, if it skips an update itself when its `found_inf` flag is set (torch's fused Adam and
        AdamW) and one decision covers one optimizer step (no gradient accumulation; not sharded: FSDP's
        parameters and a plain flag tensor do not mix in its kernel)."""
        optimizers = trainer.strategy.optimizers
        if trainer.accumulate_grad_batches != 1 or sharded or len(optimizers) != 1:
            return None
        optimizer = optimizers[0]
        fused = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and optimizer.defaults.get("fused")
        return optimizer if fused else None

    @staticmethod
    def flag_for(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
        """Tell `optimizer` to skip its update if `loss` is not finite on any process, without a wait for the GPU."""
        # every process's flag is the largest of all: they all skip the batch or none does
        bad = reduce_queued((~torch.isfinite(loss)).float(), "max")
        optimizer.found_inf = bad
        return bad

    def check(self, trainer, loss: torch.Tensor, batch_idx: int) -> bool:
        """Whether `loss` is not finite on some process (then stop, or report it to be skipped). Waits for the GPU."""
        # all processes decide together, so that they all skip or all stop
        if not trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False):
            return False
        self.report(trainer, loss.item(), where(trainer, batch_idx), log_step(trainer))
        return True

    def report(self, trainer, value: float, at: str, step: int) -> None:
        if self.policy == "stop":
            raise LitMistralError(
                f"the training loss is {value} at {at}. Checkpoints written so far hold finite weights. "
                "Fix: lower --model.optimization.learning_rate or add --model.optimization.warmup_steps; train in "
                "bf16-mixed or 32-true rather than float16; then continue with --ckpt_path last. Or set "
                "--model.optimization.nonfinite skip to skip such batches.")
        self.skipped_batches += 1
        rank_zero_warn(f"the training loss is {value} at {at}: batch skipped (model.optimization.nonfinite="
                       f"skip; {self.skipped_batches} so far).")
        log_at(trainer, {"train/skipped_batches": float(self.skipped_batches)}, step)

    def push(self, trainer, device: torch.device, state: StepState, grad_norm: torch.Tensor | None) -> None:
        """Queue the loss and flag the optimizer decided on (and the gradient norm), read back a step later."""
        meta = {"where": where(trainer, state.batch_idx), "step": log_step(trainer), "log": logs_this_step(trainer)}
        extra = {} if grad_norm is None else {"grad_norm": grad_norm}
        self.scalars.push(meta, device, loss=state.loss, bad=state.bad, **extra)

    def settle(self, trainer, wait: bool = False) -> float | None:
        """What the scalars read back say (all of them with `wait`): a non-finite loss stops training or is counted
        as skipped (its update was skipped on the GPU already); finite ones are logged at their own step. Returns
        the newest finite loss, if any."""
        latest = None
        for meta, values in self.scalars.flush() if wait else self.scalars.ready():
            if values["bad"]:
                self.report(trainer, values["loss"], meta["where"], meta["step"])
                continue
            metrics = {"train/loss": values["loss"]}
            if "grad_norm" in values:
                metrics["train/grad_norm"] = values["grad_norm"]
            if meta["log"]:
                log_at(trainer, metrics, meta["step"])
            latest = values["loss"]
        return latest


def step_in_parts(module, parts: list[dict], count: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
    """The training step of a batch in parts (`compute.micro_batch_tokens`) for `module` (a `QLoRAModule`), whose
    labelled tokens number `count`: backward on each part but the last here, the last by Lightning, each part's
    token-loss sum divided by `count`, so that the summed gradients are those of the batch's mean loss. Lightning's
    gradient accumulation would divide each part's own mean by the number of parts instead (wrong when parts hold
    different numbers of labelled tokens) and takes a fixed number of batches per step, whereas the number of parts
    varies from batch to batch.

    The earlier parts' backward runs inside the training step, before Lightning zeroes gradients, so this step zeroes
    them itself at the start of an accumulation window and says so in `StepState.grads_from_parts` (the module's
    `optimizer_zero_grad` then leaves them). Under DDP the gradient hooks are not armed inside the forward (the
    training step), so the earlier parts accumulate locally and the last part's backward reduces the sum across
    processes once, as `no_sync` accumulation does."""
    trainer, state = module.trainer, module.step_state
    accumulate = trainer.accumulate_grad_batches
    if batch_idx % accumulate == 0:
        module.zero_grad(set_to_none=True)
        state.grads_from_parts = True
    total = torch.zeros((), device=module.device)
    for part in parts[:-1]:
        part_sum, _ = module.loss_sum(part)
        trainer.strategy.backward(part_sum / (count * accumulate), None)
        total += part_sum.detach()
    part_sum, _ = module.loss_sum(parts[-1])
    loss = (total + part_sum.detach()) / count
    if accumulate == 1:  # as for a whole batch: every process decides at the same point, after backward
        state.decide_after_backward(loss, batch_idx, count)
        return part_sum / count
    if module.losses.check(trainer, loss, batch_idx):
        module.zero_grad(set_to_none=True)  # the earlier parts' gradients must not reach the optimizer
        return None
    module.log("train/loss", loss, prog_bar=True, batch_size=int(count))
    return part_sum / count  # Lightning divides by accumulate_grad_batches and runs its backward
