"""The memory plan: at the start of fit on one GPU, the fastest setting of everything that trades GPU memory for speed
without changing what is trained - which decoder layers recompute their activations (`checkpoint_layers`), which keep
them in CPU memory (`offload_layers`), whether the recomputing layers keep their inputs in CPU memory
(`offload_inputs`), in how large parts a batch runs (`micro_batch_tokens`), whether the 16-bit
weights are kept for backward (`keep_dequantized`), and whether dropout masks are kept or drawn again
(`dropout_masks`) - that fits the budget (`memory_budget_gib`, else the GPU's free memory) for the epoch's largest
batch. Dropout sharing, packing, the token budget and LoRA are never touched. A setting given in the config wins.

Tried fastest first, each by a training pass on the largest batch (the allocator's peak; the allocator capped at the
budget meanwhile, so probing never takes more of a shared GPU than the run may) where memory must be measured, by the
model's sizes where they are exact:
1. nothing recomputes, whole batches: one pass. `keep_dequantized` on top where it fits: it holds exactly the 16-bit
   weights of the layers that keep their activations (plus one layer's, while a recomputing layer's backward runs).
2. else as few layers recompute as fit (`autofit.choose_checkpoint_layers`), some of them keeping their activations
   in CPU memory instead where enough others are left to hide the copies and the CPU has the memory, in parts where
   parts are faster (`autofit.choose_micro_tokens`, each size timed as a step runs it, its offloading included),
   dropout masks drawn again (they take memory a layer's activations could take). Where a larger part size does not
   fit (or none does), the same in those sizes with the recomputing layers' inputs in CPU memory (a batch's hidden
   states per layer less on the GPU, the copies hidden by the recomputation), the faster kept. (Where a size fits
   without, its inputs in CPU memory would let only a layer or two more keep their activations, a layer's input
   being a small share of them: not worth their copies.) `keep_dequantized` where it fits on top (not with
   offloading).
3. else fit stops before its first step, saying what the smallest plan needs and what would lower it.
The optimizer's state (allocated at the first step, after the probes) is exact and kept aside, with a margin for the
allocator's fragmentation (`autofit.MARGIN`). The choice is logged in one line, kept in checkpoints and reused when
the run resumes (no probes). Without a GPU to measure, or under `fsdp_qlora`, the plan is the plain settings
(`Compute.plain`) and the log says so. `fit_plan.py` makes the plan of a run and sets the model up by it."""

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

from lit_mistral.config import Compute
from lit_mistral.errors import LitMistralError
from lit_mistral.modeling import autofit

# Offloaded layers are spread among the recomputing ones, whose work hides their copies to the CPU and back: at least
# this many layers that would recompute per layer offloaded (fewer left the copies exposed, slower than recomputing:
# BENCHMARKS.md, the 16 GiB mode), and at most `OFFLOAD_MAX` (past that the link, not the GPU, sets the pace).
OFFLOAD_SPREAD = 3
OFFLOAD_MAX = 8
# CPU memory kept free beside the pinned copies of offloaded activations (pinned pages cannot be swapped out): the
# offloaded layers may take at most this share of what the CPU has available
OFFLOAD_CPU_SHARE = 0.5
GIB = 2**30


@dataclass(frozen=True)
class Layout:
    """What a probe runs with: `recompute` decoder layers recomputing, `offload` keeping their activations in CPU
    memory (the rest keep them on the GPU), batches in parts of `size` tokens (None: whole), dropout masks drawn
    again in backward (`regenerate`), the recomputing layers' inputs in CPU memory (`inputs`)."""

    recompute: int
    offload: int = 0
    size: int | None = None
    regenerate: bool = False
    inputs: bool = False


@dataclass
class Plan:
    """The chosen settings, what they are predicted to take at the peak (the measured pass, the exact extras, the
    optimizer's state; bytes, None where not measured), the budget (bytes) and how they were found."""

    checkpoint_layers: int
    offload_layers: int
    micro_batch_tokens: int | None
    keep_dequantized: bool
    regenerate_dropout: bool
    peak: int | None = None
    budget: int | None = None
    how: str = ""
    line: str = ""  # as logged (`describe`): an out-of-memory error repeats it
    offload_inputs: bool = False

    def record(self) -> dict:
        """What a checkpoint keeps (`from_record` reads it back)."""
        return {k: v for k, v in asdict(self).items() if k not in ("how", "line")}

    @classmethod
    def from_record(cls, record: dict) -> "Plan":
        return cls(**{k: record.get(k) for k in ("checkpoint_layers", "offload_layers", "micro_batch_tokens",
                                                 "keep_dequantized", "regenerate_dropout", "peak", "budget")},
                   how="from the checkpoint resumed", offload_inputs=bool(record.get("offload_inputs")))


@dataclass
class Facts:
    """What the plan knows exactly: decoder layers, bytes of one layer's 16-bit weights that `keep_dequantized`
    holds (0: it cannot: no fused LoRA or no 4-bit base), bytes kept aside (optimizer state and margin), the budget
    (bytes), the largest batch's laid-out tokens and its longest example, CPU memory available for offloading, and
    the bytes of one layer's input for the largest batch (0: unknown)."""

    layers: int
    weights16: int
    reserve: int
    budget: int
    tokens: int
    longest: int
    cpu_free: int
    layer_input: int = 0


def fixed_settings(compute: Compute) -> list[str]:
    """The settings of `Compute.PLANNED` given in the config, as `name=value`, for the log."""
    given = {name: getattr(compute, name) for name in Compute.PLANNED if getattr(compute, name) != "auto"}
    return [f"{name}={'null' if value is None else str(value).lower()}" for name, value in given.items()]


def plain_plan(compute: Compute, layers: int, how: str) -> Plan:
    """The plan that is the plain settings (`Compute.plain`)."""
    plain = compute.plain()
    offload = min(plain.offload_layers, layers) if plain.gradient_checkpointing else 0
    recompute = 0 if not plain.gradient_checkpointing else (
        layers - offload if plain.checkpoint_layers is None else min(plain.checkpoint_layers, layers - offload))
    return Plan(recompute, offload, plain.micro_batch_tokens, bool(plain.keep_dequantized),
                compute.regenerate_dropout(), how=how, offload_inputs=bool(plain.offload_inputs) and recompute > 0)


def choose(probe: Callable[..., int | None], speed: Callable[[Layout], float] | None, facts: Facts,
           compute: Compute, uncapped: Callable[[Layout], int | None] | None = None,
           passes: list[tuple[Layout, float, int]] | None = None) -> Plan:
    """The fastest plan that fits (see the module's docstring), or a `LitMistralError` if none does.
    `probe(layout, every_part)` is the peak (bytes) of a training pass laid out so, None if it ran out of memory
    (probes are capped at the budget): on the batch's largest part, or with `every_part` on all of its parts as a
    step runs them; `speed(layout)` its tokens/s, by one more pass over every part (None: part sizes are not timed);
    `uncapped(layout)` the peak without the cap, measured once for the refusal's figure when even the smallest plan
    ran out. `passes`: the training passes run so far, in order, as (layout, tokens/s, 0 where it ran out of memory;
    the tokens it ran), which the probes add to: a probe's own pass over the whole batch stands for its layout's speed
    where it ran warm (`_speed`), and saves the pass `speed` would run. Settings given in `compute` (not `auto`) are
    kept as given."""
    n, limit = facts.layers, facts.budget - facts.reserve
    peaks: dict[Layout, int | None] = {}
    if speed is not None:
        speed = partial(_speed, speed, passes if passes is not None else [], facts.tokens)

    def measure(layout: Layout, every_part: bool = False) -> int | None:  # each layout probed once
        if layout not in peaks:
            peaks[layout] = probe(layout, every_part)
        return peaks[layout]

    masks, kd_given, offload_given, inputs_given, movable, layers_given, sizes = _given(compute, facts)

    def weights(recompute: int, offload: int) -> int:
        """Bytes of the 16-bit weights kept for backward: those of the layers that keep their activations on the
        GPU, and one recomputing layer's at a time."""
        return facts.weights16 * (n - recompute - offload + (1 if recompute else 0))

    def with_weights(peak: int, recompute: int, offload: int) -> tuple[bool, int]:
        """Whether the 16-bit weights are kept for backward, and the peak with them."""
        extra = weights(recompute, offload)
        keep = kd_given if kd_given is not None else (
            facts.weights16 > 0 and offload == 0 and peak + extra <= limit)
        return bool(keep), peak + (extra if keep else 0)

    def fits(peak: int | None, recompute: int, offload: int) -> bool:
        return peak is not None and with_weights(peak, recompute, offload)[1] <= limit

    def plan(recompute: int, offload: int, size: int | None, regenerate: bool, peak: int, how: str,
             inputs: bool = False) -> Plan:
        keep, peak = with_weights(peak, recompute, offload)
        return Plan(recompute, offload, size, keep, regenerate, peak + facts.reserve, facts.budget, how,
                    offload_inputs=inputs)

    # 1. nothing recomputes, whole batches (or the part size given)
    if layers_given in (None, 0) and not offload_given and not inputs_given:
        layout = Layout(0, 0, sizes[0], bool(masks))
        peak = measure(layout)
        if fits(peak, 0, 0):
            return plan(0, 0, sizes[0], layout.regenerate, peak, "nothing recomputes")

    # 2. as few layers recompute as fit, some of them keeping their activations in CPU memory instead, in the fastest
    # part size that fits; where a larger part size does not fit (or none does), the same in those sizes with the
    # recomputing layers' inputs in CPU memory, if the CPU holds them: the faster wins
    regenerate = True if masks is None else masks
    offload = offload_given or 0

    def kept_weights(layout: Layout) -> int | None:  # the peak with the weights `keep_dequantized: true` holds
        peak = measure(layout)
        return peak if peak is None or not kd_given else peak + weights(layout.recompute, layout.offload)

    def layout_of(inputs: bool, layers: int, size: int | None, moved: int = 0) -> Layout:
        return Layout(layers, offload + moved, size, regenerate, inputs)

    def offloading(trial: autofit.Trial) -> None:
        """Some of `trial`'s recomputing layers keep their activations in CPU memory instead, where enough others
        hide the copies and it fits. Probed over every part of the batch: a layout that fits is the trial's, whose
        speed the same pass then gives (a layout that does not runs out of memory in the largest part, which runs
        first)."""
        for layers, count in _offload_candidates(trial.layers, trial.probes, facts):
            if fits(measure(layout_of(False, layers, trial.size, count), every_part=True), layers, count):
                trial.layers, trial.offload = layers, count
                return

    per_token: dict[bool, float] = {}  # bytes per layer keeping its activations, per laid-out token, as measured

    def parts(inputs: bool, sizes: list[int | None]) -> tuple[autofit.Trial, list[autofit.Trial]]:
        # not beside the inputs' copies (the link is taken), nor where the config fixes the layers
        moving = offloading if offload_given is None and layers_given is None and not inputs else None
        return _search(kept_weights, speed, facts, layers_given, movable, sizes, partial(layout_of, inputs),
                       per_token, moving)

    inputs = inputs_given is True
    choice, trials = parts(inputs, sizes)
    tokens = facts.tokens
    larger = [t.size for t in trials
              if not t.fits and (not choice.fits or (t.size or tokens) > (choice.size or tokens))]
    if inputs_given is None and larger and _cpu_holds_inputs(facts, movable):
        other = parts(True, larger)[0]
        layouts = (layout_of(True, other.layers, other.size),
                   layout_of(False, choice.layers, choice.size, choice.offload))
        if other.fits and (not choice.fits or _faster((other, choice), layouts, speed)):
            choice, inputs = other, True
    if not choice.fits:
        smallest = _smallest(peaks, facts)
        if peaks[smallest] is None and uncapped is not None:
            peaks[smallest] = uncapped(smallest)  # what it would take: the refusal names it
        raise LitMistralError(refusal(facts, compute, peaks))
    chosen = layout_of(inputs, choice.layers, choice.size, choice.offload)
    shown = "whole batches" if chosen.size is None else f"parts of {chosen.size:,} tokens"
    return plan(chosen.recompute, chosen.offload, chosen.size, regenerate, peaks[chosen],
                f"{len(peaks)} probes; {shown}", inputs and chosen.recompute > 0)


def _speed(timed: Callable[[Layout], float], passes: list[tuple[Layout, float, int]], tokens: int,
           layout: Layout) -> float:
    """Tokens/s laid out as `layout`: of its probe's pass where that ran the batch's `tokens` (every part) warm, else
    of one more pass (`timed`, over every part). A probe of one part is not a step's time over its number of parts:
    a pass's fixed costs (its first allocations, the synchronizations) come once per step, so one part's pass makes
    parts look slower than they train."""
    for i, (done, rate, ran) in enumerate(passes):
        if done == layout and ran == tokens and rate > 0 and warm(layout, [e for e, r, _ in passes[:i] if r > 0]):
            return rate
    return timed(layout)


def warm(layout: Layout, earlier: list[Layout]) -> bool:
    """Whether a training pass laid out as `layout`, after the passes `earlier` (those that ran through), times the
    speed it trains at: one of them ran at the same part size (the kernels compiled and tuned for those shapes). The
    first pass of a size pays that once, as a run with the settings fixed pays it in its first step. (What the wait
    for pinned CPU memory, which the first pass offloading at a size pays, cost the GPU is left out of the passes'
    times.)"""
    return any(e.size == layout.size for e in earlier)


def _search(peak: Callable[[Layout], int | None], speed: Callable[[Layout], float] | None, facts: Facts,
            layers_given: int | None, movable: int, sizes: list[int | None], layout: Callable[..., Layout],
            per_token: dict, offloading: Callable[[autofit.Trial], None] | None = None
            ) -> tuple[autofit.Trial, list[autofit.Trial]]:
    """As few of `movable` layers recomputing as fit (`layers_given` where the config fixes it), in the fastest of
    `sizes` that fits (`autofit`); `layout(layers, size, offloaded)` is what is probed, `peak(layout)` its peak, and
    `offloading(trial)` moves some of a fitting trial's recomputing layers to offloading, so that each size is timed
    as it would train. A layer's activations grow with the tokens of a part: the bytes per layer measured at one size
    (kept in `per_token`, by whether the inputs are offloaded, the first measured standing for both) seed the search
    at the next. Returns the choice and every trial."""
    limit = facts.budget - facts.reserve
    inputs = layout(0, None).inputs

    def try_size(size: int | None) -> autofit.Trial:
        def at(layers: int) -> int | None:
            return peak(layout(layers, size))
        tokens = size or facts.tokens
        if layers_given is None:
            known = per_token.get(inputs, next(iter(per_token.values()), None))
            layers, probes = autofit.choose_checkpoint_layers(at, movable, facts.budget, facts.reserve,
                                                              known and known * tokens)
            measured = _bytes_per_layer(probes)
            if measured:
                per_token[inputs] = measured / tokens
        else:
            layers, probes = layers_given, [(layers_given, at(layers_given))]
        trial = autofit.Trial(size, layers, any(k == layers and p is not None and p <= limit for k, p in probes),
                              probes)
        if trial.fits and offloading is not None:
            offloading(trial)
        return trial

    timed = None if speed is None or layers_given is not None or len(sizes) == 1 else (
        lambda trial: speed(layout(trial.layers, trial.size, trial.offload)))
    return autofit.choose_micro_tokens(try_size, timed, sizes)


def _cpu_holds_inputs(facts: Facts, layers: int) -> bool:
    """Whether the CPU's free memory holds the inputs of `layers` recomputing layers (pinned, within
    `OFFLOAD_CPU_SHARE`); unknown sizes are taken to fit."""
    return layers * facts.layer_input <= OFFLOAD_CPU_SHARE * facts.cpu_free


def _faster(trials: tuple[autofit.Trial, autofit.Trial], layouts: tuple[Layout, Layout], speed) -> bool:
    """Whether the first of two fitting trials (laid out as `layouts`) trains faster than the second: timed where the
    plan can time, else by their part sizes (larger parts are faster)."""
    if speed is None:
        return (trials[0].size or 2**62) > (trials[1].size or 2**62)
    rates = [trial.speed if trial.speed is not None else speed(layout) for trial, layout in zip(trials, layouts)]
    return rates[0] > rates[1]


def _given(compute: Compute, facts: Facts) -> tuple:
    """What `compute` fixes, None where the plan decides: (regenerate dropout masks, keep_dequantized, offloaded
    layers, recomputing layers' inputs offloaded, layers that may recompute, recomputing layers, the part sizes to
    try)."""
    n, checkpointing = facts.layers, compute.checkpointing()
    masks = None if compute.dropout_masks == "auto" else compute.dropout_masks == "regenerate"
    kd_given = None if compute.keep_dequantized == "auto" else compute.keep_dequantized
    offload_given = 0 if not checkpointing or kd_given else (
        None if compute.offload_layers == "auto" else min(compute.offload_layers, n))
    inputs_given = False if not checkpointing else None if compute.offload_inputs == "auto" else compute.offload_inputs
    movable = n - (offload_given or 0)  # layers that may recompute
    layers_given = 0 if not checkpointing else (
        None if compute.checkpoint_layers == "auto" else movable if compute.checkpoint_layers is None
        else min(compute.checkpoint_layers, movable))
    if compute.micro_batch_tokens == "auto":
        sizes = [None if s == facts.tokens else s for s in autofit.part_sizes(facts.tokens, facts.longest)]
    else:
        sizes = [compute.micro_batch_tokens]
    return masks, kd_given, offload_given, inputs_given, movable, layers_given, sizes


def _offload_candidates(recompute: int, probes, facts: Facts) -> list[tuple[int, int]]:
    """(recomputing layers, offloaded layers) to try when some of `recompute` recomputing layers offload instead:
    as many as enough others hide the copies of and the CPU's free memory holds, the same layers kept on the GPU,
    else one fewer kept."""
    per_layer = _bytes_per_layer(probes)
    count = min(OFFLOAD_MAX, recompute // OFFLOAD_SPREAD)
    if per_layer:
        count = min(count, int(OFFLOAD_CPU_SHARE * facts.cpu_free // per_layer))
    return [(layers, count) for layers in range(recompute - count, recompute - count + 2)] if count > 0 else []


def _bytes_per_layer(probes: list[tuple[int, int | None]]) -> int | None:
    """The largest measured bytes per layer that keeps its activations, from probes (recomputing layers, peak)."""
    known = sorted((k, p) for k, p in probes if p is not None)
    slopes = [(p1 - p2) / (k2 - k1) for (k1, p1), (k2, p2) in zip(known, known[1:]) if k2 != k1]
    return int(max(slopes)) if slopes and max(slopes) > 0 else None


def _smallest(peaks: dict[Layout, int | None], facts: Facts) -> Layout:
    """The layout probed that takes the least memory: the smallest parts, the most layers recomputing, their inputs
    in CPU memory."""
    return min(peaks, key=lambda layout: (layout.size or facts.tokens, -layout.recompute - layout.offload,
                                          not layout.inputs))


def refusal(facts: Facts, compute: Compute, peaks: dict[Layout, int | None]) -> str:
    """Why no plan fits: the budget, what the smallest plan measured needs, and what would lower it."""
    smallest = _smallest(peaks, facts)
    measured = [p for p in peaks.values() if p is not None]
    need = (f"the smallest plan tried needs {(min(measured) + facts.reserve) / GIB:.1f} GiB" if measured else
            "even the smallest plan tried ran out of the GPU's memory")
    part = f"parts of {smallest.size:,} tokens" if smallest.size else "whole batches"
    part += ", their inputs in CPU memory" if smallest.inputs else ""
    given = fixed_settings(compute)
    unset = (f"; or leave model.compute.{{{','.join(s.split('=')[0] for s in given)}}} auto (set in the config: "
             f"{', '.join(given)})") if given else ""
    return (f"model.compute: no memory plan fits {facts.budget / GIB:.1f} GiB for the epoch's largest batch "
            f"({facts.tokens:,} tokens, its longest example {facts.longest:,}): {need} ({smallest.recompute} of "
            f"{facts.layers} decoder layers recomputing, {part}), with {facts.reserve / GIB:.1f} GiB kept for the "
            "optimizer's state and the allocator. Fix: lower --data.max_tokens (or --data.batch_size), or "
            "--data.max_length (the longest example bounds the smallest part); adapt fewer --model.lora."
            "target_modules or lower --model.lora.r; or raise --model.compute.memory_budget_gib if the GPU has more"
            f"{unset}. Nothing was trained yet.")


def describe(plan: Plan, facts_layers: int, compute: Compute) -> str:
    """The plan as one log line: the chosen values, the predicted peak, and the settings the config gave."""
    kept = facts_layers - plan.checkpoint_layers - plan.offload_layers
    layers = f"{plan.checkpoint_layers} of {facts_layers} decoder layers recompute"
    if plan.offload_inputs:
        layers += " (their inputs in CPU memory)"
    if plan.offload_layers:
        layers += f", {plan.offload_layers} keep their activations in CPU memory"
    layers += f", {kept} on the GPU"
    parts = "whole batches" if plan.micro_batch_tokens is None else f"parts of {plan.micro_batch_tokens:,} tokens"
    weights = "16-bit weights kept for backward" if plan.keep_dequantized else "weights dequantized again in backward"
    masks = "dropout masks drawn again" if plan.regenerate_dropout else "dropout masks kept"
    peak = "" if plan.peak is None else f"; predicted peak {plan.peak / GIB:.1f} of {plan.budget / GIB:.1f} GiB"
    given = fixed_settings(compute)
    wins = f"; set in the config, kept: {', '.join(given)}" if given else ""
    return f"model.compute plan: {layers}; {parts}; {weights}; {masks}{peak} ({plan.how}){wins}."
