"""`--model.compute.offload_layers`: decoder layers that keep the activations their backward needs in the CPU's
memory, instead of recomputing them (`checkpoint_layers`) or holding them on the GPU; and
`--model.compute.offload_inputs`: recomputing layers that keep their input (the hidden states their recomputation
starts from, the one tensor a recomputing layer holds: a batch's tokens x the hidden size each) in the CPU's memory.

In training, every tensor such a layer saves for backward (of `MIN_BYTES` or more, not a parameter) is copied during
forward into pinned CPU memory on a stream of its own, overlapping the layers computed after it; its GPU memory is
let go once the copy is done (the CPU waits for one offloaded layer's copies before the next one's forward, so that
at most about one layer's are in flight). When a decoder layer's backward begins (the gradient of its output
arrives), an offloaded layer `AHEAD` layers below it is copied back on another stream, to be on the GPU when its own
backward comes. `build.set_checkpointing` spreads the offloaded layers among the recomputing ones, whose work (their
forward; in backward, their recomputation) hides the copies; the last layers, whose backward follows forward at once,
keep their activations on the GPU.

A recomputing layer's input is what the checkpoint saves (`torch.utils.checkpoint` saves its inputs through the
saved-tensor hooks around it): the layer's checkpoint function runs inside this offloader's hooks, and the same
copies, waits and fetches apply to it. Its recomputation (a layer's forward) hides the copies.

Written by hand because torch's `torch.autograd.graph.save_on_cpu` (which transformers' `offload=True`
checkpointing uses, where it has it) copies on the computing stream: in forward each copy waits, and in backward
each tensor comes back only when its node runs: a layer's activations, at a PCIe link's speed, would stall the GPU
each way. On the CPU (tests) the same bookkeeping runs, with copies in the same memory."""

import os
import time
import weakref
from dataclasses import dataclass, field
from functools import partial

import torch

from lit_mistral.errors import LitMistralError

MIN_BYTES = 1 << 20  # smaller saved tensors stay where they are (a norm's statistics): not worth a copy
# a wait for pinned memory longer than this pinned new pages (`pinning_idle_seconds` times what the GPU lost to it)
STALL = 1e-3
# an offloaded layer comes back when backward reaches the layer this many above it: the backward (with recomputation)
# of two layers outlasts the copy of one layer's activations over a PCIe link
AHEAD = 2
# how the CPU memory for the copies is pinned (torch's own setting of its pinned-memory allocator,
# PYTORCH_CUDA_ALLOC_CONF): pages allocated as usual, touched by 8 threads and registered with CUDA
# (`cudaHostRegister`), instead of torch's default `cudaHostAlloc`, which pins one block at a time and is several
# times slower for the gigabytes offloaded layers take; the copies run as fast (BENCHMARKS.md, Memory modes)
PINNING = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"


class _Entry:
    """One span of memory a layer saved: in CPU memory (`cpu`) until fetched for backward, then on its device again
    (`gpu`, with the event that marks the copy done); flat, laid out as on the device, so views come back with their
    strides."""

    def __init__(self, cpu: torch.Tensor) -> None:
        self.cpu: torch.Tensor | None = cpu
        self.gpu: torch.Tensor | None = None
        self.arrived: torch.cuda.Event | None = None


@dataclass
class _Handle:
    """What autograd keeps of a saved tensor of an offloaded layer: the entry and the tensor's view of it."""

    layer: int
    entry: _Entry
    size: torch.Size
    stride: tuple


@dataclass
class _Pass:
    """An offloaded layer's state in one training pass: its entries by span while its forward runs, with the tensors
    they were copied from (held until the forward's end, so that no other tensor of it takes their address and is
    mistaken for them), then weak references to the entries (autograd's handles own them, and let go of them after
    the layer's backward); the event that marks the copies to the CPU done (CUDA)."""

    entries: dict = field(default_factory=dict)
    kept: list = field(default_factory=list)
    copied: torch.cuda.Event | None = None


class ActivationOffload:
    """Offloads the activations of the decoder layers flagged `offload_activations`, and the inputs of those flagged
    `offload_inputs` (`build.set_checkpointing` sets the flags and routes the latter's checkpoints through
    `checkpoint_offloaded`); installed once per model by `install`, acting in training passes only."""

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module]) -> None:
        self.model, self.layers = model, layers
        self.passes: dict[int, _Pass] = {}  # offloaded layer -> its state, from its forward until it is fetched
        self.contexts: dict[int, torch.autograd.graph.saved_tensors_hooks] = {}
        self.params: set[int] = set()  # the parameters' memory, never copied
        self.streams: tuple | None = None  # (to the CPU, back to the GPU), made at the first CUDA copy
        self.device: torch.device | None = None
        self.bytes_out = 0  # copied to the CPU in the latest training pass
        self.pinning = 0.0  # seconds the latest training pass waited for CPU memory to be pinned (`pinning_seconds`)
        # CUDA events around each of those waits on the computing stream (`pinning_idle_seconds`)
        self.stalls: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.bounded = True  # wait for an offloaded layer's copies before the next one's forward (see `_enter`)

    @classmethod
    def install(cls, model: torch.nn.Module, layers: list[torch.nn.Module]) -> "ActivationOffload":
        """The offloader of `model` (hooks on each of `layers`, its decoder layers in order), made at the first call."""
        existing = getattr(model, "_activation_offload", None)
        if existing is not None:
            return existing
        offload = cls(model, layers)
        for i, layer in enumerate(layers):
            layer.offload_activations = getattr(layer, "offload_activations", False)
            layer.offload_inputs = getattr(layer, "offload_inputs", False)
            layer.register_forward_pre_hook(partial(offload._enter, i))
            layer.register_forward_hook(partial(offload._exit, i), always_call=True)
        model._activation_offload = offload
        return offload

    def offloaded(self) -> list[int]:
        """The layers whose activations or inputs go to the CPU, in order."""
        return [i for i, layer in enumerate(self.layers) if layer.offload_activations or layer.offload_inputs]

    # -- forward: copy out -------------------------------------------------------------------------------------------
    @staticmethod
    def _training(layer: torch.nn.Module) -> bool:
        return layer.training and torch.is_grad_enabled()

    def _enter(self, i: int, layer: torch.nn.Module, args) -> None:
        if layer.offload_activations and self._training(layer):
            self._open(i)

    def checkpoint_offloaded(self, i: int, checkpoint, function, *args):
        """Layer `i`'s `checkpoint(function, *args)` with what it saves (the layer's inputs) offloaded."""
        if not self._training(self.layers[i]):
            return checkpoint(function, *args)
        self._open(i)
        try:
            return checkpoint(function, *args)
        finally:
            self._close(i)

    def _open(self, i: int) -> None:
        """Layer `i`'s forward begins: what is saved for backward from here on is offloaded, until `_close`."""
        offloaded = self.offloaded()
        if i == offloaded[0]:  # a new pass
            self.params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
            self.bytes_out, self.pinning, self.stalls = 0, 0.0, []
        elif self.bounded:
            # The CPU runs ahead of the GPU; an offloaded tensor's memory can be handed out again only once its copy
            # has run on the GPU, so with a link slower than the layers between, the offloaded activations would
            # pile up in GPU memory (reserved, not reusable) until the copies catch up. Waiting here for the previous
            # offloaded layer's copies keeps about one layer's in flight; the GPU has the layers in between queued,
            # so it does not wait while the link keeps up.
            previous = self.passes.get(offloaded[offloaded.index(i) - 1])
            if previous is not None and previous.copied is not None:
                previous.copied.synchronize()
        self.passes[i] = _Pass()
        hooks = torch.autograd.graph.saved_tensors_hooks(partial(self._pack, i), self._unpack)
        hooks.__enter__()
        self.contexts[i] = hooks

    def _close(self, i: int) -> None:
        hooks = self.contexts.pop(i, None)
        if hooks is not None:
            hooks.__exit__(None, None, None)
            state = self.passes[i]
            state.kept = [weakref.ref(e) for e, _ in state.entries.values()]
            state.entries = {}
            if self.streams is not None:
                state.copied = self.streams[0].record_event()

    def _exit(self, i: int, layer: torch.nn.Module, args, output) -> None:
        if layer.offload_activations:
            self._close(i)
        if not self._training(layer) or not self.passes:
            return
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(partial(self._backward_reached, i))

    def _pack(self, i: int, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if nbytes < MIN_BYTES or not _dense(t) or t.untyped_storage().data_ptr() in self.params:
            return t
        entries = self.passes[i].entries
        key = (t.data_ptr(), nbytes, t.dtype)  # views of one span (a reshape of it) share one copy
        if key not in entries:
            entries[key] = (_Entry(self._copy_out(_span(t))), t)
            self.bytes_out += nbytes
        entry = entries[key][0]
        return _Handle(i, entry, t.size(), t.stride())

    def _copy_out(self, span: torch.Tensor) -> torch.Tensor:
        if span.device.type != "cuda":
            return span.clone()
        if self.streams is None:
            self.streams, self.device = (torch.cuda.Stream(span.device), torch.cuda.Stream(span.device)), span.device
            register_pinned_pages()
        computing = torch.cuda.current_stream(span.device)
        waiting = torch.cuda.Event(enable_timing=True)
        waiting.record(computing)
        started = time.perf_counter()
        try:
            cpu = torch.empty(span.shape, dtype=span.dtype, pin_memory=True)
        except RuntimeError as err:
            raise LitMistralError(
                f"model.compute.offload_layers: could not pin {span.numel() * span.element_size():,} bytes of CPU "
                f"memory for a layer's activations ({str(err).strip().splitlines()[0][:200]}). Fix: fewer "
                "--model.compute.offload_layers (each takes ~its activations' size in CPU memory), or 0.") from None
        finally:
            waited = time.perf_counter() - started
            self.pinning += waited
        if waited > STALL:  # new pages were pinned (memory pinned before is handed back at once)
            resumed = torch.cuda.Event(enable_timing=True)
            resumed.record(computing)
            self.stalls.append((waiting, resumed))
        out_stream = self.streams[0]
        out_stream.wait_stream(torch.cuda.current_stream(span.device))  # after the kernels that wrote it
        with torch.cuda.stream(out_stream):
            cpu.copy_(span, non_blocking=True)
        span.record_stream(out_stream)  # its memory is not handed out again before the copy is done
        return cpu

    # -- backward: copy back -----------------------------------------------------------------------------------------
    def _backward_reached(self, i: int, grad: torch.Tensor) -> None:
        """Layer `i`'s backward begins: fetch the offloaded layers not fetched yet from `AHEAD` layers below it up,
        so that each comes back while the layers above it run their backward (and recompute), and only then: fetched
        any earlier, every offloaded layer would be back on the GPU long before its backward."""
        for j in [j for j in self.passes if j >= i - AHEAD]:
            self._fetch(j)

    def _fetch(self, i: int) -> None:
        """Bring layer `i`'s entries that autograd still holds back to their device (CUDA: on the copy stream, after
        their copies out are done)."""
        state = self.passes.pop(i, None)
        if state is None:
            return
        entries = [e for e in (ref() for ref in state.kept) if e is not None and e.gpu is None]
        if self.streams is None or not entries:
            for e in entries:
                e.gpu, e.cpu = e.cpu.clone(), None
            return
        back = self.streams[1]
        if state.copied is not None:
            back.wait_event(state.copied)
        with torch.cuda.stream(back):
            for e in entries:
                e.gpu, e.cpu = e.cpu.to(self.device, non_blocking=True), None
            arrived = back.record_event()
        for e in entries:
            e.arrived = arrived

    def _unpack(self, handle):
        if not isinstance(handle, _Handle):
            return handle
        entry = handle.entry
        if entry.gpu is None:  # no backward hook fetched it ahead (a backward not through the layer's output)
            self._fetch(handle.layer)
        if entry.arrived is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(entry.arrived)
            entry.gpu.record_stream(current)  # allocated on the copy stream, read on this one
        return entry.gpu.as_strided(handle.size, handle.stride)


def _dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill one span of memory without gaps (contiguous, or a permutation of contiguous
    dimensions): the span is copied as it lies."""
    if t.is_contiguous():
        return True
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True) if n > 1)
    return all(s > 0 for s in t.stride()) and span == t.numel()


def _span(t: torch.Tensor) -> torch.Tensor:
    """The memory `t` covers, as a flat tensor in storage order (no copy)."""
    return t.detach().as_strided((t.numel(),), (1,))


def pinning_seconds(model: torch.nn.Module) -> float:
    """The seconds `model`'s latest training pass waited for CPU memory to be pinned for its offloaded tensors (0
    where nothing offloads). Torch's pinned-memory allocator keeps what it pinned for the tensors of later passes of
    the same sizes, so only a pass that is the first of its sizes waits; training waits in its first step only. The
    memory plan leaves out of a pass's time what this wait cost the GPU (`pinning_idle_seconds`), to time what
    training will see."""
    offload = _offloading(model)
    return offload.pinning if offload is not None else 0.0


def pinning_idle_seconds(model: torch.nn.Module) -> float:
    """The seconds the GPU sat idle in `model`'s latest training pass because the CPU was pinning memory for
    offloaded tensors (read after the pass, once the GPU is done): the part of `pinning_seconds` that the pass lost.
    While the CPU pins, the GPU goes on with the work queued before, so subtracting all of the CPU's wait from a
    pass's time would make it look faster than training will be; the time between an event recorded on the
    computing stream before the wait and one recorded after it is what the GPU spent with nothing to do (nothing
    else is queued on that stream in between: none when the queue outlasted the wait). 0 on a device without CUDA."""
    offload = _offloading(model)
    if offload is None:
        return 0.0
    return sum(waiting.elapsed_time(resumed) for waiting, resumed in offload.stalls) / 1000


def _offloading(model: torch.nn.Module) -> ActivationOffload | None:
    """`model`'s offloader where some layer offloads (its latest pass's counts are of this layout), else None."""
    offload = getattr(model, "_activation_offload", None)
    return offload if offload is not None and offload.offloaded() else None


def register_pinned_pages(environ=os.environ) -> str | None:
    """Have torch's pinned-memory allocator register pages (`PINNING`) from here on, unless PYTORCH_CUDA_ALLOC_CONF
    (or PYTORCH_ALLOC_CONF) says how to pin; the other settings given there are passed again, as setting them at run
    time resets those not named. Returns the settings applied (None: left as they were). Where torch cannot (an
    older or newer allocator), the default pinning stays: slower to start, the same training."""
    given = environ.get("PYTORCH_CUDA_ALLOC_CONF") or environ.get("PYTORCH_ALLOC_CONF") or ""
    if "pinned_" in given:
        return None
    settings = ",".join(part for part in (given.strip(","), PINNING) if part)
    try:
        torch.cuda.memory._set_allocator_settings(settings)
    except (AttributeError, RuntimeError):
        return None
    return settings
