"""The measurements behind the memory plan: the layer count from measured peaks, the probe batch, the budget's
check, and the real measurement on a GPU (the plan's choice itself: test_plan.py)."""

import pytest
from conftest import make_module

from lit_mistral.data.batching import BatchPlan
from lit_mistral.data.datamodule import InstructionDataModule
from lit_mistral.modeling import autofit

GIB = 2**30


def linear_memory(base: float, per_layer: float, total: int, calls: list | None = None, oom_above: float = 1e9):
    """A peak (bytes) of `base` GiB with every layer checkpointed, `per_layer` GiB more per layer that keeps its
    activations; None (out of memory) above `oom_above` GiB."""
    def measure(layers: int):
        if calls is not None:
            calls.append(layers)
        peak = base + per_layer * (total - layers)
        return None if peak > oom_above else int(peak * GIB)
    return measure


def test_picks_the_fewest_checkpointed_layers_that_fit():
    calls = []
    layers, probes = autofit.choose_checkpoint_layers(linear_memory(10, 1, 32, calls), 32, 20 * GIB, GIB)
    assert layers == 23  # 9 layers keep their activations: 10 + 9 + 1 (reserve) = 20 GiB
    # all, an eighth kept, where the line meets the budget; the line says the next does not fit: not measured
    assert calls == [32, 28, 23] and [p for _, p in probes] == [10 * GIB, 14 * GIB, 19 * GIB]


def test_a_slope_known_from_larger_parts_goes_straight_to_the_limit():
    calls = []
    layers, _ = autofit.choose_checkpoint_layers(linear_memory(10, 1, 32, calls), 32, 20 * GIB, GIB, slope=GIB)
    assert layers == 23 and calls == [32, 23]
    calls.clear()  # a slope measured too low: the first guess runs out, the line through it finds the count
    layers, _ = autofit.choose_checkpoint_layers(linear_memory(10, 1, 32, calls), 32, 20 * GIB, GIB, slope=GIB / 2)
    assert layers == 23 and calls == [32, 14, 23]


def test_steps_back_when_the_estimate_was_optimistic():
    # activations grow faster than the first layers showed: the first estimate does not fit; the line through it
    # and the last count that fits finds the fewest checkpointed layers that fit
    def measure(layers):
        kept = 32 - layers
        return int((10 + kept + 0.2 * max(0, kept - 2) ** 1.5) * GIB)

    layers, probes = autofit.choose_checkpoint_layers(measure, 32, 20 * GIB, GIB)
    assert measure(layers) + GIB <= 20 * GIB < measure(layers - 1) + GIB
    assert measure(probes[2][0]) + GIB > 20 * GIB and len(probes) == 4


@pytest.mark.parametrize(("tokens", "first", "rest", "base", "chosen"),
                         [(16_384, 1.95, 3.85, 64.6, 62), (8_192, 1.05, 1.95, 50.8, 38)])
def test_few_probes_on_the_memory_a_70b_showed(tokens, first, rest, base, chosen):
    """Llama-2-70B's peaks on an H200 (2026-12-02, 80 layers, 139.1 GiB, out of memory above): the first two layers
    kept cost less than the rest, which made the earlier search's first estimates run out of memory 3 and 8 times
    (7 and 10 probes). Now: at most 5 probes, none out of memory, and the best count."""
    def measure(layers):
        kept = 80 - layers
        peak = base + (first * kept if kept <= 2 else first * 2 + rest * (kept - 2))
        return None if peak > 139.1 else int(peak * GIB)

    budget = int(139.1 * GIB)
    reserve = int(8 * 103.5e6 + autofit.MARGIN * budget)
    layers, probes = autofit.choose_checkpoint_layers(measure, 80, budget, reserve)
    assert layers == chosen and measure(layers) + reserve <= budget < measure(layers - 1) + reserve
    assert len(probes) <= 5 and all(peak is not None for _, peak in probes)


def test_every_layer_when_nothing_less_fits_or_memory_runs_out():
    assert autofit.choose_checkpoint_layers(linear_memory(25, 1, 32), 32, 20 * GIB, 0)[0] == 32  # not even all
    assert autofit.choose_checkpoint_layers(linear_memory(10, 1, 32, oom_above=11.5), 32, 40 * GIB, 0)[0] == 31
    assert autofit.choose_checkpoint_layers(linear_memory(10, 20, 32), 32, 20 * GIB, 0)[0] == 32
    assert autofit.choose_checkpoint_layers(linear_memory(1, 1, 0), 0, 20 * GIB, 0)[0] == 0
    assert autofit.choose_checkpoint_layers(linear_memory(1, 0.1, 32), 32, 80 * GIB, 0)[0] == 0  # all fit


def test_batch_plan_names_its_largest_batch_without_touching_the_resume_state():
    lengths = [5, 9, 3, 8, 7, 2, 6]
    packed = BatchPlan(lengths, batch_size=1, max_tokens=16, packed=True, shuffle=True, seed=1)
    assert sum(lengths[i] for i in packed.largest()) == max(sum(lengths[i] for i in b) for b in packed)
    padded = BatchPlan(lengths, batch_size=3, shuffle=False)
    padded.skip = 1
    assert padded.largest() == [0, 1, 2]  # 3 x 9 positions
    assert padded.skip == 1 and len(list(padded)) == len(padded) - 1


def test_a_budget_needs_something_left_to_the_plan():
    from lit_mistral.config import Compute

    assert Compute(memory_budget_gib=24).problems(True) == []  # every memory setting auto by default
    fixed = dict(gradient_checkpointing=True, checkpoint_layers=None, offload_layers=0, offload_inputs=False,
                 micro_batch_tokens=None, keep_dequantized=False, dropout_masks="keep")
    assert "memory_budget_gib=24: a positive number, for the memory plan; it decides nothing when every one" in \
        Compute(memory_budget_gib=24, **fixed).problems(True)[0]
    assert "memory_budget_gib=0" in Compute(memory_budget_gib=0).problems(True)[0]


@pytest.mark.gpu
def test_auto_measures_on_a_gpu(tiny_model_dir, demo_file, tmp_path):
    """The real measurement (CUDA's allocator): the tiny model fits a 1 GiB budget with no layer recomputing and the
    16-bit weights kept."""
    from lightning.pytorch import Trainer

    module = make_module(tiny_model_dir, compute={"memory_budget_gib": 1.0, "dtype": "bfloat16"})
    dm = InstructionDataModule(path=str(demo_file), tokenizer=str(tiny_model_dir), max_length=256, batch_size=4,
                               train_records=(0, 16), val_records=(16, 20))
    Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=2, limit_val_batches=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path).fit(module, dm)
    made = module.memory_plan
    assert (made.checkpoint_layers, made.keep_dequantized) == (0, True) and made.peak <= made.budget
