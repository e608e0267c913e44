"""A step's scalars read back a step later (`step_scalars.py`), and the training path that uses them: with torch's
fused AdamW the optimizer skips a non-finite batch's update itself and the module learns of it afterwards. On the CPU
values arrive at once; these tests hold each one back until a newer step is queued, as a GPU running behind the CPU
would, and check that what is logged, stopped and skipped is what the path deciding at once does."""

import pytest
import torch
from conftest import make_module, trainer
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_callbacks import Recorder
from test_module import WeightsMoved, adapter_state, data, poison_loss

from lit_mistral.errors import LitMistralError
from lit_mistral.step_scalars import StepScalars
from lit_mistral.steps import LossGuard


class Held:
    """A CUDA event stand-in that has not passed until waited for."""

    def __init__(self) -> None:
        self.done, self.waited = False, 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done, self.waited = True, self.waited + 1


def test_entries_come_back_in_order_and_only_the_newest_wait():
    scalars, events = StepScalars(), []
    for step in range(3):
        scalars.push({"step": step}, torch.device("cpu"), loss=torch.tensor(step + 0.5), bad=torch.tensor(0.0))
        events.append(Held())
        *entry, _ = scalars._pending[-1]
        scalars._pending[-1] = (*entry, events[-1])
    events[1].done = True  # passed, but behind one that has not: order is kept
    assert scalars.ready(behind=3) == []
    got = scalars.ready(behind=1)  # the two oldest: the first waited for, the second had passed
    assert [(m["step"], v) for m, v in got] == [(0, {"loss": 0.5, "bad": 0.0}), (1, {"loss": 1.5, "bad": 0.0})]
    assert [e.waited for e in events] == [1, 0, 0] and len(scalars) == 1
    assert [m["step"] for m, _ in scalars.flush()] == [2] and events[2].waited == 1 and len(scalars) == 0


def test_on_the_cpu_values_are_there_at_once():
    scalars = StepScalars()
    scalars.push({"step": 7}, torch.device("cpu"), loss=torch.tensor([[2.0]]), grad_norm=torch.tensor(3.0))
    assert scalars.ready(behind=5) == [({"step": 7}, {"loss": 2.0, "grad_norm": 3.0})]


class FusedAdamW(torch.optim.AdamW):
    """torch's fused AdamW on the CPU too (the module asks for it on CUDA only)."""

    def __init__(self, params, fused=None, **kwargs):
        super().__init__(params, fused=True, **kwargs)


@pytest.fixture
def deciding_later(monkeypatch):
    """The path that decides on the device: fused AdamW, each step's scalars held back until a newer step is
    queued (or the module flushes them). Returns the events handed out."""
    monkeypatch.setattr(torch.optim, "AdamW", FusedAdamW)
    push, events = StepScalars.push, []

    def held_push(self, meta, device, **values):
        push(self, meta, device, **values)
        events.append(Held())
        *entry, _ = self._pending[-1]
        self._pending[-1] = (*entry, events[-1])

    monkeypatch.setattr(StepScalars, "push", held_push)
    return events


def run(tmp_path, tiny_model_dir, demo_file, poison=None, **optimization):
    seed_everything(0)  # the same adapter initialization and dropout masks in every run
    module = make_module(tiny_model_dir, optimization={"optimizer": "adamw", "learning_rate": 5e-3, **optimization})
    if poison is not None:
        poison_loss(module, at_batch=2, value=poison)
    recorder, moved = Recorder(), WeightsMoved()
    dm = data(tiny_model_dir, demo_file, train_records=(0, 20), batch_size=4)
    trainer(tmp_path, max_steps=5, logger=recorder, log_every_n_steps=1, callbacks=[moved]).fit(module, dm)
    logged = {(step, k): v for step, metrics in recorder.logged for k, v in metrics.items()
              if k in ("train/loss", "train/grad_norm", "train/skipped_batches")}
    return module, logged, moved.changed


def test_decided_later_logs_what_deciding_at_once_logs(deciding_later, tiny_model_dir, demo_file, tmp_path,
                                                       monkeypatch):
    module, later, _ = run(tmp_path / "later", tiny_model_dir, demo_file)
    assert module.losses.optimizer_on_device(module.trainer, module.sharded) is not None
    assert len(deciding_later) == 5 and module.losses.scalars.flush() == []
    assert all(e.done for e in deciding_later[:-1])  # each read when the next step was queued, the last at the end
    monkeypatch.setattr(LossGuard, "optimizer_on_device", staticmethod(lambda trainer, sharded: None))
    _, at_once, _ = run(tmp_path / "at_once", tiny_model_dir, demo_file)
    assert sorted(later) == sorted(at_once) == [(s, k) for s in range(5) for k in ("train/grad_norm", "train/loss")]
    for key, value in at_once.items():
        assert later[key] == pytest.approx(value, rel=1e-6), key


def test_decided_later_a_nan_stops_with_the_step_and_checkpoints_stay_finite(deciding_later, tiny_model_dir,
                                                                            demo_file, tmp_path):
    module = make_module(tiny_model_dir, optimization={"optimizer": "adamw", "learning_rate": 5e-3})
    poison_loss(module, at_batch=2, value=float("nan"))
    dm = data(tiny_model_dir, demo_file, train_records=(0, 20), batch_size=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    with pytest.raises(LitMistralError, match=r"the training loss is nan at step 2 \(epoch 0, batch 2 of the "
                                              r"epoch\)\. Checkpoints written so far hold finite weights"):
        trainer(tmp_path, max_steps=5, enable_checkpointing=True, callbacks=[ckpt]).fit(module, dm)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # the checkpoint after the bad batch read its flag first, and was not written
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert all(torch.isfinite(v).all() for v in adapter_state(module).values())


def test_decided_later_a_skipped_batch_leaves_the_weights(deciding_later, tiny_model_dir, demo_file, tmp_path):
    with pytest.warns(UserWarning, match=r"the training loss is inf at step 2 \(epoch 0, batch 2 of the epoch\): "
                                         r"batch skipped \(model.optimization.nonfinite=skip; 1 so far\)"):
        module, logged, changed = run(tmp_path, tiny_model_dir, demo_file, poison=float("inf"), nonfinite="skip")
    assert changed == {0: True, 1: True, 2: False, 3: True, 4: True}  # the optimizer skipped the update itself
    assert module.losses.skipped_batches == 1 and logged[(2, "train/skipped_batches")] == 1.0
    assert (2, "train/loss") not in logged and (3, "train/loss") in logged
    assert all(torch.isfinite(v).all() for v in adapter_state(module).values())


@pytest.mark.gpu
def test_on_a_gpu_no_step_waits_for_it_and_a_nan_batch_is_skipped(tiny_model_dir, demo_file, tmp_path):
    """On CUDA with `adamw` (torch's fused): after the first steps nothing in a training step makes the CPU wait for
    the GPU (torch's sync debug mode raises at any such call: the loss, its flag, the gradient norm, the progress
    bar, the telemetry, the learning-rate monitor), a NaN batch's update is skipped by the optimizer, and every other
    step's loss is logged at its own step."""
    from lightning.pytorch import Trainer

    from lit_mistral.callbacks import LearningRateMonitor, Telemetry

    seed_everything(0)
    module = make_module(tiny_model_dir,
                         optimization={"optimizer": "adamw", "learning_rate": 5e-3, "nonfinite": "skip"},
                         compute={"kernels": "liger", "shared_dropout": True, "dropout_kernel": True})  # qlora-fast's
    poison_loss(module, at_batch=4, value=float("nan"))
    recorder, telemetry, changed = Recorder(), Telemetry(), {}

    class Strict(Callback):  # strict from batch 2's start on; whether a batch moved the weights, read between steps
        before = index = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.moved(pl_module)
            self.before, self.index = adapter_state(pl_module), batch_idx
            torch.cuda.set_sync_debug_mode("error" if batch_idx >= 2 else "default")

        def on_train_epoch_end(self, trainer, pl_module):  # (before the module reads the last steps back)
            self.moved(pl_module)

        def moved(self, pl_module):
            torch.cuda.set_sync_debug_mode("default")  # (reading the weights waits, on purpose)
            if self.before is not None:
                after = adapter_state(pl_module)
                changed[self.index] = any(not torch.equal(after[k], v) for k, v in self.before.items())

    # packed rows in a token budget, as qlora-fast trains (padded batches find their labels with a nonzero: a wait)
    dm = data(tiny_model_dir, demo_file, train_records=(0, 40), packing=True, max_tokens=256)
    try:
        with pytest.warns(UserWarning, match=r"the training loss is nan at step 4 \(epoch 0, batch 4 of the epoch\)"):
            Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=7, logger=recorder,
                    log_every_n_steps=1, enable_checkpointing=False, enable_model_summary=False,
                    default_root_dir=tmp_path, num_sanity_val_steps=0, use_distributed_sampler=False,
                    callbacks=[Strict(), telemetry, LearningRateMonitor("step")]).fit(module, dm)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert module.losses.optimizer_on_device(module.trainer, module.sharded) is not None
    assert changed == {i: i != 4 for i in range(7)} and module.losses.skipped_batches == 1
    losses = [step for step, metrics in recorder.logged if "train/loss" in metrics]
    assert losses == [0, 1, 2, 3, 5, 6]
    assert recorder.steps_of("train/tokens_per_s") == [2, 3, 4, 5, 6, 7] and telemetry.last["train/tokens_per_s"] > 0
