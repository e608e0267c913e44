"""LoRA dropout inside the multiply by A (`lit_mistral/modeling/lora_kernels.py`) against torch's dropout and
multiplies, at the shapes of a Mistral-7B `qlora-fast` step (16,384 tokens; q/k/v's input with three rank-8 A
stacked, gate/up's with two, o's alone, down's 14,336 features), bf16 on one GPU: milliseconds of GPU time per call
(median of 25 after 5 warm-up calls, CUDA events, the launches queued behind a GPU sleep), forward and backward,
for a few tile sizes. One JSON line per shape and tiling.

    python benchmarks/kernels/bench_lora_kernels.py [--tokens 16384] [--tiles 32x128,64x64,...] [--forward 32x1024,...]

`--tiles`: rows x features per tile of the backward kernels (and of the forward where it still takes them: a checkout
before the forward's slabs), optionally x warps x rows per split of A's gradient (`BM`, `BK`, `BACKWARD_WARPS`,
`ROWS_PER_SPLIT`); `--forward`: the forward's rows per program x features per program, optionally x warps x
features per tile (`FORWARD_ROWS`, `FEATURES_PER_PROGRAM`, `FORWARD_WARPS`, `FORWARD_TILE`), timed forward only.
Settings a checkout does not have are left out.
"""

import argparse
import contextlib
import json

import torch

from lit_mistral.modeling import lora_kernels

SHAPES = {"q/k/v input (r 3x8)": (4096, 24), "gate/up input (r 2x8)": (4096, 16), "o input (r 8)": (4096, 8),
          "down input (r 8)": (14336, 8)}


AHEAD_CYCLES = 4_000_000  # ~2 ms of GPU clock: longer than any call's launches take the CPU


def timed(fn, repeat: int = 25, warm: int = 5) -> float:
    """Milliseconds of GPU time per call of `fn` (median). The GPU is kept busy (`torch.cuda._sleep`) while the call
    is launched, so that its kernels queue and run back to back: without it the events also counted the CPU's launch
    time (the Python around a Triton launch, ~0.07 ms: on 2026-12-02 the same kernel timed 0.163 ms launched bare and
    0.24 ms through `dropout_a`), which in a training step runs ahead of the GPU."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(AHEAD_CYCLES)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--tiles", default="32x128,64x128,32x64,64x64,32x256")
    parser.add_argument("--forward", default="", help="forward only: BM x FEATURES_PER_PROGRAM settings")
    args = parser.parse_args()
    for label, (k, r) in SHAPES.items():
        shape(label, args.tokens, k, r, args.p, args.tiles.split(",") if args.tiles else [])
        for setting in filter(None, args.forward.split(",")):
            forward(label, args.tokens, k, r, args.p, setting)


@contextlib.contextmanager
def configured(names: tuple[str, ...], setting: str):
    """The module's tile constants `names` set to the values of `setting` ("64x1024", "64x1024x8": the first ones)
    inside the block, put back after."""
    values = {name: int(value) for name, value in zip(names, setting.split("x")) if hasattr(lora_kernels, name)}
    before = {name: getattr(lora_kernels, name) for name in values}
    for name, value in values.items():
        setattr(lora_kernels, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(lora_kernels, name, value)


def forward(label: str, n: int, k: int, r: int, p: float, setting: str) -> None:
    x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * 0.02
    with configured(("FORWARD_ROWS", "FEATURES_PER_PROGRAM", "FORWARD_WARPS", "FORWARD_TILE"), setting):
        ms = timed(lambda: lora_kernels.dropout_a(x, a, p))
    print(json.dumps({"shape": label, "tokens": n, "features": k, "rank": r, "path": f"forward {setting}",
                      "forward": round(ms, 3), "read_tb_per_s": round(x.numel() * 2 / ms / 1e9, 2)}), flush=True)


def shape(label: str, n: int, k: int, r: int, p: float, tilings: list[str]) -> None:
    x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * 0.02
    dh = torch.randn(n, r, device="cuda", dtype=torch.bfloat16)
    dropped, mask = torch.native_dropout(x, p, True)
    torch_ms = {
        "forward": timed(lambda: torch.native_dropout(x, p, True)[0] @ a.t()),
        "backward": timed(lambda: (dh.t() @ dropped,
                                   torch.ops.aten.native_dropout_backward(dh @ a, mask, 1 / (1 - p)))),
    }
    print(json.dumps({"shape": label, "tokens": n, "features": k, "rank": r, "path": "torch",
                      **{key: round(v, 3) for key, v in torch_ms.items()}}), flush=True)
    for tiles in tilings:
        with configured(("BM", "BK", "BACKWARD_WARPS", "ROWS_PER_SPLIT"), tiles):
            _, bits = lora_kernels.dropout_a(x, a, p)
            ms = {"forward": timed(lambda: lora_kernels.dropout_a(x, a, p)),
                  "backward": timed(lambda: (lora_kernels.dh_t_dropped(dh, x, bits, p),  # noqa: B023 (called at once)
                                             lora_kernels.masked_dh_a(dh, a, bits, p))),  # noqa: B023
                  "backward_grad_a": timed(lambda: lora_kernels.dh_t_dropped(dh, x, bits, p)),  # noqa: B023
                  "backward_grad_x": timed(lambda: lora_kernels.masked_dh_a(dh, a, bits, p))}  # noqa: B023
        print(json.dumps({"shape": label, "tokens": n, "features": k, "rank": r, "path": f"kernels {tiles}",
                          **{key: round(v, 3) for key, v in ms.items()},
                          # x read by one backward kernel, its gradient written by the other
                          "backward_tb_per_s": round(2 * x.numel() * 2 / ms["backward"] / 1e9, 2)}), flush=True)


if __name__ == "__main__":
    main()
