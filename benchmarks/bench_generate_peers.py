"""The peers of lit_mistral's predict on the dolly-lengths workload (benchmarks/dolly_lengths.py), one GPU, the same
merged bf16 Mistral-7B (random weights) and prompts (`[INST] {instruction}\\n\\n{context} [/INST]`, as predict
formats them), greedy:

- `static64`: plain transformers `generate` in static batches of 64 prompts in input order, each batch running to
  its longest answer (min_new_tokens = max_new_tokens = the batch's longest length: random weights never stop);
  tokens/s counts the answers' own lengths (the tokens a user gets), over the generation;
- `generate_batch`: transformers' continuous batching (`generate_batch`, its defaults), which takes one
  max_new_tokens for all: the first --batch_prompts prompts with --batch_new tokens each; tokens/s counts all.

Prints one JSON line per peer.

    python benchmarks/bench_generate_peers.py --model $CKPT --file dolly-lengths.jsonl --tokenizer tok/
"""

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batch_prompts", type=int, default=200)
    p.add_argument("--batch_new", type=int, default=256)
    p.add_argument("--peers", nargs="+", default=["static64", "generate_batch"])
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = [json.loads(line) for line in Path(args.file).read_text().splitlines()]
    prompts = [tokenizer(f"[INST] {r['instruction']}" + (f"\n\n{r['context']}" if r["context"] else "") + " [/INST]")
               ["input_ids"] for r in rows]
    lengths = [r["max_new_tokens"] for r in rows]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map={"": 0}).eval()
    pad = tokenizer.eos_token_id
    if "static64" in args.peers:
        torch.cuda.synchronize()
        started, generated = time.perf_counter(), 0
        for s in range(0, len(prompts), args.batch):
            batch, news = prompts[s: s + args.batch], lengths[s: s + args.batch]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], device=0)
            mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=0)
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(news), min_new_tokens=max(news),
                               do_sample=False, pad_token_id=pad)
            generated += sum(news)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        print(json.dumps(dict(peer=f"plain generate, static batches of {args.batch}", prompts=len(prompts),
                              useful_new_tokens=generated, seconds=round(seconds, 1),
                              tokens_per_s=round(generated / seconds, 1),
                              peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))), flush=True)
    if "generate_batch" in args.peers:
        config = GenerationConfig(max_new_tokens=args.batch_new, min_new_tokens=args.batch_new, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        inputs = prompts[: args.batch_prompts]
        try:
            torch.cuda.synchronize()
            started = time.perf_counter()
            outputs = model.generate_batch(inputs=inputs, generation_config=config)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            generated = sum(len(o.generated_tokens) for o in outputs.values())
            print(json.dumps(dict(peer="transformers generate_batch (continuous batching, defaults)",
                                  prompts=len(inputs), new_tokens=generated, seconds=round(seconds, 1),
                                  tokens_per_s=round(generated / seconds, 1))), flush=True)
        except Exception as err:  # an API that moved between transformers versions
            print(json.dumps(dict(peer="generate_batch", error=f"{type(err).__name__}: {str(err)[:300]}")), flush=True)


if __name__ == "__main__":
    main()
