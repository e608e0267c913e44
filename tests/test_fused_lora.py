"""The fused LoRA forward (`modeling/fused_lora.py`) computes what peft's forward computes: outputs, gradients and
dropout masks, on plain and 4-bit bases, and gives way to peft's forward where it does not apply."""

import pytest
import torch
from conftest import adapted, make_module

from lit_mistral.modeling.fused_lora import use_fused_lora

IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4], [2, 8, 6, 1, 3, 3, 12, 5]])


def logits_and_grads(module, fused: bool, dropout_seed: int | None = None, autocast: bool = False,
                     regenerate: bool = False):
    for layer in module.model.modules():
        if "_peft_forward" in layer.__dict__ and not fused:
            layer.forward = layer._peft_forward
            del layer._peft_forward
    if fused:
        assert use_fused_lora(module.model, regenerate) > 0
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


def saved_bytes(module, regenerate: bool) -> int:
    """Bytes autograd keeps for backward in one training forward (each storage once)."""
    set_dropout_masks(module, regenerate)
    module.model.train()
    storages = {}

    def pack(t):
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


@pytest.mark.gpu
def test_regenerated_dropout_masks_on_a_gpu(tiny_model_dir):
    """CUDA's dropout (its own generator, fused kernel) drawn again in backward under bf16 autocast: the same
    logits and gradients as keeping the masks."""
    results = []
    for regenerate in (False, True):
        module = adapted(tiny_model_dir, device="cuda", quantization={"method": "nf4"}, lora={"dropout": 0.3},
                         compute={"dtype": "bfloat16", "gradient_checkpointing": False})
        module.model.zero_grad()
        use_fused_lora(module.model, regenerate)
        module.model.train()
        torch.manual_seed(3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = module.model(input_ids=IDS.cuda()).logits.float()
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters()
                                          if p.grad is not None}))
    (kept_logits, kept), (regen_logits, regen) = results
    torch.testing.assert_close(regen_logits, kept_logits, rtol=0, atol=0)
    assert set(regen) == set(kept) and len(kept) == 28
    for name in kept:
        torch.testing.assert_close(regen[name], kept[name], rtol=1e-3, atol=1e-6)
