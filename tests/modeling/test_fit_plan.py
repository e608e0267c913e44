"""A fit run's memory plan (`modeling/fit_plan.py`): a kept plan takes the settings the config now gives, and a fit
plans, logs, saves its plan and reuses it on resume."""

import re

import pytest
import torch
from conftest import fit_checkpointed, make_module

from benchmarks.train.replay_plan import chosen, main, parse, replay

from lit_mistral.config import Compute
from lit_mistral.data.datamodule import InstructionDataModule
from lit_mistral.modeling import autofit, plan
from lit_mistral.modeling.fit_plan import override

GIB = 2**30
LAYERS = 32


def test_a_kept_plan_takes_the_settings_the_config_now_gives():
    kept = plan.Plan.from_record(plan.Plan(10, 4, 8192, False, True, 20 * GIB, 24 * GIB, "x").record())
    assert kept.how == "from the checkpoint resumed" and kept.micro_batch_tokens == 8192
    now = override(kept, Compute(micro_batch_tokens=None, dropout_masks="keep"), LAYERS)
    assert (now.checkpoint_layers, now.offload_layers, now.micro_batch_tokens, now.regenerate_dropout) == (
        10, 4, None, False)
    assert not kept.offload_inputs  # a record without the field (a checkpoint from before it): inputs on the GPU
    inputs = plan.Plan(31, 0, None, False, True, 7 * GIB, 8 * GIB, "x", offload_inputs=True)
    kept = plan.Plan.from_record(inputs.record())
    assert kept.offload_inputs and not override(kept, Compute(offload_inputs=False), LAYERS).offload_inputs
    assert override(kept, Compute(), LAYERS).offload_inputs


def test_fit_plans_logs_saves_and_reuses_its_plan(tiny_model_dir, demo_file, tmp_path, monkeypatch, caplog, capsys):
    """A fit with every memory setting `auto` (the CUDA measurement replaced by a memory model: 1 GiB with both
    layers recomputing, 1 GiB more per layer kept on the GPU, a 2.5 GiB budget) recomputes one layer, keeps the
    16-bit weights (a tiny model's fit), logs its one line (at DEBUG its facts and passes too, from which the plan
    is made again without a GPU) and saves the plan; resumed from its checkpoint, the run
    takes it without measuring. Without a GPU the plan is the plain settings, and says so."""
    from lit_mistral.modeling.build import checkpointable_layers

    calls = []

    def training_pass(module, batch, *rest):  # (peak, seconds): the first part's tokens set the peak
        blocks = checkpointable_layers(module.model)
        kept = sum(not b.gradient_checkpointing and not getattr(b, "offload_activations", False) for b in blocks)
        calls.append((kept, batch["input_ids"].numel(), len(rest)))
        return int((1 + kept) * GIB), 1.0 + len(rest)

    def run(max_steps, ckpt_path=None, **compute):
        module = make_module(tiny_model_dir, compute=compute)
        dm = InstructionDataModule(path=str(demo_file), tokenizer=str(tiny_model_dir), max_length=256,
                                   batch_size=4, train_records=(0, 16), val_records=(16, 20))
        return fit_checkpointed(tmp_path, module, dm, max_steps, ckpt_path)

    with caplog.at_level("INFO"):
        module, _ = run(1)
    assert calls == [] and "(no GPU memory to measure: the plain settings)" in caplog.text
    assert module.memory_plan.checkpoint_layers == 2  # every layer recomputes
    assert "memory_plan" not in torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["lit_mistral"]

    monkeypatch.setattr(autofit, "can_measure", lambda device: True)
    monkeypatch.setattr(autofit, "budget_bytes", lambda device, gib: (int(2.5 * GIB), "memory_budget_gib"))
    monkeypatch.setattr(autofit, "MARGIN", 0.0)
    monkeypatch.setattr(autofit, "training_pass", training_pass)
    for path in (tmp_path / "ckpt").glob("*.ckpt"):
        path.unlink()
    caplog.clear()
    with caplog.at_level("INFO"), caplog.at_level("DEBUG", logger="lit_mistral.modeling.fit_plan"):
        module, dm = run(2)
    made = module.memory_plan
    assert (made.checkpoint_layers, made.offload_layers, made.micro_batch_tokens, made.keep_dequantized) == (
        1, 0, None, True)
    assert calls[0] == (2, max(b["input_ids"].numel() for b in dm.train_dataloader()), 0)  # the largest batch
    # probes run the largest part; a part size is timed over every part, as a step runs them
    timings = [(i, call) for i, call in enumerate(calls) if call[2]]
    assert timings and all(calls[i - 1][:2] == call[:2] for i, call in timings)
    lines = [r.message for r in caplog.records if r.message.startswith("model.compute plan:")]
    assert len(lines) == 1 and lines[0].startswith(
        "model.compute plan: 1 of 2 decoder layers recompute, 1 on the GPU; whole batches; 16-bit weights kept for "
        "backward; dropout masks drawn again; predicted peak 2.0 of 2.5 GiB (measured against 2.5 GiB, "
        "memory_budget_gib, on the largest batch of")
    # at DEBUG, the facts and each training pass: its layout, peak and times
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("memory plan facts: Facts(layers=2, ") for m in messages)
    passes = [m for m in messages if m.startswith("memory plan pass")]
    assert len(passes) == len(calls) and passes[0].startswith(
        "memory plan pass 1: Layout(recompute=0, offload=0, size=None, regenerate=False, inputs=False); peak 3.00 GiB "
        f"({3 * GIB} bytes); {calls[0][1]} tokens in 1 part; 1.000 s, 0.000 s of it pinning CPU memory (the GPU idle "
        "0.000 s of it); ")
    assert f"tokens in {timings[0][1][2] + 1} parts; " in passes[timings[0][0]]
    # made again from the log without a GPU (benchmarks/train/replay_plan.py): the same choice; with the parts
    # answered as faster than whole batches, the replay goes on to smaller parts, which the fit did not run, and says so
    replayed, line, logged = replay(caplog.text)
    assert replayed.record() == made.record() and chosen(line) == chosen(logged)
    size = next(layout.size for layout, *_ in parse(caplog.text)[1] if layout.size is not None)
    with pytest.raises(SystemExit, match=rf"no \(further\) pass laid out as Layout\(recompute=\d+, offload=0, "
                                         rf"size={size // 2},"):
        replay(caplog.text, {(1, 0, size, False): 1e6})
    (tmp_path / "fit.log").write_text(caplog.text * 2)  # two plans: the second is picked by --plan
    assert main([str(tmp_path / "fit.log"), "--plan", "2"]) == 0 and capsys.readouterr().out.endswith(
        "the same choice\n")
    with pytest.raises(SystemExit, match="2 'memory plan facts' lines, not 3"):
        main([str(tmp_path / "fit.log"), "--plan", "3"])
    with pytest.raises(SystemExit, match=f"size={size // 2},"):
        main([str(tmp_path / "fit.log"), "--rate", f"1,0,{size}=1000000"])
    # where planning's time goes: in all, and in the training passes
    assert re.search(rf", [0-9.]+ s, [0-9.]+ s of it in {len(calls)} training passes\)\.$", lines[0])
    record = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["lit_mistral"]["memory_plan"]
    assert record["checkpoint_layers"] == 1 and record["keep_dequantized"] is True
    calls.clear()
    caplog.clear()
    with caplog.at_level("INFO"):
        resumed, _ = run(3, ckpt_path=tmp_path / "ckpt" / "last.ckpt", keep_dequantized=False)
    assert calls == [] and "(from the checkpoint resumed); set in the config, kept: keep_dequantized=false." in \
        caplog.text
    assert [b.gradient_checkpointing for b in checkpointable_layers(resumed.model)] == [True, False]
    assert not any(m._keep_dequantized for m in resumed.model.modules() if "_keep_dequantized" in m.__dict__)
