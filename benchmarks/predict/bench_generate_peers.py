"""The peers of lit_mistral's predict on the dolly-lengths workload (benchmarks/predict/dolly_lengths.py), one GPU,
the same merged bf16 Mistral-7B (random weights) and prompts (`[INST] {instruction}\\n\\n{context} [/INST]`, as predict
formats them), greedy:

- `static64`: plain transformers `generate` in static batches of 64 prompts in input order, each batch running to
  its longest answer (min_new_tokens = max_new_tokens = the batch's longest length: random weights never stop);
  tokens/s counts the answers' own lengths (the tokens a user gets), over the generation;
- `generate_batch`: transformers' continuous batching (its manager, defaults), each of the first --batch_prompts
  prompts with its own max_new_tokens; tokens/s counts all generated tokens.

--n takes the first N rows of the file only (tokens/s is what compares: the peers are too slow for all 1,000).

Prints one JSON line per peer.

    python benchmarks/predict/bench_generate_peers.py --model $CKPT --file dolly-lengths.jsonl --tokenizer tok/
"""

import argparse
import json
import time
from pathlib import Path

import torch

DEVICE = 0 if torch.cuda.is_available() else "cpu"  # CPU: to check this script on a tiny model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batch_prompts", type=int, default=200)
    p.add_argument("--batch_timeout", type=float, default=120, help="seconds the continuous-batching peer may run")
    p.add_argument("--n", type=int, default=None, help="the first N rows of --file only (static batches are slow)")
    p.add_argument("--static_rows", type=int, default=None, help="static batches over the first N of those rows only")
    p.add_argument("--peers", nargs="+", default=["static64", "generate_batch"])
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = [json.loads(line) for line in Path(args.file).read_text().splitlines()][: args.n]
    prompts = [tokenizer(f"[INST] {r['instruction']}" + (f"\n\n{r['context']}" if r["context"] else "") + " [/INST]")
               ["input_ids"] for r in rows]
    lengths = [r["max_new_tokens"] for r in rows]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map={"": DEVICE}).eval()
    pad = tokenizer.eos_token_id
    if "static64" in args.peers:
        sync()
        started, generated = time.perf_counter(), 0
        static = prompts[: args.static_rows]
        for s in range(0, len(static), args.batch):
            batch, news = prompts[s: s + args.batch], lengths[s: s + args.batch]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], device=DEVICE)
            mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=DEVICE)
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(news), min_new_tokens=max(news),
                               do_sample=False, pad_token_id=pad)
            generated += sum(news)
        sync()
        seconds = time.perf_counter() - started
        print(json.dumps(dict(peer=f"plain generate, static batches of {args.batch}", prompts=len(static),
                              useful_new_tokens=generated, seconds=round(seconds, 1),
                              tokens_per_s=round(generated / seconds, 1),
                              peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEVICE == 0 else None)),
              flush=True)
    if "generate_batch" in args.peers:
        # transformers' continuous batching, each request with its own max_new_tokens (the manager's add_request);
        # no EOS, so each answer runs to its length as ours do
        config = GenerationConfig(max_new_tokens=max(lengths), do_sample=False, eos_token_id=None, pad_token_id=pad)
        inputs, news = prompts[: args.batch_prompts], lengths[: args.batch_prompts]
        try:
            manager = model.init_continuous_batching(generation_config=config)
            manager.start()
            sync()
            started = time.perf_counter()
            for i, (ids, n) in enumerate(zip(inputs, news)):
                manager.add_request(ids, request_id=f"r{i}", max_new_tokens=n)
            generated, received = 0, 0
            while received < len(inputs) and time.perf_counter() - started < args.batch_timeout:
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    received += 1
                    generated += len(result.generated_tokens)
            sync()
            seconds = time.perf_counter() - started
            manager.stop(block=False)
            print(json.dumps(dict(peer="transformers continuous batching (init_continuous_batching, defaults)",
                                  prompts=len(inputs), finished=received, asked_tokens=sum(news),
                                  new_tokens=generated, seconds=round(seconds, 1),
                                  tokens_per_s=round(generated / seconds, 1))), flush=True)
        except Exception as err:  # an API that moved between transformers versions
            print(json.dumps(dict(peer="generate_batch", error=f"{type(err).__name__}: {str(err)[:300]}")), flush=True)

if __name__ == "__main__":
    main()
