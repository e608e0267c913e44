"""What the LoRA dropout's forward kernel (`lora_kernels.dropout_a`) spends its time on: the kernel's loop timed with
one part at a time taken out or changed, at the shapes of a Mistral-7B `qlora-fast` step (16,384 tokens; q/k/v's
input with three rank-8 A stacked, down's 14,336 features), bf16, milliseconds of GPU time per call
(`bench_lora_kernels.timed`). A diagnostic: the variants other than `as is` do not compute the right thing.
`_probe_kernel` is a copy of `lora_kernels._dropout_a_kernel` with switches (kept out of the kernel users run):
change both together.

    python benchmarks/probe_dropout_kernel.py [--tokens 16384] [--rows 64] [--span 1024] [--warps 4] [--tile 32]

Variants: `as is` (the kernel's loop: Philox 10 rounds, mask, multiply by A, bits stored); `rounds=R` (Philox with R
rounds: 0 = no random draws at all, the counters taken as draws); `no bits` (the mask not packed nor stored); `no
multiply` (the dropped tile summed instead of multiplied by A); `prefetch` (the next tile's input loaded before this
one is used); `load only` (no draws, no bits, no multiply: the input read and summed: the loop's memory floor).
"""

import argparse
import functools
import json

import torch
import triton
import triton.language as tl
from bench_lora_kernels import timed

from lit_mistral.modeling import lora_kernels

SHAPES = {"q/k/v input (r 3x8)": (4096, 24), "down input (r 8)": (14336, 8)}
VARIANTS = {"as is": {}, "rounds=7": {"ROUNDS": 7}, "rounds=0": {"ROUNDS": 0}, "no bits": {"BITS": False},
            "no multiply": {"DOT": False}, "prefetch": {"PREFETCH": True},
            "rounds=0, no bits": {"ROUNDS": 0, "BITS": False},
            "load only": {"ROUNDS": 0, "BITS": False, "DOT": False}}


@triton.jit(do_not_specialize=["n"])
def _probe_kernel(x_ptr, a_ptr, h_ptr, bits_ptr, n, k: tl.constexpr, r, sx, sa, sp, sh, sb, seed, thr, scale,
                  BM: tl.constexpr, KS: tl.constexpr, TILE: tl.constexpr, RP: tl.constexpr, ROUNDS: tl.constexpr,
                  BITS: tl.constexpr, DOT: tl.constexpr, PREFETCH: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    in_rows = rows < n
    start = tl.program_id(1) * KS
    lane = tl.arange(0, TILE // 8)
    feats = tl.arange(0, TILE)
    ranks = tl.arange(0, RP)
    shifts = tl.arange(0, 32)
    row_counter = tl.broadcast_to(rows.to(tl.uint32)[:, None], (BM, TILE // 8))
    zero = row_counter * 0
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    following = tl.load(x_ptr + rows[:, None] * sx + (start + feats)[None, :],
                        mask=in_rows[:, None] & ((start + feats) < k)[None, :], other=0.0)
    for i in range(0, KS, TILE):
        k0 = start + i
        w0, w1, w2, w3 = tl.philox(seed, (k0 // 8 + lane).to(tl.uint32)[None, :] + zero, row_counter, zero, zero,
                                   ROUNDS)
        words = tl.join(tl.join(w0, w1), tl.join(w2, w3))
        draws = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (BM, TILE))
        cols = k0 + feats
        in_cols = cols < k
        if PREFETCH:
            x = following
            after = cols + TILE
            following = tl.load(x_ptr + rows[:, None] * sx + after[None, :],
                                mask=in_rows[:, None] & (after < tl.minimum(k, start + KS))[None, :], other=0.0)
        else:
            x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=in_rows[:, None] & in_cols[None, :],
                        other=0.0)
        keep = (draws.to(tl.int32) >= thr) & in_cols[None, :]
        a = tl.load(a_ptr + ranks[None, :] * sa + cols[:, None], mask=(ranks[None, :] < r) & in_cols[:, None],
                    other=0.0)
        dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(a.dtype)
        if DOT:
            acc += tl.dot(dropped, a)
        else:
            acc += tl.sum(dropped.to(tl.float32), axis=1)[:, None]
        if BITS:
            packed = tl.sum(tl.reshape(keep.to(tl.int32), (BM, TILE // 32, 32)) << shifts[None, None, :], axis=2)
            w = k0 // 32 + tl.arange(0, TILE // 32)
            tl.store(bits_ptr + rows[:, None] * sb + w[None, :], packed, mask=in_rows[:, None] & (w[None, :] * 32 < k))
    tl.store(h_ptr + tl.program_id(1) * sp + rows[:, None] * sh + ranks[None, :], acc.to(h_ptr.dtype.element_ty),
             mask=in_rows[:, None] & (ranks[None, :] < r))


def launch(x, a, parts, bits, p: float, args, settings: dict) -> None:
    (n, k), r = x.shape, a.shape[0]
    _probe_kernel[(triton.cdiv(n, args.rows), parts.shape[0])](
        x, a, parts, bits, n, k, r, x.stride(0), a.stride(0), parts.stride(0), parts.stride(1), bits.stride(0),
        lora_kernels.draw_philox(x), lora_kernels.threshold(p), lora_kernels.drop_scale(p), BM=args.rows, KS=args.span,
        TILE=args.tile, RP=32, num_warps=args.warps, num_stages=3, **settings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--span", type=int, default=1024)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--tile", type=int, default=32)
    args = parser.parse_args()
    p = 0.05
    for label, (k, r) in SHAPES.items():
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * 0.02
        splits = triton.cdiv(k, args.span)
        parts = torch.empty(splits, args.tokens, r, device="cuda", dtype=torch.float32)
        bits = torch.empty(args.tokens, (k + 31) // 32, device="cuda", dtype=torch.int32)
        for name, knobs in VARIANTS.items():
            settings = {"ROUNDS": 10, "BITS": True, "DOT": True, "PREFETCH": False, **knobs}
            ms = timed(functools.partial(launch, x, a, parts, bits, p, args, settings))
            print(json.dumps({"shape": label, "tokens": args.tokens, "features": k, "rank": r, "variant": name,
                              "rows": args.rows, "span": args.span, "warps": args.warps, "tile": args.tile,
                              "ms": round(ms, 3), "read_tb_per_s": round(x.numel() * 2 / ms / 1e9, 2)}), flush=True)


if __name__ == "__main__":
    main()
