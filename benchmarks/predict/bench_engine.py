"""Generation throughput of lit_mistral's continuous-batching engine (lit_mistral.generation.engine) on one GPU:
Mistral-7B (random weights, the real architecture) answering N Dolly instructions in the Mistral format
(`[INST] {instruction}\\n\\n{context} [/INST]`, the context part only when there is one; records cycled), each answer
as long as a real Dolly answer: its response's token count + 1 (the EOS), capped at 512, or one length per line of
--lengths. Random weights almost never emit EOS, so each row's length is forced through its own max_new_tokens (no
EOS id is given) and the total generated must equal the sum of the lengths.

Variants (`name:key=value:...`): `merged` (a plain bf16 model: what a merged adapter is) or `nf4` (4-bit NF4 base +
a peft LoRA adapter, r=8 on q,k,v,o,gate,up,down and lm_head with random non-zero B, float32 LoRA weights, run under
bf16 autocast as Lightning's bf16-mixed runs it). Keys: graphs=0|1 (CUDA graphs, default 1), rows, tokens (KV-cache
positions), block, prefill (prompt tokens per prefill), sample=1 (temperature 0.7, top-k 50, top-p 0.95).

Per variant, one JSON line: generated tokens/s over the timed generation (after a warm-up generation that captures
the CUDA graphs of every batch-size bucket: warmup_s), its wall time, peak GPU memory (max_memory_allocated,
model included), and how many of the first --check prompts' greedy answers equal transformers' `generate` (greedy,
KV cache, one prompt at a time), compared over the first --check-tokens tokens (greedy answers are prefixes of longer
ones). bf16 rounding differs between the two paths (packed prefill, flash/Triton attention vs SDPA), and random
weights give near-flat logits where such differences flip the argmax, so `agree_tokens` (how many leading tokens
agree) is printed too; exact agreement is checked in float32 by tests/test_engine.py.

Usage: python benchmarks/predict/bench_engine.py --model $CKPT --data dolly.jsonl --n 1000 \\
           --variants merged merged:graphs=0 nf4"""

import argparse
import copy
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lit_mistral.generation.engine import Engine  # noqa: E402

CUDA = torch.cuda.is_available()  # the CPU path exists to check this script on a tiny model, not to measure
DEVICE = "cuda" if CUDA else "cpu"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def workload(tokenizer, records: list[dict], n: int, lengths_path: str | None) -> tuple[list[list[int]], list[int]]:
    prompts, lengths = [], []
    given = [int(x) for x in Path(lengths_path).read_text().split()] if lengths_path else None
    for i in range(n):
        r = records[i % len(records)]
        user = r["instruction"] + (f"\n\n{r['context']}" if r.get("context") else "")
        prompts.append(tokenizer(f"[INST] {user} [/INST]").input_ids)  # the tokenizer adds <s>
        if given:
            lengths.append(min(given[i % len(given)], 512))
        else:
            lengths.append(min(len(tokenizer(" " + r["response"], add_special_tokens=False).input_ids) + 1, 512))
    return prompts, lengths


def load(name: str, model_dir: str):
    """The model and the autocast it runs under."""
    from transformers import AutoModelForCausalLM

    if name == "merged":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": DEVICE})
        return model.eval(), torch.autocast(DEVICE, enabled=False)
    if name != "nf4":
        raise ValueError(f"unknown variant {name!r}: merged or nf4")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": DEVICE},
                                                quantization_config=BitsAndBytesConfig(
                                                    load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_compute_dtype=torch.bfloat16))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()  # as trained: float32 adapter weights over a bf16-computing base
                if "lora_B" in n:
                    p.normal_(0, 0.01)  # a trained-looking adapter: B is zero at initialization
    return model.eval(), torch.autocast(DEVICE, dtype=torch.bfloat16)


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.pad_token_id = None, 0  # the engine runs without an EOS: compare like with like
    config.max_new_tokens, config.do_sample, config.use_cache = max_new, False, True
    ids = torch.tensor([prompt], device=DEVICE)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt):].tolist()


def run(name: str, opts: dict, args, prompts: list[list[int]], lengths: list[int]) -> dict:
    started = time.perf_counter()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    model, autocast = load(name, args.model)
    ok, reason = Engine.supports(model)
    if not ok:
        raise RuntimeError(f"Engine.supports: {reason}")
    rows, tokens = int(opts.get("rows", args.max_rows)), int(opts.get("tokens", args.max_tokens))
    engine = Engine(model, max_rows=rows, max_tokens=tokens, block_size=int(opts.get("block", 16)),
                    cuda_graphs=opts.get("graphs", "1") == "1", prefill_tokens=int(opts.get("prefill", 8192)))
    sampling = dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.95) if opts.get("sample") == "1" else {}
    finished = []
    with autocast:
        # warm-up: as many rows as the engine holds, finishing one per step, so that every bucket gets its graph
        warm = min(rows, len(prompts))
        sync()
        t0 = time.perf_counter()
        engine.generate(prompts[:warm], [1 + i for i in range(warm)], **sampling)
        sync()
        warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        answers = engine.generate(prompts, lengths, eos_token_ids=None, on_finish=lambda i, a: finished.append(i),
                                  **sampling)
        sync()
        seconds = time.perf_counter() - t0
        generated = sum(len(a.tokens) for a in answers)
        if generated != sum(lengths) or sorted(finished) != list(range(len(prompts))):
            raise RuntimeError(f"generated {generated} tokens for {sum(lengths)} asked; {len(finished)} on_finish "
                               f"calls for {len(prompts)} prompts")
        result = dict(variant=name, **opts, prompts=len(prompts), max_rows=rows, max_tokens=tokens,
                      prompt_tokens=sum(map(len, prompts)), new_tokens=generated,
                      tokens_per_s=round(generated / seconds, 1), generation_s=round(seconds, 2),
                      warmup_s=round(warmup_s, 1), graphs_captured=len(engine.graphs), graphs_on=engine.cuda_graphs,
                      peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None)
        if not sampling and args.check:
            agree, same, margins = [], 0, []
            for prompt, answer, n in zip(prompts[:args.check], answers, lengths):
                n = min(n, args.check_tokens)
                ours, theirs = answer.tokens[:n], hf_greedy(model, prompt, n)
                same += ours == theirs
                agree.append(next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), n))
                if ours != theirs:  # how close to a tie the first differing pick was, in the reference's logits
                    i = agree[-1]
                    with torch.no_grad():
                        logits = model(input_ids=torch.tensor([prompt + ours[:i]], device=DEVICE)).logits[0, -1]
                    logits = logits.float()
                    margins.append(round(float(logits[theirs[i]] - logits[ours[i]]), 4))
            result.update(greedy_equal=f"{same}/{len(agree)}", agree_tokens=agree, compared_tokens=args.check_tokens,
                          differing_margins=margins)
    result["end_to_end_s"] = round(time.perf_counter() - started, 1)
    del engine, model
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="folder with a Mistral-7B-architecture checkpoint and tokenizer")
    p.add_argument("--data", required=True, help="Dolly-format .jsonl (instruction, context, response)")
    p.add_argument("--n", type=int, default=1000, help="prompts (the records are cycled)")
    p.add_argument("--lengths", help="file with one answer length per line (cycled); default: Dolly's own")
    p.add_argument("--max-rows", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=98304, help="KV-cache positions (128 KiB each for Mistral-7B)")
    p.add_argument("--check", type=int, default=16, help="greedy answers compared with transformers' generate")
    p.add_argument("--check-tokens", type=int, default=64, help="leading tokens compared per answer (512: all)")
    p.add_argument("--variants", nargs="+", default=["merged", "merged:graphs=0", "nf4"])
    p.add_argument("--out", help="also write the JSON lines to this file")
    args = p.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    records = [json.loads(line) for line in Path(args.data).read_text().split("\n") if line.strip()]
    prompts, lengths = workload(tokenizer, records, args.n, args.lengths)
    print(json.dumps(dict(prompts=len(prompts), prompt_tokens=sum(map(len, prompts)), answer_tokens=sum(lengths),
                          mean_answer=round(sum(lengths) / len(lengths), 1), longest_answer=max(lengths),
                          gpu=torch.cuda.get_device_name() if CUDA else None, torch=torch.__version__)), flush=True)
    results = []
    for spec in args.variants:
        name, *kv = spec.split(":")
        opts = dict(x.split("=", 1) for x in kv)
        try:
            result = run(name, opts, args, prompts, lengths)
        except Exception as err:
            traceback.print_exc()
            result = dict(variant=name, **opts, error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
