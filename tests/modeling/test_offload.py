"""`compute.offload_layers`: decoder layers that keep their activations in CPU memory. Where the layers go
(recompute, offload, keep), the same loss and gradients as keeping everything on the device (on the CPU the copies
are in the same memory: the bookkeeping is what is tested; on a GPU the streams and pinned copies too), views that
come back with their strides, and the settings' checks."""

import pytest
import torch

from lit_mistral.config import Compute
from lit_mistral.modeling import offload as offload_module
from lit_mistral.modeling.build import checkpointable_layers, set_checkpointing
from tests.conftest import make_module


def tiny_mistral(layers: int = 6, hidden: int = 64, device: str = "cpu"):
    """A random Mistral with only the down projections training (a gradient per layer to compare)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=100, use_cache=False)
    model = MistralForCausalLM(config).to(device).train()
    for name, p in model.named_parameters():
        p.requires_grad_("down_proj" in name)
    return model


def loss_and_grads(model, ids, layers, offload, inputs=False):
    set_checkpointing(model, layers, offload, inputs)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [b.mlp.down_proj.weight.grad.clone() for b in checkpointable_layers(model)]


def layout(model) -> str:
    """Each layer as r (recomputes), o (offloads) or k (keeps on the device)."""
    return "".join("o" if getattr(b, "offload_activations", False) else "r" if b.gradient_checkpointing else "k"
                   for b in checkpointable_layers(model))


@pytest.fixture
def copies(monkeypatch) -> list[int]:
    """The sizes of the spans copied out, every tensor counted however small (the tiny model's are)."""
    monkeypatch.setattr(offload_module, "MIN_BYTES", 1)
    seen = []
    copy_out = offload_module.ActivationOffload._copy_out
    monkeypatch.setattr(offload_module.ActivationOffload, "_copy_out",
                        lambda self, span: seen.append(span.numel()) or copy_out(self, span))
    return seen


def test_layers_are_spread_and_the_gradients_are_the_same(copies):
    """Offloaded layers spread among the recomputing ones, the last layers keeping theirs; every layout gives the
    loss and gradients of keeping all activations (the copies made, and let go after backward)."""
    model = tiny_mistral()
    ids = torch.randint(0, 100, (2, 16))
    ref_loss, ref_grads = loss_and_grads(model, ids, 0, 0)
    for layers, offload, expected in [(None, 0, "rrrrrr"), (0, 6, "oooooo"), (2, 3, "oorork"), (None, 2, "orrorr"),
                                      (3, 1, "orrrkk"), (0, 2, "ookkkk"), (None, 0, "rrrrrr")]:
        copies.clear()
        loss, grads = loss_and_grads(model, ids, layers, offload)
        assert layout(model) == expected
        assert bool(copies) == (offload > 0)
        assert torch.equal(loss, ref_loss)
        for got, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
        assert getattr(model, "_activation_offload", None) is None or model._activation_offload.passes == {}


def test_recomputing_layers_inputs_go_to_the_cpu_and_the_gradients_are_the_same(copies):
    """`offload_inputs`: what each recomputing layer's checkpoint saves, its input (2 x 16 tokens x 64 here), is
    copied out once per layer, beside layers that offload or keep their activations; the loss and gradients are
    those of keeping everything, and nothing is left over after backward. Off again, no copies."""
    model = tiny_mistral()
    ids = torch.randint(0, 100, (2, 16))
    ref_loss, ref_grads = loss_and_grads(model, ids, 0, 0)
    for layers, offload, inputs, expected_inputs in [(None, 0, True, 6), (4, 0, True, 4), (2, 3, True, 2),
                                                     (None, 0, False, 0)]:
        copies.clear()
        loss_and_grads(model, ids, layers, offload, False)
        without = copies.count(2 * 16 * 64)  # the offloaded layers' tensors of that size
        copies.clear()
        loss, grads = loss_and_grads(model, ids, layers, offload, inputs)
        flags = [b.offload_inputs for b in checkpointable_layers(model)]
        assert flags == [inputs and b.gradient_checkpointing for b in checkpointable_layers(model)]
        assert copies.count(2 * 16 * 64) - without == expected_inputs
        assert torch.equal(loss, ref_loss)
        for got, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
        assert model._activation_offload.passes == {} and model._activation_offload.contexts == {}
    with torch.no_grad():  # no backward: nothing is copied
        copies.clear()
        set_checkpointing(model, None, 0, True)
        model(input_ids=ids)
    assert copies == []


def test_views_come_back_with_their_strides_and_gapped_ones_stay(monkeypatch):
    """A transposed (dense) tensor is copied as it lies and comes back transposed; a slice with gaps is not copied;
    two views of one span share one copy; small tensors stay."""
    monkeypatch.setattr(offload_module, "MIN_BYTES", 64)
    seen = []

    class Save(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            wide = x @ x.T  # (n, n)
            ctx.save_for_backward(wide.T, wide[:, ::2], wide.reshape(-1), wide, x[:1, :1])
            return wide.sum(dim=1)

        @staticmethod
        def backward(ctx, grad):
            transposed, gapped, flat, wide, small = ctx.saved_tensors
            seen.extend([transposed, gapped, flat, wide, small])
            return grad[:, None].expand_as(wide).clone()

    class DecoderLayer(torch.nn.Module):
        gradient_checkpointing = False

        def forward(self, x):
            return Save.apply(x)

    layer = DecoderLayer()
    model = torch.nn.Sequential(layer)
    copies = []
    copy_out = offload_module.ActivationOffload._copy_out
    monkeypatch.setattr(offload_module.ActivationOffload, "_copy_out",
                        lambda self, span: copies.append(span.numel()) or copy_out(self, span))
    offload = offload_module.ActivationOffload.install(model, [layer])
    layer.offload_activations = True
    x = torch.randn(8, 8, requires_grad=True)
    model(x).sum().backward()
    transposed, gapped, flat, wide, small = seen
    expected = x.detach() @ x.detach().T
    assert torch.equal(transposed, expected.T) and transposed.stride() == (1, 8)
    assert torch.equal(gapped, expected[:, ::2]) and torch.equal(flat, expected.reshape(-1))
    assert torch.equal(wide, expected) and small.shape == (1, 1)
    assert copies == [64]  # wide, its transpose and its reshape: one span, one copy; the slice with gaps stays
    assert offload.passes == {}


def test_a_module_built_with_offloading(tiny_model_dir, monkeypatch):
    """Through the QLoRA build (4-bit base, fused LoRA, dropout): the flags, and the loss and the adapters'
    gradients of the same pass with every layer keeping its activations."""
    monkeypatch.setattr(offload_module, "MIN_BYTES", 1)

    def run(offload):
        torch.manual_seed(0)  # the same adapters
        module = make_module(tiny_model_dir, compute={"dtype": "float32", "checkpoint_layers": 0,
                                                      "offload_layers": offload}).build(torch.device("cpu"))
        with torch.no_grad():  # B nonzero: gradients reach A and the layers' inputs through the adapters
            for name, p in module.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        ids = torch.randint(5, 50, (2, 24), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        loss = module.model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}
        return module, loss.detach(), grads

    module, loss, grads = run(1)
    assert layout(module.model) == "ok"
    _, ref_loss, ref_grads = run(0)
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    assert all(grad.abs().sum() > 0 for grad in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=0, msg=name)


def test_the_settings_are_checked():
    assert "offload_layers=2: needs model.compute.gradient_checkpointing true or auto" in Compute(
        gradient_checkpointing=False, offload_layers=2).problems(True)[0]
    assert "a count >= 0" in Compute(offload_layers=-1).problems(True)[0]
    assert Compute(checkpoint_layers="auto", offload_layers=8, memory_budget_gib=16).problems(True) == []
    assert Compute(offload_layers=4).regenerate_dropout()  # layers keep activations: the masks are drawn again


@pytest.mark.gpu
def test_offloading_on_a_gpu():
    """On CUDA: pinned copies on side streams, the same gradients as keeping the activations (float32), less peak
    memory than keeping them, and the wait for pinned memory counted (`pinning_seconds`), in the first pass of its
    sizes only."""
    device = "cuda"
    model = tiny_mistral(layers=8, hidden=512, device=device)
    ids = torch.randint(0, 100, (4, 1024), device=device)

    def peak(layers, offload):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = loss_and_grads(model, ids, layers, offload)
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before

    (ref_loss, ref_grads), kept = peak(0, 0)
    assert offload_module.pinning_seconds(model) == 0  # nothing offloads
    (loss, grads), offloaded = peak(0, 6)
    first, idle = offload_module.pinning_seconds(model), offload_module.pinning_idle_seconds(model)
    assert 0 <= idle <= first  # the GPU idles for at most the CPU's wait
    peak(0, 6)  # the same sizes again: torch's pinned-memory allocator hands back what it pinned
    assert 0 < offload_module.pinning_seconds(model) < first
    assert offload_module.pinning_idle_seconds(model) <= idle
    assert layout(model) == "ooooookk"
    assert model._activation_offload.streams is not None and model._activation_offload.passes == {}
    assert torch.equal(loss, ref_loss)
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert offloaded < 0.6 * kept, (offloaded, kept)


def test_the_gpu_idle_while_pinning_is_read_from_events_around_each_wait():
    """What the plan leaves out of a pass's time is the GPU's idle time while the CPU pinned (the milliseconds
    between the events recorded before and after each wait that pinned new pages), not the CPU's whole wait: the GPU
    works through what was queued meanwhile. Nothing offloading: 0."""
    class Event:
        def __init__(self, ms: float) -> None:
            self.ms = ms

        def elapsed_time(self, other: "Event") -> float:
            return other.ms - self.ms

    model = tiny_mistral(layers=4)
    set_checkpointing(model, 2, 2)
    offload = model._activation_offload
    offload.pinning, offload.stalls = 0.5, [(Event(0.0), Event(30.0)), (Event(100.0), Event(100.0))]
    assert offload_module.pinning_seconds(model) == 0.5
    assert offload_module.pinning_idle_seconds(model) == pytest.approx(0.03)
    set_checkpointing(model, 4, 0)
    assert offload_module.pinning_idle_seconds(model) == 0.0


@pytest.mark.gpu
def test_recomputing_layers_inputs_on_a_gpu():
    """On CUDA: every layer recomputing with its input in pinned CPU memory gives the gradients of keeping
    everything (float32) and takes less memory than recomputing with the inputs on the GPU."""
    device = "cuda"
    model = tiny_mistral(layers=8, hidden=512, device=device)
    ids = torch.randint(0, 100, (4, 1024), device=device)

    def peak(inputs):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = loss_and_grads(model, ids, None, 0, inputs)
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before

    (ref_loss, ref_grads), on_gpu = peak(False)
    (loss, grads), on_cpu = peak(True)
    assert model._activation_offload.bytes_out == 8 * 4 * 1024 * 512 * 4  # each layer's float32 input
    assert torch.equal(loss, ref_loss)
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # at least one layer's input less at the peak: with the inputs on the GPU the peak is the last layer's backward
    # (every input still held); with them in CPU memory it moves to a lower layer's, where the inputs fetched ahead
    # (`offload.AHEAD`) and the gradients made so far add up (as the CPU's allocations show when profiled)
    assert on_cpu < on_gpu - 4 * 1024 * 512 * 4, (on_cpu, on_gpu)


def test_each_offloaded_layer_comes_back_just_ahead_of_its_backward(monkeypatch):
    """An offloaded layer is fetched when backward reaches the layer `AHEAD` above it (or earlier layers' topmost
    ones at once): not all of them at the start of backward, which would bring every activation back at once."""
    monkeypatch.setattr(offload_module, "MIN_BYTES", 1)
    events = []
    reached, fetch = offload_module.ActivationOffload._backward_reached, offload_module.ActivationOffload._fetch
    monkeypatch.setattr(offload_module.ActivationOffload, "_backward_reached",
                        lambda self, i, grad: events.append(("reached", i)) or reached(self, i, grad))
    monkeypatch.setattr(offload_module.ActivationOffload, "_fetch",
                        lambda self, i: (events.append(("fetch", i)) if i in self.passes else None) or fetch(self, i))
    model = tiny_mistral(layers=8)
    ids = torch.randint(0, 100, (2, 16))
    loss_and_grads(model, ids, 4, 3)
    assert layout(model) == "orororrk"
    fetched, at = {}, None
    for kind, i in events:
        if kind == "reached":
            at = i
        else:
            fetched[i] = at
    assert fetched == {4: 6, 2: 4, 0: 2}  # each when backward reached the layer AHEAD above it


def test_pinned_memory_is_registered_unless_the_user_says_how_to_pin(monkeypatch):
    """The offloaded activations' CPU memory is pinned by registering pages; the user's allocator settings are passed
    again beside it, and a pinning setting of theirs wins."""
    applied = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", applied.append)
    pinning = offload_module.PINNING
    assert offload_module.register_pinned_pages({}) == pinning
    assert offload_module.register_pinned_pages({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}) \
        == f"expandable_segments:True,{pinning}"
    assert offload_module.register_pinned_pages({"PYTORCH_ALLOC_CONF": "pinned_use_background_threads:True"}) is None
    assert applied == [pinning, f"expandable_segments:True,{pinning}"]

    def refuses(settings):
        raise RuntimeError("unknown setting")
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", refuses)
    assert offload_module.register_pinned_pages({}) is None  # the default pinning stays
