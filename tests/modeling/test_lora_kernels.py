"""LoRA dropout inside the multiply by A (`modeling/lora_kernels.py`, `compute.dropout_kernel`): the kernels give
what torch computes with the same mask, draw it at the asked rate and again from the same generator state, and
the fused layers train through them as through torch's dropout with that mask. On the CPU the kernels run in
Triton's interpreter (float32); on a GPU (bf16) behind the `gpu` marker."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import adapted

from lit_mistral.modeling import lora_kernels
from lit_mistral.modeling.fused_lora import use_fused_lora

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
P = 0.3


def reference(x, a, dh, keep, p):
    """What torch computes with the mask `keep`: (dropout(x) @ a.T, keep * (dh @ a) * s, dh.T @ dropout(x))."""
    scale = lora_kernels.drop_scale(p)
    dropped = torch.where(keep, x.float() * scale, 0.0).to(a.dtype)
    return (dropped.float() @ a.float().t(), torch.where(keep, (dh.float() @ a.float()) * scale, 0.0),
            dh.float().t() @ dropped.float())


def check_kernels(case: dict, p: float, atol: float, rtol: float) -> None:
    x, a, dh, bits = case["x"], case["a"], case["dh"], case["bits"]
    n, k = x.shape
    keep = lora_kernels.unpack(bits, k)
    assert bits.shape == (n, (k + 31) // 32)
    assert not (lora_kernels.unpack(bits, bits.shape[1] * 32)[:, k:]).any()  # no bits past the last feature
    dropped = 1 - keep.float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / keep.numel()) ** 0.5 + 1e-3, dropped
    # no draw shared: the next row's, the next feature's (one Philox call) and the next 128 features' (tile), drops
    # are independent of these
    for a_drop, b_drop in ((~keep[:-1], ~keep[1:]), (~keep[:, :-1], ~keep[:, 1:]), (~keep[:, :-128], ~keep[:, 128:])):
        if a_drop.numel():
            both = (a_drop & b_drop).float().mean().item()
            assert abs(both - p * p) < 4 * (p * p * (1 - p * p) / a_drop.numel()) ** 0.5 + 1e-3, both
    h, gx, ga = reference(x, a, dh, keep, p)
    torch.testing.assert_close(case["h"].float(), h, atol=atol, rtol=rtol)
    torch.testing.assert_close(case["gx"].float(), gx, atol=atol, rtol=rtol)
    torch.testing.assert_close(case["ga"], ga, atol=atol * 10, rtol=rtol)
    assert torch.equal(case["again"], bits)  # the same generator state draws the same mask
    assert not torch.equal(case["next"], bits)  # and the next call another one


def run_kernels(device: str, dtype: torch.dtype, shapes, p: float) -> list[dict]:
    cases = []
    for n, k, r in shapes:
        gen = torch.Generator().manual_seed(n + k + r)
        x = torch.randn(n, k, generator=gen).to(device)
        a = (torch.randn(r, k, generator=gen) * 0.05).to(device, dtype)
        dh = torch.randn(n, r, generator=gen).to(device, dtype)
        state = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()
        h, bits = lora_kernels.dropout_a(x.to(dtype), a, p)
        (torch.cuda.set_rng_state if device == "cuda" else torch.set_rng_state)(state)
        _, again = lora_kernels.dropout_a(x.to(dtype), a, p)
        _, following = lora_kernels.dropout_a(x.to(dtype), a, p)
        cases.append({"x": x.to(dtype), "a": a, "dh": dh, "h": h, "bits": bits, "again": again, "next": following,
                      "gx": lora_kernels.masked_dh_a(dh, a, bits, p),
                      "ga": lora_kernels.dh_t_dropped(dh, x.to(dtype), bits, p)})
    return [{key: v.cpu() for key, v in case.items()} for case in cases]


class TwoProjections(torch.nn.Module):
    """q and k reading one input (a `GROUPS` pair under `shared_dropout`), o on its own."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.q_proj = torch.nn.Linear(width, 32, bias=False)
        self.k_proj = torch.nn.Linear(width, 16, bias=False)
        self.o_proj = torch.nn.Linear(32, width, bias=False)

    def forward(self, x):
        return self.o_proj(self.q_proj(x)) + self.k_proj(x).sum(-1, keepdim=True)


def run_layers(device: str, dtype: torch.dtype, p: float) -> dict:
    """The fused layers with the kernels on: forward and backward of `TwoProjections`, with the kernels' masks."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(TwoProjections(), LoraConfig(r=4, lora_alpha=8, lora_dropout=p, init_lora_weights=False,
                                                         target_modules=["q_proj", "k_proj", "o_proj"])).to(device)
    assert use_fused_lora(model, shared_dropout=True, dropout_kernel=True) == 3
    masks, draw = [], lora_kernels.dropout_a

    def recording(x, a, p):
        h, bits = draw(x, a, p)
        masks.append(bits)
        return h, bits

    lora_kernels.dropout_a = recording
    try:
        model.train()
        x = torch.randn(2, 5, 64, device=device, requires_grad=True)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x).float()
        out.square().sum().backward()
    finally:
        lora_kernels.dropout_a = draw
    state = {n: p.detach().cpu() for n, p in model.named_parameters()}
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    return {"x": x.detach().cpu(), "out": out.detach().cpu(), "x_grad": x.grad.cpu(), "state": state,
            "grads": grads, "masks": [m.cpu() for m in masks]}


def close(ours: torch.Tensor, theirs: torch.Tensor, atol: float, rtol: float, norm: float | None) -> None:
    """Elementwise within atol/rtol; or, with `norm`, within that relative error of the whole (bf16 results, whose
    sums of large terms of both signs leave some small elements without correct digits)."""
    if norm is None:
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol)
    else:
        assert ((ours - theirs).norm() / theirs.norm()).item() < norm


def check_layers(result: dict, p: float, atol: float, rtol: float, norm: float | None = None) -> None:
    """Against plain autograd (float32) with the kernels' masks: one for q/k's shared input, one for o's."""
    assert len(result["masks"]) == 2
    state, x = result["state"], result["x"].requires_grad_()
    scale = lora_kernels.drop_scale(p)
    params = {n: v.clone().requires_grad_(n in result["grads"]) for n, v in state.items()}

    def layer(name, inp, mask):
        w = params[f"base_model.model.{name}.base_layer.weight"]
        a = params[f"base_model.model.{name}.lora_A.default.weight"]
        b = params[f"base_model.model.{name}.lora_B.default.weight"]
        keep = lora_kernels.unpack(mask, inp.shape[-1]).reshape(inp.shape)
        return inp @ w.t() + (torch.where(keep, inp * scale, 0.0) @ a.t() @ b.t()) * 2.0  # alpha / r = 2

    q, k = layer("q_proj", x, result["masks"][0]), layer("k_proj", x, result["masks"][0])
    out = layer("o_proj", q, result["masks"][1]) + k.sum(-1, keepdim=True)
    out.square().sum().backward()
    close(result["out"], out.detach(), atol, rtol, norm)
    close(result["x_grad"], x.grad, atol, rtol, norm)
    assert set(result["grads"]) == {n for n, v in params.items() if v.grad is not None} and len(result["grads"]) == 6
    for name, grad in result["grads"].items():
        close(grad, params[name].grad, atol, rtol, norm)


INTERPRETED = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_lora_kernels import run_kernels, run_layers
from lit_mistral.modeling import lora_kernels
kernels = run_kernels("cpu", torch.float32, [(70, 96, 8), (1100, 200, 24)], 0.3)
lora_kernels.FEATURES_PER_PROGRAM = 256  # the multiply by A summed over 3 programs per row block, the last partial
kernels += run_kernels("cpu", torch.float32, [(90, 600, 8)], 0.3)
tilings = []  # the same generator state: the same mask whatever the tiles
for rows, tile in ((lora_kernels.FORWARD_ROWS, lora_kernels.FORWARD_TILE), (16, 128), (32, 64)):
    lora_kernels.FORWARD_ROWS, lora_kernels.FORWARD_TILE = rows, tile
    torch.manual_seed(5)
    tilings.append(lora_kernels.dropout_a(torch.randn(40, 300), torch.randn(8, 300), 0.3))
torch.save({"kernels": kernels, "tilings": tilings, "layers": run_layers("cpu", torch.float32, 0.3)}, sys.argv[1])
"""


@needs_triton
def test_kernels_equal_torch_with_their_mask_interpreted(tmp_path):
    """Triton's interpreter, float32: ragged shapes (rows and features not multiples of the tiles, features not of
    32, two row splits in A's gradient, three feature splits in the forward's multiply); the forward's tilings draw
    the same mask from the same generator state; the layers (a shared q/k input and a single o) forward and
    backward."""
    # in a fresh process: TRITON_INTERPRET must be set before anything imports triton
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", INTERPRETED, tmp_path / "out.pt", Path(__file__).parent], env=env,
                   check=True, timeout=300)
    out = torch.load(tmp_path / "out.pt")
    for case in out["kernels"]:
        check_kernels(case, P, atol=1e-4, rtol=1e-4)
    (h, bits), *others = out["tilings"]
    for other_h, other_bits in others:
        assert torch.equal(other_bits, bits)
        torch.testing.assert_close(other_h, h, atol=1e-4, rtol=1e-4)
    check_layers(out["layers"], P, atol=1e-4, rtol=1e-4)


def test_probability_and_bits():
    """p rounded to a multiple of 1/65536, the scale from that; bit j of word w is feature 32 w + j."""
    assert lora_kernels.threshold(0.05) == 3277 and lora_kernels.threshold(0.0) == 0
    assert lora_kernels.drop_scale(0.05) == pytest.approx(1 / (1 - 3277 / 65536), rel=1e-12)
    bits = torch.tensor([[1 - 2**31, 4]], dtype=torch.int32)  # bits 0 and 31; bit 2
    assert lora_kernels.unpack(bits, 40).nonzero()[:, 1].tolist() == [0, 31, 34]


def test_off_the_gpu_the_layers_drop_as_torch_does(tiny_model_dir):
    """Without CUDA (and outside the interpreter) `dropout_kernel` changes nothing: torch's dropout, the same
    logits and gradients as without it; the option needs `fused_lora`."""
    from lit_mistral.config import Compute

    results = []
    for kernel in (False, True):
        module = adapted(tiny_model_dir, lora={"dropout": 0.3},
                         compute={"dtype": "float32", "gradient_checkpointing": False, "dropout_kernel": kernel})
        assert all(m._dropout_kernel is kernel for m in module.model.modules() if "_peft_forward" in m.__dict__)
        module.model.train()
        torch.manual_seed(4)
        logits = module.model(input_ids=torch.tensor([[1, 5, 9, 2, 7]])).logits
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in module.model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=0, atol=0)
    assert any("dropout_kernel" in p for p in Compute(dropout_kernel=True, fused_lora=False).problems(True))


@pytest.mark.gpu
def test_kernels_on_a_gpu():
    """bf16 on CUDA at Mistral-7B's widths (4,096 and 14,336 features; ranks 8 and 24 stacked): the kernels equal
    torch's arithmetic with their mask within bf16 rounding, at the asked rate, drawn again from the same CUDA
    generator state; the layers forward and backward in float32 (exact multiplies: the same values) and under bf16
    autocast (within bf16 rounding of the whole)."""
    for case in run_kernels("cuda", torch.bfloat16, [(3000, 4096, 24), (1500, 14336, 8), (77, 4096, 8)], 0.05):
        check_kernels(case, 0.05, atol=2e-2, rtol=2e-2)
    for case in run_kernels("cuda", torch.float32, [(300, 96, 8), (1100, 200, 24)], P):
        check_kernels(case, P, atol=1e-4, rtol=1e-4)
    check_layers(run_layers("cuda", torch.float32, P), P, atol=1e-4, rtol=1e-4)
    check_layers(run_layers("cuda", torch.bfloat16, P), P, atol=0, rtol=0, norm=2e-2)


@pytest.mark.gpu
def test_kernel_masks_recomputed_under_checkpointing_on_a_gpu(tiny_model_dir):
    """The tiny model on CUDA, bf16 autocast, dropout in the kernels: recomputed layers (activation checkpointing
    restores the CUDA generator's state) draw the masks of the first pass: the same gradients as keeping the
    activations; a pass with another seed draws other masks."""
    from lit_mistral.modeling.build import set_checkpointing

    results = []
    for checkpointing, seed in ((False, 3), (True, 3), (False, 4)):
        module = adapted(tiny_model_dir, device="cuda", quantization={"method": "nf4"}, lora={"dropout": 0.3},
                         compute={"dtype": "bfloat16", "gradient_checkpointing": False, "dropout_kernel": True,
                                  "shared_dropout": True})
        if checkpointing:
            set_checkpointing(module.model, None)
        module.model.zero_grad()
        module.model.train()
        torch.manual_seed(seed)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = module.model(input_ids=torch.tensor([[1, 5, 9, 2, 7, 3]], device="cuda")).logits.float()
        logits.square().mean().backward()
        results.append({n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None})
    kept, recomputed, other = results
    assert len(kept) == 28  # A and B of the 7 projections of 2 blocks
    for name in kept:
        torch.testing.assert_close(recomputed[name], kept[name], rtol=1e-3, atol=1e-6)
    assert any(not torch.allclose(other[n], kept[n]) for n in kept if "lora_A" in n)
