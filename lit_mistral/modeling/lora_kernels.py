"""LoRA dropout inside the multiply by A: Triton kernels for `fused_lora` on CUDA (`compute.dropout_kernel`).

The adapter branch starts with `dropout(x) @ A.T`: x is (tokens, in), A is (r, in) with r of 8 to 24, so the
multiply reads x once and does little arithmetic. torch's dropout before it reads x and writes the dropped copy
(2 bytes per element) and its mask (1 byte), which the multiply and backward then read again: three passes over
every adapted layer's input per step. Here:
- `dropout_a`: one pass reads x, draws the mask in the kernel (Philox, counter-based: the call of counter (f, row)
  gives the 16-bit draws of the row's features 8f..8f+7, whatever the tiling), multiplies the dropped tile by A on
  the tensor cores, and writes only the (tokens, r) result and the mask packed one bit per element (1/16 of x's
  bytes). Tiles of 32 features and 64 rows keep a thread's registers few enough for several programs per SM (tiles of
  128 features need too many registers at 64 rows): the fastest of a sweep (`benchmarks/bench_lora_kernels.py`);
- backward, `masked_dh_a`: the input's gradient `mask * (dh @ A) / (1 - p)` in one pass (torch: the product written,
  then read with the mask and written again);
- backward, `dh_t_dropped`: A's gradient `dh.T @ dropout(x)`, the dropped tile rebuilt from x and the bits.
The dropped values are those torch computes (x * 1/(1 - p) in float32, rounded to the compute dtype); the drop
probability is p rounded to a multiple of 1/65536 (0.05: 3277/65536, 0.050003) and the scale 1/(1 - that). Each
call's Philox key comes from the CUDA generator's seed and offset (the offset then advanced), so
`torch.cuda.get/set_rng_state` and activation checkpointing's recompute reproduce the masks; they are not the masks
torch's dropout would draw.

Written by hand because neither torch (dropout and matmul are separate kernels; torch.compile does not fuse a
matmul's input with random draws) nor peft, Liger or bitsandbytes offer a dropout fused into the LoRA multiply."""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton: `available()` says so
    triton = None

BM, BK, BACKWARD_WARPS = 32, 128, 4  # the backward kernels: rows x input features per tile (BK a multiple of 32: one
# bit word per 32), warps per program
# `dropout_a`: rows x features per program, features per tile (32, 64 or 128), warps per program: the fastest of
# those tried (benchmarks/bench_lora_kernels.py --forward)
FORWARD_ROWS, FEATURES_PER_PROGRAM, FORWARD_TILE, FORWARD_WARPS = 64, 1024, 32, 4
ROWS_PER_SPLIT = 1024  # `dh_t_dropped`: rows each program sums over (a multiple of BM)
STREAM = 0x5DEECE66D  # mixed into the generator's seed: these draws never share a Philox key with torch's own
GOLDEN = 0x9E3779B97F4A7C15  # odd: spreads consecutive generator offsets over the keys
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as Triton itself does at its import


def available(device: torch.device) -> bool:
    """Whether these kernels can run on `device` (CUDA and Triton; or Triton's interpreter, for tests)."""
    return triton is not None and (device.type == "cuda" or INTERPRETED)


def threshold(p: float) -> int:
    """The 16-bit draw below which an element is dropped: p rounded to a multiple of 1/65536."""
    return min(65535, max(0, round(p * 65536)))


def drop_scale(p: float) -> float:
    """What kept elements are multiplied by: 1 / (1 - the probability actually drawn)."""
    return 1.0 / (1.0 - threshold(p) / 65536)


def draw_philox(x: torch.Tensor) -> int:
    """The Philox key of one kernel call, from the generator of x's device: its seed and offset, the offset then
    advanced (each call its own key; counters run from 0 within it). A CPU tensor (the interpreter): the CPU
    generator's next draw. Always in [2^62, 2^63), so that Triton passes it as one 64-bit type (no recompile)."""
    if x.is_cuda:
        gen = torch.cuda.default_generators[x.device.index if x.device.index is not None else
                                            torch.cuda.current_device()]
        offset = gen.get_offset()
        gen.set_offset(offset + 4)  # torch moves it in steps of 4
        key = (gen.initial_seed() ^ STREAM) * GOLDEN + offset
    else:
        key = int(torch.randint(0, 2**62, ())) ^ STREAM
    return key % 2**62 | 2**62


def unpack(bits: torch.Tensor, features: int) -> torch.Tensor:
    """The (tokens, features) bool keep-mask of packed (tokens, words) int32 bits (bit j of word w: feature
    32 w + j)."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    kept = (bits[:, :, None] >> shifts) & 1
    return kept.reshape(bits.shape[0], -1)[:, :features].bool()


def _precision(t: torch.Tensor) -> str:
    """`tl.dot`'s input precision: float32 multiplied exactly ("ieee"; Triton would take TF32), 16-bit as is."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _pad_rank(r: int) -> int:
    """The rank padded for `tl.dot` (>= 16): 32 up to rank 32, so that ranks 8 to 32 share one compiled kernel."""
    return max(32, triton.next_power_of_2(r))


if triton is not None:

    @triton.jit
    def _words_to_keep(words, BM: tl.constexpr, BK: tl.constexpr):
        shifts = tl.arange(0, 32)
        return tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 1, (BM, BK)) != 0

    @triton.jit(do_not_specialize=["n"])  # the token count changes from batch to batch: one compiled kernel
    def _dropout_a_kernel(x_ptr, a_ptr, h_ptr, bits_ptr, n, k: tl.constexpr, r, sx, sa, sp, sh, sb, seed, thr, scale,
                          BM: tl.constexpr, KS: tl.constexpr, TILE: tl.constexpr, WORDS: tl.constexpr,
                          RP: tl.constexpr, PRECISION: tl.constexpr):
        # k, the features, a compile-time constant: a layer's width is fixed, and Triton 3.6's interpreter (the
        # tests) cannot take a run-time value as a range() bound under numpy >= 2.4. Program (i, j): rows
        # i*BM.., features j*KS.. (the multiply's partial sum to h_ptr's slice j), in tiles of TILE features read
        # whole (one multiply by A each). Philox counter (f, row) gives the draws of the row's features 8f..8f+7:
        # the 16-bit halves of its four words, joined next to each other in registers (the same draws whatever
        # the tiling). The program's bit words (KS / 32 per row, WORDS that rounded up to a power of 2) are kept in
        # registers and stored once, contiguous per row (a word per row per tile, rows apart, made scattered stores)
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
        word_cols = tl.arange(0, WORDS)
        tile_words = tl.arange(0, TILE // 32)
        kept = tl.zeros((BM, WORDS), dtype=tl.int32)
        for i in range(0, KS, TILE):
            k0 = start + i
            w0, w1, w2, w3 = tl.philox(seed, (k0 // 8 + lane).to(tl.uint32)[None, :] + zero, row_counter, zero, zero)
            words = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # (BM, TILE / 8, 2, 2)
            # (BM, TILE): feature 8f + 4a + 2b + h drew half h of counter f's word 2b + a
            draws = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (BM, TILE))
            cols = k0 + feats
            in_cols = cols < k
            x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=in_rows[:, None] & in_cols[None, :],
                        other=0.0)
            keep = (draws.to(tl.int32) >= thr) & in_cols[None, :]
            a = tl.load(a_ptr + ranks[None, :] * sa + cols[:, None], mask=(ranks[None, :] < r) & in_cols[:, None],
                        other=0.0)  # (TILE, RP): A transposed
            dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(a.dtype)
            acc += tl.dot(dropped, a, input_precision=PRECISION)
            # bit j of word w: feature 32 w + j (the bits are distinct: their sum is their or)
            packed = tl.sum(tl.reshape(keep.to(tl.int32), (BM, TILE // 32, 32)) << shifts[None, None, :], axis=2)
            for t in tl.static_range(TILE // 32):  # word t of the tile to its column among the program's words
                word = tl.sum(tl.where(tile_words[None, :] == t, packed, 0), axis=1)  # (BM,)
                kept = tl.where(word_cols[None, :] == i // 32 + t, word[:, None], kept)
        w = start // 32 + word_cols
        tl.store(bits_ptr + rows[:, None] * sb + w[None, :], kept,
                 mask=in_rows[:, None] & (word_cols[None, :] < KS // 32) & (w[None, :] * 32 < k))
        tl.store(h_ptr + tl.program_id(1) * sp + rows[:, None] * sh + ranks[None, :],
                 acc.to(h_ptr.dtype.element_ty), mask=in_rows[:, None] & (ranks[None, :] < r))

    @triton.jit(do_not_specialize=["n"])
    def _masked_dh_a_kernel(dh_ptr, a_ptr, bits_ptr, out_ptr, n, k: tl.constexpr, r, sd, sa, sb, so, scale,
                            BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        ranks = tl.arange(0, RP)
        in_rows, in_cols = rows < n, cols < k
        dh = tl.load(dh_ptr + rows[:, None] * sd + ranks[None, :], mask=in_rows[:, None] & (ranks[None, :] < r),
                     other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * sa + cols[None, :], mask=(ranks[:, None] < r) & in_cols[None, :],
                    other=0.0)
        w = tl.program_id(1) * (BK // 32) + tl.arange(0, BK // 32)
        words = tl.load(bits_ptr + rows[:, None] * sb + w[None, :], mask=in_rows[:, None] & (w[None, :] * 32 < k),
                        other=0)
        keep = _words_to_keep(words, BM, BK)
        out = tl.where(keep, tl.dot(dh, a, input_precision=PRECISION) * scale, 0.0)
        tl.store(out_ptr + rows[:, None] * so + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=in_rows[:, None] & in_cols[None, :])

    @triton.jit(do_not_specialize=["n"])
    def _dh_t_dropped_kernel(dh_ptr, x_ptr, bits_ptr, part_ptr, n, k: tl.constexpr, r, sd, sx, sb, sp0, sp1, scale,
                             ROWS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
                             PRECISION: tl.constexpr):
        cols = tl.program_id(0) * BK + tl.arange(0, BK)
        in_cols = cols < k
        ranks = tl.arange(0, RP)
        w = tl.program_id(0) * (BK // 32) + tl.arange(0, BK // 32)
        start = tl.program_id(1) * ROWS
        acc = tl.zeros((RP, BK), dtype=tl.float32)
        for i in range(ROWS // BM):  # rows past n (the last split's) are masked
            rows = start + i * BM + tl.arange(0, BM)
            in_rows = rows < n
            dh = tl.load(dh_ptr + rows[:, None] * sd + ranks[None, :], mask=in_rows[:, None] & (ranks[None, :] < r),
                         other=0.0)
            x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=in_rows[:, None] & in_cols[None, :],
                        other=0.0)
            words = tl.load(bits_ptr + rows[:, None] * sb + w[None, :],
                            mask=in_rows[:, None] & (w[None, :] * 32 < k), other=0)
            dropped = tl.where(_words_to_keep(words, BM, BK), x.to(tl.float32) * scale, 0.0).to(dh.dtype)
            acc += tl.dot(tl.trans(dh), dropped, input_precision=PRECISION)
        tl.store(part_ptr + tl.program_id(1) * sp0 + ranks[:, None] * sp1 + cols[None, :], acc,
                 mask=(ranks[:, None] < r) & in_cols[None, :])


def dropout_a(x: torch.Tensor, a: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(`dropout(x) @ a.T` in a's dtype, the packed keep bits) for x (tokens, in) of any float dtype (the dropped
    values rounded to a's dtype, as autocast's multiply would take them) and a (r, in) in the compute dtype."""
    n, k = x.shape
    r = a.shape[0]
    seed = draw_philox(x)
    span = min(FEATURES_PER_PROGRAM, triton.cdiv(k, FORWARD_TILE) * FORWARD_TILE)  # features per program, whole tiles
    splits = triton.cdiv(k, span)
    h = torch.empty(n, r, device=x.device, dtype=a.dtype)
    parts = h[None] if splits == 1 else torch.empty(splits, n, r, device=x.device, dtype=torch.float32)
    bits = torch.empty(n, (k + 31) // 32, device=x.device, dtype=torch.int32)
    _dropout_a_kernel[(triton.cdiv(n, FORWARD_ROWS), splits)](
        x, a, parts, bits, n, k, r, x.stride(0), a.stride(0), parts.stride(0), parts.stride(1), bits.stride(0), seed,
        threshold(p), drop_scale(p), BM=FORWARD_ROWS, KS=span, TILE=FORWARD_TILE,
        WORDS=triton.next_power_of_2(span // 32), RP=_pad_rank(r), PRECISION=_precision(a),
        num_warps=FORWARD_WARPS, num_stages=3)
    if splits > 1:
        h.copy_(parts.sum(0))
    return h, bits


def masked_dh_a(dh: torch.Tensor, a: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """`keep * (dh @ a) / (1 - p)`, (tokens, in) in dh's dtype: the gradient of the dropout's input."""
    n, r = dh.shape
    k = a.shape[1]
    out = torch.empty(n, k, device=dh.device, dtype=dh.dtype)
    _masked_dh_a_kernel[(triton.cdiv(n, BM * 2), triton.cdiv(k, BK))](
        dh, a, bits, out, n, k, r, dh.stride(0), a.stride(0), bits.stride(0), out.stride(0), drop_scale(p),
        BM=BM * 2, BK=BK, RP=_pad_rank(r), PRECISION=_precision(dh), num_warps=BACKWARD_WARPS)
    return out


def dh_t_dropped(dh: torch.Tensor, x: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """`dh.T @ dropout(x)`, (r, in) in float32: A's gradient, the dropped values rebuilt from x and the bits."""
    n, r = dh.shape
    k = x.shape[1]
    splits = triton.cdiv(n, ROWS_PER_SPLIT)
    parts = torch.empty(splits, r, k, device=dh.device, dtype=torch.float32)
    _dh_t_dropped_kernel[(triton.cdiv(k, BK), splits)](
        dh, x, bits, parts, n, k, r, dh.stride(0), x.stride(0), bits.stride(0), parts.stride(0), parts.stride(1),
        drop_scale(p), ROWS=ROWS_PER_SPLIT, BM=BM * 2, BK=BK, RP=_pad_rank(r), PRECISION=_precision(dh),
        num_warps=BACKWARD_WARPS, num_stages=3)
    return parts.sum(0) if splits > 1 else parts[0]
