"""`compute.micro_batch_tokens`: a batch cut into parts (whole examples), trained as one batch, and the `auto` size
chosen from measured memory and speed (the CUDA measurements replaced by a model on the CPU)."""

import pytest
import torch
from conftest import fit_checkpointed, make_module, trainer

from lit_mistral.data.batching import collate_packed, collate_padded, split_batch
from lit_mistral.data.datamodule import InstructionDataModule
from lit_mistral.errors import LitMistralError
from lit_mistral.modeling import autofit

GIB = 2**30


def items(lengths: list[int]) -> list[dict]:
    """Examples of these lengths, token ids counting up, loss on the second half of each."""
    out, token = [], 10
    for i, n in enumerate(lengths):
        out.append({"input_ids": list(range(token, token + n)), "spans": [(n // 2, n)], "index": i})
        token += n
    return out


def test_packed_batches_split_at_example_boundaries():
    batch = collate_packed(items([5, 9, 3, 8, 7]))
    parts = split_batch(batch, 12)
    assert [p["num_tokens"] for p in parts] == [5, 12, 8, 7]  # 5+9 > 12; 9+3; 8+7 > 12
    assert all(p["num_tokens"] <= 12 for p in parts)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(torch.cat([p[key] for p in parts], dim=1), batch[key])
    assert parts[1]["cu_seq_lens"].tolist() == [0, 9, 12] and parts[1]["max_length"] == 9
    assert [p["index"] for p in parts] == [[0], [1, 2], [3], [4]]
    assert split_batch(batch, 32) == [batch]
    lone = split_batch(collate_packed(items([3, 20, 4])), 10)  # an example longer than a part is a part alone
    assert [p["num_tokens"] for p in lone] == [3, 20, 4]


def test_padded_batches_split_by_rows_without_their_padding():
    batch = collate_padded(items([4, 6, 2, 3]), pad_id=0)
    parts = split_batch(batch, 12)  # rows x longest: (4, 6) -> 12, then (2, 3) -> 6
    assert [tuple(p["input_ids"].shape) for p in parts] == [(2, 6), (2, 3)]
    assert torch.equal(parts[1]["labels"], batch["labels"][2:, :3])
    assert [p["num_tokens"] for p in parts] == [10, 5] and [p["index"] for p in parts] == [[0, 1], [2, 3]]
    assert sum(int((p["labels"] != -100).sum()) for p in parts) == int((batch["labels"] != -100).sum())


def fit_grads(tiny_model_dir, demo_file, tmp_path, micro, accumulate=1, packing=True, gpu=False):
    """The adapter's gradients at each of 2 optimizer steps and the logged losses (no dropout: the same draws either
    way); on the GPU in float32 (flash attention's bf16 inside)."""
    from lightning.pytorch import Callback, Trainer

    torch.manual_seed(0)
    module = make_module(tiny_model_dir, lora={"dropout": 0.0}, compute={"micro_batch_tokens": micro},
                         optimization={"lr_scheduler": "constant", "learning_rate": 0.01})
    dm = InstructionDataModule(path=str(demo_file), tokenizer=str(tiny_model_dir), max_length=128, batch_size=4,
                               packing=packing, max_tokens=256 if packing else None, train_records=(0, 24),
                               val_records=(24, 28))
    grads, losses = [], []

    class Record(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train/loss"]))

    if gpu:
        Trainer(accelerator="gpu", devices=1, precision="32-true", max_steps=2, limit_val_batches=0, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                accumulate_grad_batches=accumulate, callbacks=[Record()]).fit(module, dm)
    else:
        trainer(tmp_path, max_steps=2, limit_val_batches=0, accumulate_grad_batches=accumulate,
                callbacks=[Record()]).fit(module, dm)
    return grads, losses


@pytest.mark.parametrize(("packing", "accumulate"), [(True, 1), (True, 2), (False, 1)])
def test_parts_train_as_the_whole_batch(tiny_model_dir, demo_file, tmp_path, packing, accumulate):
    """The summed gradients of the parts are the whole batch's (float32 on the CPU), step after step."""
    whole, whole_losses = fit_grads(tiny_model_dir, demo_file, tmp_path / "whole", None, accumulate, packing)
    parts, part_losses = fit_grads(tiny_model_dir, demo_file, tmp_path / "parts", 48, accumulate, packing)
    assert part_losses == pytest.approx(whole_losses, rel=1e-5)
    assert len(whole) == len(parts) == 2 and len(whole[0]) == 28  # lora_A and lora_B: 7 projections x 2 layers
    for step_whole, step_parts in zip(whole, parts):
        assert step_whole.keys() == step_parts.keys()
        for name, grad in step_whole.items():
            torch.testing.assert_close(step_parts[name], grad, rtol=1e-4, atol=1e-7)


@pytest.mark.gpu
def test_parts_train_as_the_whole_batch_on_a_gpu(tiny_model_dir, demo_file, tmp_path):
    """Packed parts through flash varlen attention (their offsets rebased) give the whole batch's gradients."""
    whole, whole_losses = fit_grads(tiny_model_dir, demo_file, tmp_path / "whole", None, gpu=True)
    parts, part_losses = fit_grads(tiny_model_dir, demo_file, tmp_path / "parts", 48, gpu=True)
    assert part_losses == pytest.approx(whole_losses, rel=1e-4)
    for step_whole, step_parts in zip(whole, parts):
        for name, grad in step_whole.items():  # bf16 attention inside, its blocks cut otherwise: H200 0.3% apart
            assert float((step_parts[name] - grad).norm()) <= 1e-2 * float(grad.norm()), name


@pytest.mark.gpu
def test_auto_parts_measure_on_a_gpu(tiny_model_dir, demo_file, tmp_path):
    """The real measurement (CUDA's allocator): the tiny model's whole batches fit 1 GiB with no layer recomputing;
    with a budget below what the model itself takes nothing fits: fit stops before its first step and says so."""
    from lightning.pytorch import Trainer

    for budget, whole in ((1.0, True), (0.001, False)):
        module = make_module(tiny_model_dir, compute={"memory_budget_gib": budget, "dtype": "bfloat16"})
        dm = InstructionDataModule(path=str(demo_file), tokenizer=str(tiny_model_dir), max_length=128,
                                   batch_size=4, packing=True, max_tokens=256, train_records=(0, 24),
                                   val_records=(24, 28))
        trainer = Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=2, limit_val_batches=0,
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          default_root_dir=tmp_path)
        if whole:
            trainer.fit(module, dm)
            assert module.memory_plan.micro_batch_tokens is None and module.memory_plan.checkpoint_layers == 0
        else:
            with pytest.raises(LitMistralError, match="no memory plan fits 0.0 GiB"):
                trainer.fit(module, dm)
            assert trainer.global_step == 0


def test_the_part_size_the_memory_allows_and_the_fastest():
    def trial(fits_from: int, layers_at: dict):
        return lambda size: autofit.Trial(size, layers_at.get(size, 2), size <= fits_from, [])

    sizes = autofit.part_sizes(4096, 300)
    assert sizes == [4096, 2048, 1024, 512]
    assert autofit.part_sizes(4096, 3000) == [4096]
    # the layer count fixed: the largest size that fits, no timing
    choice, trials = autofit.choose_micro_tokens(trial(1024, {}), None, sizes)
    assert choice.size == 1024 and [t.size for t in trials] == [4096, 2048, 1024]
    # measured: smaller parts need fewer recomputing layers; on while faster, stop at the first slower one
    speeds = {2048: 100.0, 1024: 120.0, 512: 110.0}
    choice, trials = autofit.choose_micro_tokens(trial(2048, {2048: 8, 1024: 4, 512: 1}),
                                                 lambda t: speeds[t.size], sizes)
    assert choice.size == 1024 and [t.speed for t in trials[1:]] == [100.0, 120.0, 110.0]
    # smaller parts within 2% of the larger ones' speed: the larger ones
    speeds = {2048: 100.0, 1024: 101.5, 512: 130.0}
    choice, trials = autofit.choose_micro_tokens(trial(2048, {2048: 8, 1024: 4, 512: 1}),
                                                 lambda t: speeds[t.size], sizes)
    assert choice.size == 2048 and [t.size for t in trials] == [4096, 2048, 1024]
    # no layer recomputes at 2,048: smaller parts are not tried
    choice, trials = autofit.choose_micro_tokens(trial(2048, {2048: 0}), lambda t: 1.0, sizes)
    assert choice.size == 2048 and len(trials) == 2
    # nothing fits: the smallest, for the caller to warn about
    assert autofit.choose_micro_tokens(trial(0, {}), None, sizes)[0].size == 512


def test_auto_run_measures_logs_saves_and_reuses_the_part_size(tiny_model_dir, demo_file, tmp_path, monkeypatch,
                                                              caplog):
    """A memory model: 1 GiB per 100 laid-out tokens with both layers recomputing, +0.5 GiB per 100 per layer kept;
    a budget the whole batch does not fit. The plan picks parts that fit, logs and saves them; resumed, it takes
    them without measuring."""
    from lit_mistral.modeling.build import checkpointable_layers

    calls = []

    def recomputing(module) -> int:
        return sum(b.gradient_checkpointing for b in checkpointable_layers(module.model))

    def training_pass(module, batch, *rest):  # (peak, seconds): the first part's tokens set the peak
        tokens, layers = batch["input_ids"].numel(), recomputing(module)
        calls.append((tokens, layers))
        seconds = sum(part["input_ids"].numel() for part in (batch, *rest)) / (1000.0 - 100 * layers)
        return int(tokens / 100 * (1 + 0.5 * (2 - layers)) * GIB), seconds

    monkeypatch.setattr(autofit, "can_measure", lambda device: True)
    monkeypatch.setattr(autofit, "budget_bytes", lambda device, gib: (int(2.2 * GIB), "memory_budget_gib"))
    monkeypatch.setattr(autofit, "MARGIN", 0.0)
    monkeypatch.setattr(autofit, "training_pass", training_pass)

    def run(max_steps, ckpt_path=None):
        module = make_module(tiny_model_dir, compute={"offload_layers": 0})
        dm = InstructionDataModule(path=str(demo_file), tokenizer=str(tiny_model_dir), max_length=128, batch_size=4,
                                   packing=True, max_tokens=256, train_records=(0, 24), val_records=(24, 28))
        return fit_checkpointed(tmp_path, module, dm, max_steps, ckpt_path)

    with caplog.at_level("INFO"):
        module, dm = run(2)
    largest = max(b["num_tokens"] for b in dm.train_dataloader())
    assert calls[0] == (largest, 0) and largest > 200  # nothing recomputing on the largest batch first
    assert calls[1] == (largest, 2)  # > 2.2 GiB even with every layer recomputing
    chosen = module.memory_plan.micro_batch_tokens
    assert chosen is not None and chosen < largest and module.micro_batch_tokens == chosen
    assert f"parts of {chosen:,} tokens" in caplog.text
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["lit_mistral"]["memory_plan"]["micro_batch_tokens"] == chosen
    calls.clear()
    caplog.clear()
    with caplog.at_level("INFO"):
        resumed, _ = run(3, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert calls == [] and resumed.micro_batch_tokens == chosen
    assert "(from the checkpoint resumed)" in caplog.text


def test_settings():
    from lit_mistral.config import Compute

    assert "micro_batch_tokens=0: expected a count >= 1" in Compute(micro_batch_tokens=0).problems(True)[0]
    assert Compute(micro_batch_tokens="auto", memory_budget_gib=16).problems(True) == []
    assert Compute().micro_batch_tokens == "auto" and Compute().plain().micro_batch_tokens is None


def test_a_skipped_batch_in_parts_leaves_no_gradient_behind(tiny_model_dir, demo_file, tmp_path):
    """`nonfinite: skip` with a NaN in the last part: the earlier parts' gradients are dropped, not stepped on."""
    module = make_module(tiny_model_dir, compute={"micro_batch_tokens": 48},
                         optimization={"nonfinite": "skip", "lr_scheduler": "constant"})
    dm = InstructionDataModule(path=str(demo_file), tokenizer=str(tiny_model_dir), max_length=128, batch_size=4,
                               packing=True, max_tokens=256, train_records=(0, 24), val_records=(24, 28))
    loss_sum, calls, before = module.loss_sum, [], {}

    def poisoned(batch):
        total, count = loss_sum(batch)
        calls.append(batch["num_tokens"])
        return (total * float("nan"), count) if len(calls) == 3 else (total, count)  # the first batch's 3rd part

    module.loss_sum = poisoned

    class Before(__import__("lightning").pytorch.Callback):
        def on_train_start(self, trainer, pl_module):
            before.update({k: v.detach().clone() for k, v in pl_module.state_dict().items() if "lora_" in k})

    trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[Before()]).fit(module, dm)
    assert len(calls) == 3  # the step's batch came in three parts (the seeded plan's first batch), the last poisoned
    assert module.losses.skipped_batches == 1
    after = {k: v for k, v in module.state_dict().items() if "lora_" in k}
    assert all(torch.equal(after[k], v) for k, v in before.items())
