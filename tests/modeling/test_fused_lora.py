"""The fused LoRA forward (`modeling/fused_lora.py`) computes what peft's forward computes: outputs, gradients and
dropout masks, on plain and 4-bit bases, and gives way to peft's forward where it does not apply."""

import pytest
import torch
from conftest import adapted, make_module

from lit_mistral.modeling.fused_lora import use_fused_lora

IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4], [2, 8, 6, 1, 3, 3, 12, 5]])


def logits_and_grads(module, fused: bool, dropout_seed: int | None = None, autocast: bool = False,
                     regenerate: bool = False, shared: bool = False, keep_dequantized: bool = False):
    for layer in module.model.modules():
        if "_peft_forward" in layer.__dict__ and not fused:
            layer.forward = layer._peft_forward
            del layer._peft_forward
    if fused:
        assert use_fused_lora(module.model, regenerate, shared, keep_dequantized=keep_dequantized) > 0
    module.model.zero_grad()
    if dropout_seed is not None:
        module.model.train()
        torch.manual_seed(dropout_seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = module.model(input_ids=IDS).logits.float()
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_same_outputs_gradients_and_dropout_as_peft(tiny_model_dir, quantize, dropout):
    """float32: the same logits and adapter gradients; with dropout in train mode, the same masks (same seed)."""
    settings = {"quantization": {"method": quantize}, "lora": {"dropout": dropout, "target_modules": [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]}}
    ours = logits_and_grads(adapted(tiny_model_dir, **settings), True, 7 if dropout else None)
    theirs = logits_and_grads(adapted(tiny_model_dir, compute={"dtype": "float32", "gradient_checkpointing": False,
                                                                "fused_lora": False}, **settings),
                              False, 7 if dropout else None)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    assert set(ours[1]) == set(theirs[1]) and len(ours[1]) == 7 * 2 * 2 + 2  # A, B of 7 projections x 2 layers; head
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], rtol=1e-4, atol=1e-6)


def test_under_bf16_autocast_within_bf16_rounding(tiny_model_dir):
    """Under bf16 autocast (Lightning's bf16-mixed) peft rounds the adapter output, its scaled copy and the sum to
    bf16 separately; the fused forward rounds once: the same within bf16 rounding."""
    settings = {"quantization": {"method": "nf4"}}
    ours = logits_and_grads(adapted(tiny_model_dir, **settings), True, autocast=True)
    theirs = logits_and_grads(adapted(tiny_model_dir, compute={"dtype": "float32", "gradient_checkpointing": False,
                                                                "fused_lora": False}, **settings), False, autocast=True)
    torch.testing.assert_close(ours[0], theirs[0], rtol=2e-2, atol=2e-2)
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], rtol=5e-2, atol=1e-4)


def test_a_4bit_weight_that_lost_its_quant_state_gets_it_back(tiny_model_dir):
    """FSDP's flat parameters hand the 4-bit layers a weight without its quantization state; bitsandbytes' forward
    puts it back from the layer before using it, and so does the fused forward (it dequantizes the weight itself):
    the same output as before."""
    module = adapted(tiny_model_dir, quantization={"method": "nf4"}, lora={"dropout": 0.0})
    module.model.train()
    x = torch.randn(1, 5, module.model.config.hidden_size)
    layer = module.model.get_base_model().model.layers[0].self_attn.q_proj
    expected = layer(x)
    base = layer.get_base_layer()
    base.weight = torch.nn.Parameter(base.weight.data, requires_grad=False)  # as FSDP leaves it: a plain tensor
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_gives_way_to_peft_where_it_does_not_apply(tiny_model_dir):
    """Adapters disabled, two active adapters, merged weights: peft's own forward answers, and the fused forward
    is back in use once they are over."""
    module = adapted(tiny_model_dir)
    calls = []
    layer = module.model.get_base_model().model.layers[0].self_attn.q_proj
    peft_forward = layer._peft_forward
    layer._peft_forward = lambda *a, **k: calls.append(1) or peft_forward(*a, **k)
    with torch.no_grad():
        module.model(input_ids=IDS)
        assert calls == []
        with module.model.disable_adapter():
            module.model(input_ids=IDS)
        assert calls == [1]
        layer.active_adapters.append("default")  # a second active adapter (the same one twice)
        module.model(input_ids=IDS)
        assert calls == [1, 1]
        layer.active_adapters.pop()


def test_fit_losses_equal_peft_forward(tiny_model_dir, demo_file, tmp_path):
    """A few training steps on the real NF4 + paged AdamW path (float32 on the CPU): the same losses either way, and
    with the dropout masks drawn again in backward."""
    from conftest import trainer
    from lightning.pytorch import Callback, seed_everything

    from lit_mistral.data.datamodule import InstructionDataModule

    class Losses(Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(outputs["loss"]))

    losses = {}
    for fused, masks in ((True, "keep"), (True, "regenerate"), (False, "keep")):
        seed_everything(0)
        module = make_module(tiny_model_dir, lora={"dropout": 0.1},
                             compute={"fused_lora": fused, "gradient_checkpointing": False, "dropout_masks": masks})
        dm = InstructionDataModule(path=str(demo_file), tokenizer=str(tiny_model_dir), max_length=256, batch_size=4,
                                   train_records=(0, 16), val_records=(16, 20))
        seen = Losses()
        trainer(tmp_path / f"{fused}-{masks}", max_steps=4, limit_val_batches=0, callbacks=[seen]).fit(module, dm)
        losses[fused, masks] = seen.values
    assert len(losses[True, "keep"]) == 4
    assert losses[True, "keep"] == pytest.approx(losses[False, "keep"], rel=1e-5)
    assert losses[True, "regenerate"] == losses[True, "keep"]


def set_dropout_masks(module, regenerate: bool):
    for layer in module.model.modules():
        if "_regenerate_dropout" in layer.__dict__:
            layer._regenerate_dropout = regenerate


@pytest.mark.parametrize(("quantize", "autocast", "checkpointing"),
                         [(None, False, False), ("nf4", False, True), ("nf4", True, False)])
def test_regenerated_dropout_masks_train_as_kept_ones(tiny_model_dir, quantize, autocast, checkpointing):
    """`dropout_masks: regenerate` draws in backward the masks the forward drew: the same logits and adapter
    gradients as keeping them (float32, NF4, bf16 autocast, inside recomputed layers)."""
    from lit_mistral.modeling.build import set_checkpointing

    results = []
    for regenerate in (False, True):
        module = adapted(tiny_model_dir, quantization={"method": quantize}, lora={"dropout": 0.3})
        if checkpointing:
            set_checkpointing(module.model, None)
        results.append(logits_and_grads(module, True, dropout_seed=3, autocast=autocast, regenerate=regenerate))
    (kept_logits, kept), (regen_logits, regen) = results
    torch.testing.assert_close(regen_logits, kept_logits, rtol=0, atol=0)
    assert set(regen) == set(kept) and len(kept) == 7 * 2 * 2  # A and B of 7 projections x 2 layers
    for name in kept:
        torch.testing.assert_close(regen[name], kept[name], rtol=1e-6, atol=1e-7)
    nonzero = [name for name in kept if "lora_A" in name and kept[name].abs().sum() > 0]
    assert len(nonzero) == 14  # the A gradients depend on the masks: the comparison is not of zeros


def saved_bytes(module, regenerate: bool, rows: int | None = None) -> int:
    """Bytes autograd keeps for backward in one training forward (each storage once); with `rows`, of the 2-D
    tensors of that many rows only (the flattened activations)."""
    set_dropout_masks(module, regenerate)
    module.model.train()
    storages = {}

    def pack(t):
        if rows is None or (t.dim() == 2 and t.shape[0] == rows and t.shape[1] > 32):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module.model(input_ids=IDS).logits.sum()
    return sum(storages.values())


def test_regenerated_dropout_masks_keep_less_for_backward(tiny_model_dir):
    """Per adapter, autograd's dropout keeps its output and mask (of the adapter's input size); regenerating keeps the
    shared input once: less kept by at least the masks and outputs of the adapters that share an input."""
    module = adapted(tiny_model_dir, lora={"dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj"]})
    kept, regenerated = saved_bytes(module, False), saved_bytes(module, True)
    tokens, hidden = IDS.numel(), module.model.config.hidden_size
    layers = module.model.config.num_hidden_layers
    # keep: 3 outputs (float32) + 3 masks (bool) per layer; regenerate: the normed input once (float32)
    assert kept - regenerated >= layers * tokens * hidden * (3 * 4 + 3 * 1 - 4)


def test_keeps_no_more_for_backward_than_peft(tiny_model_dir):
    """The one-function layer keeps what autograd would through peft's forward (dropout output and mask, the
    rank-r intermediate), less what peft adds: the base output's copy. Fails if it kept, say, the input as well."""
    settings = {"lora": {"dropout": 0.1}}
    ours = saved_bytes(adapted(tiny_model_dir, **settings), False)
    peft = adapted(tiny_model_dir, compute={"dtype": "float32", "gradient_checkpointing": False, "fused_lora": False},
                   **settings)
    assert ours <= saved_bytes(peft, False)


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class SharedDropout(torch.nn.Module):
    """peft's dropout, one mask per input tensor: the layers after the first that drop the same tensor get the first's
    output (the reference for `shared_dropout`)."""

    def __init__(self, p: float, seen: dict) -> None:
        super().__init__()
        self.p, self.seen = p, seen

    def forward(self, x):
        if self.seen.get("input") is not x:
            self.seen.update(input=x, output=torch.nn.functional.dropout(x, self.p, self.training))
        return self.seen["output"]


def one_mask_per_input(module, p: float) -> None:
    """Give peft's q/k/v and gate/up of each block one dropout mask per input (`SharedDropout`)."""
    for block in module.model.modules():
        children = dict(block.named_children())
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            seen = {}
            for name in names:
                if name in children and hasattr(children[name], "lora_dropout"):
                    children[name].lora_dropout["default"] = SharedDropout(p, seen)


@pytest.mark.parametrize(("quantize", "dropout", "autocast"),
                         [(None, 0.3, False), ("nf4", 0.3, False), ("nf4", 0.0, False), ("nf4", 0.3, True)])
def test_shared_dropout_is_one_mask_per_input(tiny_model_dir, quantize, dropout, autocast):
    """`shared_dropout`: q/k/v and gate/up as one function each give what peft gives with one dropout mask per
    input: the same logits and adapter gradients (float32; under bf16 autocast within bf16 rounding); without
    dropout, what peft gives."""
    settings = {"quantization": {"method": quantize}, "lora": {"dropout": dropout, "target_modules": ALL}}
    module = adapted(tiny_model_dir, **settings)
    ours = logits_and_grads(module, True, dropout_seed=5, autocast=autocast, shared=True)
    groups = {id(m._lora_group) for m in module.model.modules() if m.__dict__.get("_lora_group") is not None}
    assert len(groups) == 2 * 2  # q/k/v and gate/up of 2 blocks
    reference = adapted(tiny_model_dir, compute={"dtype": "float32", "gradient_checkpointing": False,
                                                 "fused_lora": False}, **settings)
    one_mask_per_input(reference, dropout)
    theirs = logits_and_grads(reference, False, dropout_seed=5, autocast=autocast)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(ours[0], theirs[0], **tol)
    assert set(ours[1]) == set(theirs[1]) and len(ours[1]) == 7 * 2 * 2
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], **(
            {"rtol": 5e-2, "atol": 1e-4} if autocast else {"rtol": 1e-4, "atol": 1e-6}))
    if dropout:  # the masks matter here: one mask per adapter (peft's) gives other gradients
        independent = logits_and_grads(adapted(tiny_model_dir, **settings), True, dropout_seed=5, autocast=autocast)
        assert not torch.allclose(independent[1][next(n for n in ours[1] if "k_proj.lora_A" in n)],
                                  ours[1][next(n for n in ours[1] if "k_proj.lora_A" in n)])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_dropout_masks_drawn_again_and_recomputed(tiny_model_dir, checkpointing):
    """Shared masks drawn again in backward (`dropout_masks: regenerate`), and inside recomputed layers: the same
    logits and gradients as kept ones; every member takes the output its group computed for it (nothing held after
    the forward), and outside training each layer runs alone."""
    from lit_mistral.modeling.build import set_checkpointing

    results = []
    for regenerate in (False, True):
        module = adapted(tiny_model_dir, quantization={"method": "nf4"}, lora={"dropout": 0.3})
        if checkpointing:
            set_checkpointing(module.model, None)
        results.append(logits_and_grads(module, True, dropout_seed=3, regenerate=regenerate, shared=True))
        groups = [m._lora_group for m in module.model.modules() if m.__dict__.get("_lora_group") is not None]
        assert groups and all(g.input is None and not g.pending for g in groups)
        module.model.eval()
        with torch.no_grad():
            module.model(input_ids=IDS)
        assert all(g.input is None for g in groups)
    (kept_logits, kept), (regen_logits, regen) = results
    torch.testing.assert_close(regen_logits, kept_logits, rtol=0, atol=0)
    for name in kept:
        torch.testing.assert_close(regen[name], kept[name], rtol=1e-6, atol=1e-7)
    if checkpointing:
        plain = logits_and_grads(adapted(tiny_model_dir, quantization={"method": "nf4"}, lora={"dropout": 0.3}), True,
                                 dropout_seed=3, shared=True)
        for name in kept:
            torch.testing.assert_close(plain[1][name], kept[name], rtol=1e-5, atol=1e-7)


def test_a_group_drops_outputs_no_member_took_before_computing_again(tiny_model_dir, monkeypatch):
    """A forward cut short (an out-of-memory error in autofit's probes, say) leaves outputs for members never called;
    the group's next computation lets them go first, so they never add to its peak."""
    import weakref

    from lit_mistral.modeling import fused_lora

    module = adapted(tiny_model_dir, lora={"dropout": 0.1, "target_modules": ALL})
    use_fused_lora(module.model, shared_dropout=True)
    module.model.train()
    attention = module.model.get_base_model().model.layers[0].self_attn
    hidden = module.model.config.hidden_size
    attention.q_proj(torch.randn(1, 4, hidden))  # k and v never called
    stale = weakref.ref(attention.q_proj._lora_group.pending[id(attention.k_proj)])
    freed, apply = [], fused_lora._LoRALinear.apply
    monkeypatch.setattr(fused_lora._LoRALinear, "apply", lambda *args: (freed.append(stale() is None), apply(*args))[1])
    attention.q_proj(torch.randn(1, 4, hidden))
    assert freed == [True]


def test_shared_dropout_keeps_less_for_backward(tiny_model_dir):
    """One dropout output and mask per shared input instead of one per adapter: of the (tokens x features) tensors
    kept for backward, two of each fewer for q/k/v and one for gate/up, per block. (The stacked A matrices it keeps
    too are of the rank's size, not the tokens'.)"""
    module = adapted(tiny_model_dir, lora={"dropout": 0.1, "target_modules": ALL, "r": 4})  # no A stack of 16 rows
    tokens, hidden = IDS.numel(), module.model.config.hidden_size
    use_fused_lora(module.model)
    per_adapter = saved_bytes(module, False, rows=tokens)
    use_fused_lora(module.model, shared_dropout=True)
    shared = saved_bytes(module, False, rows=tokens)
    layers = module.model.config.num_hidden_layers
    assert per_adapter - shared == layers * tokens * hidden * 3 * (4 + 1)  # float32 outputs, bool masks


def test_shared_dropout_option_reaches_the_model(tiny_model_dir):
    """`--model.compute.shared_dropout true` groups the layers; it needs `fused_lora`."""
    from lit_mistral.config import Compute

    module = adapted(tiny_model_dir, lora={"dropout": 0.1},
                     compute={"dtype": "float32", "gradient_checkpointing": False, "shared_dropout": True})
    attention = module.model.get_base_model().model.layers[1].self_attn
    assert attention.q_proj._lora_group is attention.v_proj._lora_group is not None
    assert attention.o_proj._lora_group is None
    assert any("shared_dropout" in p for p in Compute(shared_dropout=True, fused_lora=False).problems(True))


def bf16_pass(module, device: str = "cuda") -> tuple:
    """One training forward and backward of `module`'s model under bf16 autocast on `device`, dropout seeded:
    (logits, the gradients by name)."""
    module.model.zero_grad()
    module.model.train()
    torch.manual_seed(3)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = module.model(input_ids=IDS.to(device)).logits.float()
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


@pytest.mark.gpu
def test_regenerated_dropout_masks_on_a_gpu(tiny_model_dir):
    """CUDA's dropout (its own generator, fused kernel) drawn again in backward under bf16 autocast: the same
    logits and gradients as keeping the masks."""
    results = []
    for regenerate in (False, True):
        module = adapted(tiny_model_dir, device="cuda", quantization={"method": "nf4"}, lora={"dropout": 0.3},
                         compute={"dtype": "bfloat16", "gradient_checkpointing": False})
        use_fused_lora(module.model, regenerate)
        results.append(bf16_pass(module))
    (kept_logits, kept), (regen_logits, regen) = results
    torch.testing.assert_close(regen_logits, kept_logits, rtol=0, atol=0)
    assert set(regen) == set(kept) and len(kept) == 28
    for name in kept:
        torch.testing.assert_close(regen[name], kept[name], rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
def test_shared_dropout_on_a_gpu(tiny_model_dir):
    """CUDA's dropout, one mask per shared input, NF4 under bf16 autocast: the logits and gradients of peft's forward
    with one mask per input, within bf16 rounding."""
    results = []
    for shared in (True, False):
        module = adapted(tiny_model_dir, device="cuda", quantization={"method": "nf4"},
                         lora={"dropout": 0.3, "target_modules": ALL},
                         compute={"dtype": "bfloat16", "gradient_checkpointing": False, "fused_lora": shared})
        if shared:
            use_fused_lora(module.model, shared_dropout=True)
        else:
            one_mask_per_input(module, 0.3)
        results.append(bf16_pass(module))
    (ours_logits, ours), (ref_logits, ref) = results
    torch.testing.assert_close(ours_logits, ref_logits, rtol=2e-2, atol=2e-2)
    assert set(ours) == set(ref) and len(ref) == 28
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=5e-2, atol=1e-4)


@pytest.mark.parametrize("shared", [False, True])
def test_kept_dequantized_weights_train_alike_dequantized_once(tiny_model_dir, monkeypatch, shared):
    """`keep_dequantized` on a 4-bit base: the same logits and gradients (float32, dropout on), each 4-bit weight
    dequantized once per step instead of twice, and what backward keeps grows by the 16-bit weights."""
    from lit_mistral.modeling import fused_lora

    calls = []
    dequantize = fused_lora._dequantized
    monkeypatch.setattr(fused_lora, "_dequantized", lambda *args: calls.append(1) or dequantize(*args))
    settings = {"quantization": {"method": "nf4"}, "lora": {"dropout": 0.3}}
    results = []
    for keep in (False, True):
        module = adapted(tiny_model_dir, **settings)
        calls.clear()
        logits, grads = logits_and_grads(module, True, 7, shared=shared, keep_dequantized=keep)
        results.append((logits, grads, len(calls), saved_bytes(module, False)))
    (logits, grads, dequantized, kept), (logits_k, grads_k, dequantized_k, kept_k) = results
    torch.testing.assert_close(logits_k, logits, rtol=0, atol=0)
    assert set(grads_k) == set(grads)
    for name in grads:
        torch.testing.assert_close(grads_k[name], grads[name], rtol=0, atol=0)
    # 7 projections x 2 layers in forward; in backward where the input's gradient is needed (not the first q/k/v,
    # on the frozen embeddings), without keeping only
    assert (dequantized, dequantized_k) == (14 + 11, 14)
    c = module.model.config
    qkv = c.hidden_size * (c.hidden_size + 2 * c.num_key_value_heads * c.head_dim)
    weights = c.num_hidden_layers * (qkv + c.hidden_size * (c.hidden_size + 3 * c.intermediate_size)) - qkv
    assert kept_k - kept == weights * 4  # float32 here (bf16 under autocast); not the first q/k/v's


def test_kept_dequantized_weights_need_the_fused_layers_and_no_offload():
    from lit_mistral.config import Compute

    assert Compute(keep_dequantized=True).problems(True) == []
    for bad in (Compute(keep_dequantized=True, fused_lora=False), Compute(keep_dequantized=True, offload_layers=2)):
        assert any("keep_dequantized" in p for p in bad.problems(True))
