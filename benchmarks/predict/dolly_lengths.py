"""The "dolly-lengths" predict workload: N prompts, the shared Dolly records' instructions and contexts cycled, each
row with its own `max_new_tokens` = min(L_i, 512), L_i the Mistral-7B token count of record i's reference response
plus EOS. Random weights almost never emit EOS, so each answer runs to exactly its length, and the total generated
must equal the sum of the lengths (printed). Writes a .jsonl that `predict --data.predict_path` reads.

    python benchmarks/predict/dolly_lengths.py --tokenizer mistral-7b-v0.1-tokenizer --data dolly.jsonl --n 1000 \
        --out f.jsonl
"""

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--cap", type=int, default=512)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    records = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    lengths = [len(tokenizer(" " + r["response"], add_special_tokens=False)["input_ids"]) + 1 for r in records]
    rows = [{"instruction": records[i % len(records)]["instruction"], "context": records[i % len(records)]["context"],
             "max_new_tokens": min(lengths[i % len(records)], args.cap)} for i in range(args.n)]
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    news = [r["max_new_tokens"] for r in rows]
    print(json.dumps(dict(workload="dolly-lengths", prompts=args.n, total_new_tokens=sum(news),
                          mean=round(statistics.mean(news), 1), median=statistics.median(news), max=max(news))))


if __name__ == "__main__":
    main()
