"""What the engine's scheduling does with `serve`'s load, without a model: the real `Session` (which prompts are
prefilled when, which rows decode) over a stand-in engine that answers at once, driven by the closed loop of
`bench_serve.py` (N clients, each sending its next request of the dolly-lengths file as its answer ends, after
`--latency` steps), and by predict's order (every prompt at once, the longest answer limit first). Counts only,
no times: decoding steps, their mean rows, prefills and their prompt tokens, for the whole run and until the last
request is sent (before the drain, where fewer requests than rows are left), and the decoding steps a request
waits for its first token (p50, p99).

On a GPU these counts are what the engine did (`bench_serve.py` reads them from /health), and each step and
prefill has its cost; here they say what a change of policy does to them, in seconds on the CPU:

    python benchmarks/predict/schedule_serve.py --file /tmp/dolly-lengths.jsonl \\
        --tokenizer ../shared/data/mistral-7b-v0.1-tokenizer --clients 64 256 --predict
"""

import argparse
import contextlib
import json
import sys
from collections import deque
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_serve import percentile  # noqa: E402

from lit_mistral.data.prompt_batches import predict_batches  # noqa: E402
from lit_mistral.generation.engine import Engine  # noqa: E402
from lit_mistral.generation.session import Session  # noqa: E402


class InstantEngine:
    """The part of `Engine` a `Session` uses, answering at once: every token is 0, never the EOS (answers run to
    their max_new_tokens, as a random model's do)."""

    def __init__(self, max_rows: int, max_tokens: int, block_size: int = 16, prefill_tokens: int = 8192) -> None:
        self.max_rows, self.block_size, self.prefill_tokens = max_rows, block_size, prefill_tokens
        self.refill_rows = max(1, max_rows // 8)
        self.num_blocks = -(-max_tokens // block_size) + 1
        self.device = torch.device("cpu")

    _blocks_needed = Engine._blocks_needed

    def _check(self, prompts, max_new_tokens) -> None:
        pass

    @contextlib.contextmanager
    def _prepare(self):
        yield

    def _prefill(self, rows):
        return torch.zeros(len(rows), 2)

    def _decode(self, rows):
        return torch.zeros(len(rows), 2)


def closed_loop(prompts: list[list[int]], news: list[int], clients: int, args) -> dict:
    session = Session(InstantEngine(args.rows, args.cache), eos_token_ids=[1], patience=args.patience or None)
    due: deque[tuple[int, int]] = deque()  # (step it is sent at, row)
    due.extend((0, i) for i in range(min(clients, len(prompts))))
    sent, before_drain = len(due), None
    added, waited = {}, []  # row -> the step it was added at; steps each waited for its first token

    def token(key, _) -> None:
        if key in added:
            waited.append(session.counts["steps"] - added.pop(key))

    def finished(key, answer) -> None:
        nonlocal sent, before_drain
        if sent < len(prompts):
            due.append((session.counts["steps"] + args.latency, sent))
            sent += 1
            if sent == len(prompts):
                before_drain = dict(session.counts)

    with torch.inference_mode():
        while due or session.waiting or session.running:
            while due and due[0][0] <= session.counts["steps"]:
                _, i = due.popleft()
                session.add([prompts[i]], [news[i]], [i])
                added[i] = session.counts["steps"]
            session.step(finished, token)
    return dict(figures(session.counts, before_drain), first_token_steps_p50=percentile(waited, 50),
                first_token_steps_p99=percentile(waited, 99))


def predict_order(prompts: list[list[int]], news: list[int], args) -> dict:
    session = Session(InstantEngine(args.rows, args.cache), eos_token_ids=[1])
    order = [i for batch in predict_batches([len(p) for p in prompts], range(len(prompts)), args.rows, args.cache,
                                            news) for i in batch]  # predict's plan: the longest answers first
    session.add([prompts[i] for i in order], [news[i] for i in order], order)
    session.run()
    return figures(session.counts, None)


def figures(counts: dict, before_drain: dict | None) -> dict:
    out = dict(steps=counts["steps"], mean_rows=round(counts["rows"] / max(1, counts["steps"]), 1),
               prefills=counts["prefills"], prompt_tokens_per_prefill=round(counts["prompt_tokens"] /
                                                                            max(1, counts["prefills"])))
    if before_drain:
        out.update(steady_steps=before_drain["steps"], steady_prefills=before_drain["prefills"],
                   steady_mean_rows=round(before_drain["rows"] / max(1, before_drain["steps"]), 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", required=True, help="dolly_lengths.py's .jsonl")
    p.add_argument("--tokenizer", default=None, help="prompt lengths from it (default: characters / 4)")
    p.add_argument("--prompt_style", default="mistral")
    p.add_argument("--clients", type=int, nargs="+", default=[64, 256])
    p.add_argument("--rows", type=int, default=200, help="qlora-fast's max_rows")
    p.add_argument("--cache", type=int, default=80000, help="qlora-fast's max_cache_tokens")
    p.add_argument("--patience", type=int, default=None, help="Session's patience (default: serve's; 0: none, each "
                   "arrival prefilled at once as predict's rule does)")
    p.add_argument("--latency", type=int, default=0, help="steps from an answer's end to its client's next request")
    p.add_argument("--predict", action="store_true", help="also predict's order (every prompt at once)")
    args = p.parse_args()
    if args.patience is None:
        from lit_mistral.serving import PATIENCE

        args.patience = PATIENCE
    rows = [json.loads(line) for line in Path(args.file).read_text().split("\n") if line.strip()]
    from lit_mistral.data.prompts import prompt_style
    from lit_mistral.data.records import Example

    style = prompt_style(args.prompt_style)
    texts = [style.apply(Example(r["instruction"], r.get("context") or ""))[0] for r in rows]
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        prompts = [tokenizer(t)["input_ids"] for t in texts]
    else:
        prompts = [[0] * max(1, len(t) // 4) for t in texts]
    news = [r["max_new_tokens"] for r in rows]
    if args.predict:
        print(json.dumps(dict(kind="predict-order", **predict_order(prompts, news, args))), flush=True)
    for clients in args.clients:
        print(json.dumps(dict(kind="closed-loop", clients=clients, rows=args.rows, patience=args.patience,
                              latency=args.latency,
                              **closed_loop(prompts, news, clients, args))), flush=True)


if __name__ == "__main__":
    main()
