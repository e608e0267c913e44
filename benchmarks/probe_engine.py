"""Where the generation engine's time goes, on one GPU: merged bf16 Mistral-7B (random weights) answering the
dolly-lengths prompts (as bench_engine.py builds them), with the engine's phases timed one by one.

Prints JSON lines:
- `phases`: one run over the workload with each prefill and each decoding step synchronized and timed: seconds in
  prefill (calls, prompt tokens), in decoding steps (steps, mean rows per step), and the rest (the host's scheduling
  and sampling between them);
- `replay`: per batch-size bucket, milliseconds per decoding step (a CUDA-graph replay, rows at position --position)
  and of its 32 attention calls alone (the Triton kernel), so weights+MLP vs attention vs fixed cost can be told;
- `kernels`: the top kernels of 20 replays of the largest bucket (torch.profiler), by total GPU time.

    python benchmarks/probe_engine.py --model $CKPT --data dolly.jsonl --n 1000 --rows 200 --tokens 80000
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import DEVICE, load, sync, workload  # noqa: E402

from lit_mistral.generation import engine as engine_mod  # noqa: E402
from lit_mistral.generation.paged_attention import paged_decode_triton  # noqa: E402


def timed(fn, log: list):
    def wrapper(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        log.append((time.perf_counter() - t0, args[0] if args else None))
        return out
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--tokens", type=int, default=80000)
    p.add_argument("--position", type=int, default=300)
    p.add_argument("--order", choices=["longest", "fifo"], default="longest", help="prompt order (predict: longest)")
    p.add_argument("--variants", nargs="*", default=[],
                   help="engine keyword overrides, e.g. refill_rows=50; `liger`: Liger's kernels from then on")
    args = p.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    records = [json.loads(line) for line in Path(args.data).read_text().split("\n") if line.strip()]
    prompts, lengths = workload(tokenizer, records, args.n, None)
    if args.order == "longest":  # as predict plans its batches: the longest answer limits first
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        prompts, lengths = [prompts[i] for i in order], [lengths[i] for i in order]
    model, _ = load("merged", args.model)
    for spec in [""] + args.variants:
        if spec == "liger":  # the model with Liger's RMSNorm/SwiGLU/RoPE (what compute.kernels=liger gives)
            from lit_mistral.modeling.build import apply_kernels

            apply_kernels(model)
        extra = {k: int(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv and spec != "liger")}
        engine = engine_mod.Engine(model, max_rows=args.rows, max_tokens=args.tokens, **extra)
        engine.generate(prompts[:args.rows], [1 + i for i in range(args.rows)])  # graphs of every bucket
        prefills, decodes = [], []
        engine._prefill, engine._decode = timed(engine._prefill, prefills), timed(engine._decode, decodes)
        sync()
        t0 = time.perf_counter()
        answers = engine.generate(prompts, lengths)
        wall = time.perf_counter() - t0
        new = sum(len(a.tokens) for a in answers)
        pre_s, dec_s = sum(t for t, _ in prefills), sum(t for t, _ in decodes)
        print(json.dumps(dict(kind="phases", variant=spec or "default", wall_s=round(wall, 2),
                              tokens_per_s=round(new / wall), new_tokens=new,
                              prefill_s=round(pre_s, 2), prefills=len(prefills),
                              prefill_tokens=sum(sum(len(r.prompt) for r in rows) for _, rows in prefills),
                              decode_s=round(dec_s, 2), steps=len(decodes),
                              mean_rows=round(sum(len(rows) for _, rows in decodes) / max(1, len(decodes)), 1),
                              ms_per_step=round(1000 * dec_s / max(1, len(decodes)), 2),
                              host_s=round(wall - pre_s - dec_s, 2),
                              host_ms_per_step=round(1000 * (wall - pre_s - dec_s) / max(1, len(decodes)), 2))),
              flush=True)
        del engine._prefill, engine._decode
        if spec not in ("", "liger") or not engine.graphs:  # other variants: phases only; CPU: no graphs
            continue
        # replay timing per bucket, every row at --position (their table lines point at the scratch block: timing)
        engine.tables.zero_()
        for b, (graph, _) in sorted(engine.graphs.items()):
            engine.inputs[1, :b] = args.position
            engine.inputs[2, :b] = torch.arange(b) % args.rows
            sync()
            t0 = time.perf_counter()
            for _ in range(20):
                graph.replay()
            sync()
            step_ms = 1000 * (time.perf_counter() - t0) / 20
            q = torch.randn(b, 32, 128, device=DEVICE, dtype=torch.bfloat16)
            lens = torch.full((b,), args.position + 1, device=DEVICE, dtype=torch.long)
            slots = engine.inputs[2, :b]
            paged_decode_triton(q, engine.k_cache[0], engine.v_cache[0], engine.tables, slots, lens, 16, 0.088)
            sync()
            t0 = time.perf_counter()
            for _ in range(20):
                for i in range(32):
                    paged_decode_triton(q, engine.k_cache[i], engine.v_cache[i], engine.tables, slots, lens, 16, 0.088)
            sync()
            attn_ms = 1000 * (time.perf_counter() - t0) / 20
            print(json.dumps(dict(kind="replay", variant=spec or "default", rows=b, position=args.position, step_ms=round(step_ms, 2),
                                  attention_ms=round(attn_ms, 2))), flush=True)
        biggest = max(engine.graphs)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                engine.graphs[biggest][0].replay()
            sync()
        rows = sorted(((e.key, e.device_time_total / 20 / 1000, e.count // 20) for e in prof.key_averages()
                       if e.device_time_total > 0), key=lambda r: -r[1])[:15]
        print(json.dumps(dict(kind="kernels", variant=spec or "default", rows=biggest, per_step_ms=[[k[:90], round(ms, 3), n]
                                                                            for k, ms, n in rows])), flush=True)
        del engine
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
