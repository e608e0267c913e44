"""What a training step leaves for the hooks after it (`StepState`) and what becomes of a non-finite loss
(`LossGuard`); the training paths through them are in test_module.py, test_micro_batches.py and
test_step_scalars.py."""

from types import SimpleNamespace

import pytest
import torch

from lit_mistral.errors import LitMistralError
from lit_mistral.steps import LossGuard, Pending, StepState


def test_step_state_moves_from_the_step_to_backward_to_the_optimizer():
    state = StepState()
    assert state.pending is Pending.NOTHING and not state.take(Pending.AFTER_BACKWARD)
    with pytest.raises(AssertionError):
        state.decide_on_device(torch.tensor(1.0))  # only for a loss taken from AFTER_BACKWARD
    state.decide_after_backward(torch.tensor(2.0), batch_idx=3, count=7)
    assert not state.take(Pending.ON_DEVICE) and state.pending is Pending.AFTER_BACKWARD
    assert state.take(Pending.AFTER_BACKWARD) and state.pending is Pending.NOTHING
    state.decide_on_device(torch.tensor(0.0))
    assert (state.pending, state.batch_idx, state.count) == (Pending.ON_DEVICE, 3, 7)
    state.begin()  # a decision on the device is read back by the optimizer hook, not dropped by the next batch
    assert state.take(Pending.ON_DEVICE) and not state.take(Pending.ON_DEVICE)


def test_a_new_batch_drops_what_the_last_left_for_backward_and_its_parts_flag():
    state = StepState()
    state.decide_after_backward(torch.tensor(1.0), 0, 1)
    state.grads_from_parts = True
    state.begin()
    assert state.pending is Pending.NOTHING and not state.grads_from_parts


class Logger:
    def __init__(self) -> None:
        self.logged = []

    def log_metrics(self, metrics, step) -> None:
        self.logged.append((step, metrics))


def fake_trainer() -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=True, loggers=[Logger()], global_step=4, current_epoch=1)


def test_settle_logs_finite_losses_at_their_step_and_counts_skipped_ones():
    guard, trainer = LossGuard("skip"), fake_trainer()
    cpu = torch.device("cpu")
    guard.scalars.push({"where": "step 1", "step": 1, "log": True}, cpu, loss=torch.tensor(2.5), bad=torch.tensor(0.0),
                       grad_norm=torch.tensor(0.5))
    guard.scalars.push({"where": "step 2", "step": 2, "log": True}, cpu, loss=torch.tensor(float("inf")),
                       bad=torch.tensor(1.0))
    guard.scalars.push({"where": "step 3", "step": 3, "log": False}, cpu, loss=torch.tensor(1.5), bad=torch.tensor(0.0))
    with pytest.warns(UserWarning, match=r"the training loss is inf at step 2: batch skipped .*1 so far"):
        latest = guard.settle(trainer, wait=True)
    assert latest == 1.5 and guard.skipped_batches == 1 and len(guard.scalars) == 0
    assert trainer.loggers[0].logged == [(1, {"train/loss": 2.5, "train/grad_norm": 0.5}),
                                         (2, {"train/skipped_batches": 1.0})]


def test_stop_names_the_step_and_the_fix():
    with pytest.raises(LitMistralError, match=r"loss is nan at step 4 \(epoch 1, batch 2 of the epoch\).*"
                                              r"--model.optimization.nonfinite skip"):
        LossGuard("stop").report(fake_trainer(), float("nan"), "step 4 (epoch 1, batch 2 of the epoch)", 4)
