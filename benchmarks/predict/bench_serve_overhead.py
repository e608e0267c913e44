"""What `serve`'s HTTP side costs the engine, on the CPU: the real server (`serve.build_app`, uvicorn, the engine
loop, the real tokenizer's streaming detokenization) over a paced stand-in for the engine whose step waits
`--step_ms` with the GIL released (as the engine waits for the GPU) and then gives every running row one token. The
same closed-loop load as `bench_serve.py` (the official `openai` async client, N streaming clients, each row's own
`max_tokens`) runs in another process.

With a free HTTP side the engine would step every `--step_ms` and deliver `rows x 1000 / step_ms` tokens/s; the
figures say how far the server falls short: the engine's mean step time (its wait plus the time its thread waited
for the GIL and spent handing tokens over), the tokens/s delivered, and the load's time to first token and between
tokens. Run it for two checkouts to compare them (`--code .before`): only the server's code changes.

    python benchmarks/predict/dolly_lengths.py --tokenizer ../shared/data/mistral-7b-v0.1-tokenizer \\
        --data ../shared/data/dolly-15k-head.jsonl --n 1000 --out /tmp/dolly-lengths.jsonl
    python benchmarks/predict/bench_serve_overhead.py --tokenizer ../shared/data/mistral-7b-v0.1-tokenizer \\
        --file /tmp/dolly-lengths.jsonl --clients 256 [--code .before]

Prints one JSON line per client count. On a 2-core machine the load's process runs out of CPU first (it parses
every stream's events): the figures then measure the client, and only the engine's step time says what the server
costs it. Compare checkouts on the same machine, not with a GPU's figures."""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_serve import free_port, health, load_spread, rows_of, summary  # noqa: E402


class PacedSession:
    """The part of `generation.session.Session` that `EngineLoop` uses, paced: up to `rows` answers at once, each
    step a wait of `step_s` (GIL released) and then one token per running row, an answer ending at its
    `max_new_tokens`. Tokens cycle through `vocab` (ids of ordinary words, so detokenizing costs what it does)."""

    def __init__(self, rows: int, step_s: float, vocab: list[int]) -> None:
        from lit_mistral.generation.session import Answer

        self.Answer, self.rows, self.step_s, self.vocab = Answer, rows, step_s, vocab
        self.waiting: list = []
        self.running: dict = {}  # key -> [tokens, max_new]
        self.stepping_s = 0.0
        self.counts = {"steps": 0, "rows": 0, "prefills": 0, "prompt_tokens": 0}  # as Session counts
        self.engine = self

    # the engine's part that EngineLoop reads
    def problems(self, prompts, max_new):
        return {}

    @contextlib.contextmanager
    def _prepare(self):
        yield

    def add(self, prompts, max_new_tokens, keys, samplings) -> None:
        self.waiting += [(key, max_new) for key, max_new in zip(keys, max_new_tokens, strict=True)]

    def cancel(self, key) -> bool:
        self.waiting = [w for w in self.waiting if w[0] != key]
        return self.running.pop(key, None) is not None

    def load(self) -> dict:
        return {"running_rows": len(self.running), "free_rows": self.rows - len(self.running),
                "waiting": len(self.waiting), "free_blocks": 0, "total_blocks": 0,
                "stepping_s": self.stepping_s}

    def step(self, on_finish, on_token) -> None:
        started = time.perf_counter()
        while self.waiting and len(self.running) < self.rows:
            key, max_new = self.waiting.pop(0)
            self.running[key] = [0, max_new]
        self.counts["rows"] += len(self.running)
        time.sleep(self.step_s)
        for key, row in list(self.running.items()):
            on_token(key, self.vocab[(key + row[0]) % len(self.vocab)])
            row[0] += 1
            if row[0] >= row[1]:
                del self.running[key]
                on_finish(key, self.Answer([0] * row[0], "length"))
        self.counts["steps"] += 1
        self.stepping_s += time.perf_counter() - started


def serve_paced(args) -> None:
    """The server process: the real app over the paced engine, on `--port`."""
    import uvicorn
    from transformers import AutoTokenizer

    from lit_mistral import serve
    from lit_mistral.config import Generation
    from lit_mistral.generation.loop import EngineLoop

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    words = "the model answers each question with a short and clear sentence about what it knows".split()
    vocab = [t for w in words for t in tokenizer.encode(" " + w, add_special_tokens=False)]

    class Prompter:  # the bench sends instruction + context; any ids do for a paced engine
        def instruction(self, instruction, context):
            return [1, 2, 3]

    class Model:  # what `serve.start` reads of the model: its context (unbounded here)
        config = type("Config", (), {"max_position_embeddings": None})

    loop = EngineLoop(PacedSession(args.rows, args.step_ms / 1000, vocab))
    state = serve.ServerState(loop, Prompter(), tokenizer, Model(), "paced", Generation(max_new_tokens=512))
    uvicorn.run(serve.build_app(state, 1 << 20), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--file", required=True, help="dolly_lengths.py's .jsonl")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--clients", type=int, nargs="+", default=[256])
    p.add_argument("--rows", type=int, default=200, help="the engine's rows (qlora-fast's max_rows)")
    p.add_argument("--step_ms", type=float, default=18.0, help="the engine's step: ~18 ms for 200 rows on an H100")
    p.add_argument("--code", default=".", help="the checkout whose lit_mistral serves (e.g. .before)")
    p.add_argument("--client_procs", type=int, default=1, help="processes the load's clients are spread over")
    p.add_argument("--label", default=None)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve_paced(args)

    port = free_port()
    code = (HERE.parents[1] / args.code).resolve()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]))
    tokenizer = str(Path(args.tokenizer).resolve())  # the server runs in the checkout's folder
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(port), "--tokenizer", tokenizer,
                               "--file", args.file, "--rows", str(args.rows), "--step_ms", str(args.step_ms)],
                              env=env, cwd=code)
    base = f"http://127.0.0.1:{port}"
    try:
        while health(base) is None:
            if server.poll() is not None:
                raise SystemExit("the paced server did not start")
            time.sleep(0.3)
        rows = rows_of(args)
        for clients in args.clients:
            before = health(base)
            records, wall = load_spread(f"{base}/v1", "none", "paced", rows, clients, args.client_procs)
            after = health(base)
            steps = after["steps"] - before["steps"]
            mean_step_ms = round(1000 * (after["stepping_s"] - before["stepping_s"]) / max(1, steps), 2)
            ideal = min(clients, args.rows) * 1000 / args.step_ms
            figures = summary(records, wall)
            print(json.dumps(dict(kind="serve-overhead", label=args.label or args.code, clients=clients,
                                  rows=args.rows, step_ms=args.step_ms, mean_step_ms=mean_step_ms,
                                  steps=steps, ideal_tokens_per_s=round(ideal), **figures)), flush=True)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
