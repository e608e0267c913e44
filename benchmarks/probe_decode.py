"""Where transformers' `generate` spends a decoding step, for choosing predict's batching: plain bf16 Mistral-7B
(random weights), random prompts, greedy. For each case: milliseconds per decoding step, from two runs of different
lengths (prefill cancels out), and the compile time where the static cache makes transformers compile the step.
Cases are `B:L[:short=S][:cache=static][:sample=1][:autocast=1]`: B prompts of L tokens (with `short`, every other
row has only S tokens, left-padded, as in a batch of mixed lengths). Prints one JSON line per case.

    python benchmarks/probe_decode.py --model $CKPT 1:32 64:32 200:32 64:1400:short=50
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def timed(model, ids, mask, new, sample, autocast):
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=sample,
                       pad_token_id=0, **({"cache_implementation": "static"} if model._static else {}))
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, nargs=2, default=[4, 36])
    p.add_argument("cases", nargs="+")
    args = p.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map={"": 0})
    model.generation_config.pad_token_id = 0
    print(json.dumps(dict(attn=model.config._attn_implementation, torch=torch.__version__)), flush=True)
    for case in args.cases:
        b, length, *kv = case.split(":")
        opts = dict(x.split("=") for x in kv)
        b, length = int(b), int(length)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(100, 32000, (b, length), generator=gen)
        mask = torch.ones_like(ids)
        if "short" in opts:
            mask[::2, : length - int(opts["short"])] = 0
            ids[mask == 0] = 0
        ids, mask = ids.cuda(), mask.cuda()
        model._static = opts.get("cache") == "static"
        sample, autocast = opts.get("sample") == "1", opts.get("autocast") == "1"
        torch.cuda.reset_peak_memory_stats()
        try:
            first = timed(model, ids, mask, args.steps[0], sample, autocast)  # compiles where it compiles
            short = timed(model, ids, mask, args.steps[0], sample, autocast)
            long = timed(model, ids, mask, args.steps[1], sample, autocast)
            ms = (long - short) / (args.steps[1] - args.steps[0]) * 1000
            print(json.dumps(dict(case=case, ms_per_step=round(ms, 2), tokens_per_s=round(b / ms * 1000),
                                  first_call_s=round(first, 1), prefill_s=round(short - args.steps[0] * ms / 1000, 2),
                                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))), flush=True)
        except Exception as err:  # one case failing (OOM, compile) must not cost the others
            print(json.dumps(dict(case=case, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")),
                  flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
