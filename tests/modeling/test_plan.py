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


BOUNDARY = 0.125  # GiB: one layer's input (16,384 tokens x 4,096 x 2 bytes)


def peak_gib(layout: Layout) -> float:
    """Mistral-7B-like: the 4-bit base, adapters and their gradients (fixed); per token share, the layers'
    boundaries (the recomputing layers' in CPU memory with `inputs`, one of them in flight each way) and one
    recomputing layer's working memory, each layer that keeps its activations on the GPU (less with the masks drawn
    again), a little per offloaded layer and one in flight."""
    share = (layout.size or TOKENS) / TOKENS
    kept = LAYERS - layout.recompute - layout.offload
    offloaded = 0.02 * layout.offload + (0.3 if layout.offload else 0)
    inputs = BOUNDARY * (2 - layout.recompute) if layout.inputs and layout.recompute else 0
    return 4.5 + share * (6.8 + kept * (1.55 if layout.regenerate else 2.0) + offloaded + inputs)


def speed(layout: Layout) -> float:
    """Recomputing a layer costs a third of its forward; smaller parts run slower (smaller multiplies, more
    launches); the copies of the inputs and of offloaded layers, hidden by the recomputation, cost a little."""
    parts = {None: 1.0, TOKENS: 1.0, 8192: 0.95, 4096: 0.75, 2048: 0.5}[layout.size]
    copies = (0.97 if layout.inputs else 1) * (1 - 0.003 * layout.offload)
    return parts * copies / (1 + layout.recompute / LAYERS / 3)


def facts(budget_gib: float, cpu_gib: float = 200) -> Facts:
    budget = int(budget_gib * GIB)
    reserve = optimizer_state_bytes("adamw", 21_000_000) + int(autofit.MARGIN * budget)
    return Facts(LAYERS, int(0.406 * GIB), reserve, budget, TOKENS, 2048, int(cpu_gib * GIB), int(BOUNDARY * GIB))


def choose(budget_gib: float, calls: list | None = None, cpu_gib: float = 200, timed: list | None = None,
           **compute):
    """`plan.choose` on the memory model; `calls` gets each layout probed, `timed` each one timed by a pass of its
    own (a probe's pass over the whole batch, where warm, times its layout without one)."""
    passes = []

    def probe(layout, every_part=False):
        if calls is not None:
            calls.append(layout)
        passes.append((layout, speed(layout), TOKENS if every_part or layout.size is None else layout.size))
        return int(peak_gib(layout) * GIB)

    def timing(layout):
        if timed is not None:
            timed.append(layout)
        passes.append((layout, speed(layout), TOKENS))
        return speed(layout)
    return plan.choose(probe, timing, facts(budget_gib, cpu_gib), Compute(**compute), passes=passes)


@pytest.mark.parametrize(("budget", "chosen", "probes", "timed_sizes"), [
    # (recompute, offload, part tokens, keep_dequantized, masks drawn again, inputs in CPU memory)
    (141, (0, 0, None, True, False, False), 1, []),  # everything fits, the 16-bit weights too: one probe
    (80, (0, 0, None, False, False, False), 1, []),  # nothing recomputes, but the weights do not fit beside it
    # halves of the batch keep every layer's activations: faster than whole batches recomputing, offloading or not
    (40, (0, 0, 8192, False, True, False), 8, [8192]),
    (24, (10, 4, 8192, False, True, False), 11, [4096]),  # halves, 14 recomputing, 4 of them offloading instead
    (16, (22, 8, None, False, True, False), 9, []),  # qlora-16gb's choice: 22 recompute, 8 offload, 2 keep theirs
    # halves with 8 layers offloading: faster than whole batches with the recomputing layers' inputs in CPU memory
    (12, (20, 8, 8192, False, True, False), 11, []),
    # halves with the inputs offloaded, against quarters without
    (8, (31, 0, 8192, False, True, True), 14, [8192]),
])
def test_the_fastest_plan_that_fits_each_budget(budget, chosen, probes, timed_sizes):
    """Every training pass counts (each costs about a step): each layout is probed once, the layer search at a part
    size starts from the bytes per layer measured at the larger one, and a layout is timed by its probe's own pass
    where that ran the whole batch warm (after another pass at its part size): whole batches, and the offloading
    tried at a part size, probed over every part. Else a part size that fits is timed once more, by a pass over
    every part as a step runs them (a probe runs only the largest part), laid out as it would train."""
    calls, timed = [], []
    made = choose(budget, calls, timed=timed)
    assert (made.checkpoint_layers, made.offload_layers, made.micro_batch_tokens, made.keep_dequantized,
            made.regenerate_dropout, made.offload_inputs) == chosen
    assert len(calls) == len(set(calls)) == probes  # each layout probed once
    assert [layout.size for layout in timed] == timed_sizes and set(timed) <= set(calls)
    assert made.peak <= made.budget == int(budget * GIB)
    weights = 0.406 * (LAYERS + 0) if made.keep_dequantized else 0
    layout = Layout(made.checkpoint_layers, made.offload_layers, made.micro_batch_tokens, made.regenerate_dropout,
                    made.offload_inputs)
    assert made.peak / GIB == pytest.approx(peak_gib(layout) + weights + facts(budget).reserve / GIB, abs=1e-6)


def test_a_probe_times_its_layout_only_where_it_ran_warm():
    """A probe's pass times what training would see only after another pass at its part size (kernels compiled and
    tuned for those shapes), only if that one ran through, and only on whole batches; offloading or not (what the
    wait for pinned memory cost the GPU is left out of the passes' times: test_offload.py)."""
    whole, inputs = Layout(22, 0, None, True), Layout(30, 0, None, True, True)
    assert not plan.warm(whole, []) and not plan.warm(whole, [Layout(32, 0, 8192, True)])
    assert plan.warm(whole, [Layout(32, 0, None, True)])
    assert plan.warm(Layout(22, 8, None, True), [Layout(32, 0, None, True)])
    assert plan.warm(inputs, [Layout(32, 0, None, True)]) and not plan.warm(inputs, [Layout(28, 0, 8192, True, True)])
    timed = []

    def timing(layout):
        timed.append(layout)
        return 2.0

    passes = [(Layout(32, 0, None, True), 0.0, TOKENS), (whole, 1.0, TOKENS)]  # the first ran out of memory
    assert plan._speed(timing, passes, TOKENS, whole) == 2.0 and timed == [whole]
    passes = [(Layout(32, 0, None, True), 0.5, TOKENS), (whole, 1.0, TOKENS)]
    assert plan._speed(timing, passes, TOKENS, whole) == 1.0 and timed == [whole]
    # a probe of one part does not time its part size (a step runs every part); a probe over every part does
    halves = Layout(22, 0, 8192, True)
    passes = [(Layout(32, 0, 8192, True), 0.5, 8192), (halves, 1.0, 8192)]
    assert plan._speed(timing, passes, TOKENS, halves) == 2.0 and timed == [whole, halves]
    passes = [(Layout(32, 0, 8192, True), 0.5, 8192), (halves, 1.0, TOKENS)]
    assert plan._speed(timing, passes, TOKENS, halves) == 1.0 and timed == [whole, halves]


def test_inputs_stay_on_the_gpu_without_the_cpu_memory_for_them():
    """32 layers' inputs take 4 GiB of pinned CPU memory: with less than twice that available, the plan at 8 GiB
    runs quarters with the inputs on the GPU."""
    made = choose(8, cpu_gib=7)
    assert (made.checkpoint_layers, made.micro_batch_tokens, made.offload_inputs) == (22, 4096, False)
    assert (made.offload_layers, choose(8, cpu_gib=9).offload_inputs) == (8, True)  # quarters' activations fit


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
    made = choose(12, offload_inputs=False)  # the inputs stay on the GPU: halves instead of whole batches
    assert (made.micro_batch_tokens, made.offload_inputs) == (8192, False)
    made = choose(16, offload_inputs=True)  # given: no layer offloads beside them; fewer layers recompute
    assert (made.checkpoint_layers, made.offload_layers, made.micro_batch_tokens, made.offload_inputs) == (
        28, 0, None, True)
    assert "(their inputs in CPU memory)" in plan.describe(made, LAYERS, Compute(offload_inputs=True))
    made = choose(24, keep_dequantized=True)  # its weights counted in, and no offloading beside it
    assert made.keep_dequantized and made.offload_layers == 0 and made.peak <= made.budget
    line = plan.describe(made, LAYERS, Compute(keep_dequantized=True))
    assert line.endswith("set in the config, kept: keep_dequantized=true.") and "predicted peak" in line


def test_refuses_before_the_first_step_when_nothing_fits():
    with pytest.raises(LitMistralError) as refused:
        choose(5)
    message = str(refused.value)
    assert message.startswith("model.compute: no memory plan fits 5.0 GiB for the epoch's largest batch (16,384 "
                              "tokens, its longest example 2,048): the smallest plan tried needs 5.3 GiB (32 of 32 "
                              "decoder layers recomputing, parts of 2,048 tokens, their inputs in CPU memory)")
    for fix in ("--data.max_tokens", "--data.max_length", "--model.lora.target_modules", "--model.lora.r",
                "--model.compute.memory_budget_gib"):
        assert fix in message
    with pytest.raises(LitMistralError, match=r"leave model.compute.\{micro_batch_tokens\} auto \(set in the "
                                              r"config: micro_batch_tokens=16384\)"):
        choose(7, micro_batch_tokens=16384)


def test_the_refusal_measures_the_smallest_plan_once_without_the_cap():
    """Probes are capped at the budget, so on a small budget every one may run out; the refusal still says what the
    smallest plan would take, by one probe without the cap."""
    uncapped = []

    def without_cap(layout):
        uncapped.append(layout)
        return int(peak_gib(layout) * GIB)

    with pytest.raises(LitMistralError, match=r"the smallest plan tried needs 5\.3 GiB \(32 of 32 decoder layers "
                                              r"recomputing, parts of 2,048 tokens, their inputs in CPU memory\)"):
        plan.choose(lambda layout, every_part: None, speed, facts(5), Compute(), without_cap)
    assert uncapped == [Layout(32, 0, 2048, True, True)]
