"""The memory plan (`modeling/plan.py`): its choice at each budget from a memory model shaped like Mistral-7B's at
16,384 tokens per step (the probes replaced by the model), settings given in the config winning, the refusal when
nothing fits. (A fit run making, keeping and reusing its plan: test_fit_plan.py.)"""

import pytest

from lit_mistral.config import Compute
from lit_mistral.errors import LitMistralError
from lit_mistral.modeling import autofit, plan
from lit_mistral.modeling.fit_plan import optimizer_state_bytes
from lit_mistral.modeling.plan import Facts, Layout

GIB = 2**30
LAYERS, TOKENS = 32, 16_384


def peak_gib(layout: Layout) -> float:
    """Mistral-7B-like: the 4-bit base, adapters and their gradients (fixed); per token share, the layers'
    boundaries and one recomputing layer's working memory, each layer that keeps its activations on the GPU (less
    with the masks drawn again), a little per offloaded layer and one in flight."""
    share = (layout.size or TOKENS) / TOKENS
    kept = LAYERS - layout.recompute - layout.offload
    offloaded = 0.02 * layout.offload + (0.3 if layout.offload else 0)
    return 4.5 + share * (6.8 + kept * (1.55 if layout.regenerate else 2.0) + offloaded)


def speed(layout: Layout) -> float:
    """Recomputing a layer costs a third of its forward; smaller parts run slower (smaller multiplies, more
    launches)."""
    parts = {None: 1.0, 8192: 0.95, 4096: 0.75, 2048: 0.5}[layout.size]
    return parts / (1 + layout.recompute / LAYERS / 3)


def facts(budget_gib: float, cpu_gib: float = 200) -> Facts:
    budget = int(budget_gib * GIB)
    reserve = optimizer_state_bytes("adamw", 21_000_000) + int(autofit.MARGIN * budget)
    return Facts(LAYERS, int(0.406 * GIB), reserve, budget, TOKENS, 2048, int(cpu_gib * GIB))


def choose(budget_gib: float, calls: list | None = None, cpu_gib: float = 200, **compute):
    def probe(layout):
        if calls is not None:
            calls.append(layout)
        return int(peak_gib(layout) * GIB)
    return plan.choose(probe, speed, facts(budget_gib, cpu_gib), Compute(**compute))


@pytest.mark.parametrize(("budget", "chosen", "probes"), [
    # (recompute, offload, part tokens, keep_dequantized, masks drawn again)
    (141, (0, 0, None, True, False), 1),  # everything fits, the 16-bit weights too: one probe
    (80, (0, 0, None, False, False), 1),  # nothing recomputes, but the weights do not fit beside it
    (40, (0, 0, 8192, False, True), 8),  # halves of the batch keep every layer's activations: faster than recomputing
    (24, (10, 4, 8192, False, True), 14),  # halves, 14 recomputing, 4 of them offloading instead
    (16, (22, 8, None, False, True), 10),  # qlora-16gb's choice: 22 recompute, 8 offload, 2 keep theirs
    (8, (22, 8, 4096, False, True), 12),  # only quarters fit
])
def test_the_fastest_plan_that_fits_each_budget(budget, chosen, probes):
    calls = []
    made = choose(budget, calls)
    assert (made.checkpoint_layers, made.offload_layers, made.micro_batch_tokens, made.keep_dequantized,
            made.regenerate_dropout) == chosen
    assert len(calls) == len(set(calls)) == probes  # each layout probed once
    assert made.peak <= made.budget == int(budget * GIB)
    weights = 0.406 * (LAYERS + 0) if made.keep_dequantized else 0
    layout = Layout(made.checkpoint_layers, made.offload_layers, made.micro_batch_tokens, made.regenerate_dropout)
    assert made.peak / GIB == pytest.approx(peak_gib(layout) + weights + facts(budget).reserve / GIB, abs=1e-6)


def test_no_offloading_without_the_cpu_memory_for_it():
    made = choose(16, cpu_gib=7)  # two layers' activations at most (half of what is available)
    assert (made.checkpoint_layers, made.offload_layers) == (28, 2)
    assert choose(16, cpu_gib=0).offload_layers == 0


def test_settings_given_in_the_config_win():
    made = choose(141, keep_dequantized=False)
    assert (made.checkpoint_layers, made.keep_dequantized) == (0, False)
    made = choose(80, checkpoint_layers=None)  # every layer recomputes, as given: no layer search, no offloading
    assert (made.checkpoint_layers, made.offload_layers, made.micro_batch_tokens) == (32, 0, None)
    made = choose(24, gradient_checkpointing=False)  # nothing recomputes or offloads: smaller parts instead
    assert (made.checkpoint_layers, made.offload_layers, made.micro_batch_tokens) == (0, 0, 4096)
    made = choose(16, micro_batch_tokens=None, offload_layers=0, dropout_masks="keep")
    assert (made.checkpoint_layers, made.offload_layers, made.micro_batch_tokens, made.regenerate_dropout) == (
        31, 0, None, False)  # masks kept: a layer's activations take more, so one fewer layer keeps them
    made = choose(24, keep_dequantized=True)  # its weights counted in, and no offloading beside it
    assert made.keep_dequantized and made.offload_layers == 0 and made.peak <= made.budget
    line = plan.describe(made, LAYERS, Compute(keep_dequantized=True))
    assert line.endswith("set in the config, kept: keep_dequantized=true.") and "predicted peak" in line


def test_refuses_before_the_first_step_when_nothing_fits():
    with pytest.raises(LitMistralError) as refused:
        choose(5)
    message = str(refused.value)
    assert message.startswith("model.compute: no memory plan fits 5.0 GiB for the epoch's largest batch (16,384 "
                              "tokens, its longest example 2,048): the smallest plan tried needs 5.8 GiB (32 of 32 "
                              "decoder layers recomputing, parts of 2,048 tokens)")
    for fix in ("--data.max_tokens", "--data.max_length", "--model.lora.target_modules", "--model.lora.r",
                "--model.compute.memory_budget_gib"):
        assert fix in message
    with pytest.raises(LitMistralError, match=r"leave model.compute.\{micro_batch_tokens\} auto \(set in the "
                                              r"config: micro_batch_tokens=16384\)"):
        choose(10, micro_batch_tokens=16384)


def test_the_refusal_measures_the_smallest_plan_once_without_the_cap():
    """Probes are capped at the budget, so on a small budget every one may run out; the refusal still says what the
    smallest plan would take, by one probe without the cap."""
    uncapped = []

    def without_cap(layout):
        uncapped.append(layout)
        return int(peak_gib(layout) * GIB)

    with pytest.raises(LitMistralError, match=r"the smallest plan tried needs 5\.8 GiB \(32 of 32 decoder layers "
                                              r"recomputing, parts of 2,048 tokens\)"):
        plan.choose(lambda layout: None, speed, facts(5), Compute(), without_cap)
    assert uncapped == [Layout(32, 0, 2048, True)]
