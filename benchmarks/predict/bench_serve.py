"""`python -m lit_mistral serve` under load, beside `predict` on the same requests in the same run: the dolly-lengths
workload (dolly_lengths.py's file: instruction, context and each row's own `max_new_tokens`) sent as
`/v1/completions` requests (the instruction/context pair under the config's prompt style, as predict renders it;
`max_tokens` the row's own; sampling unset, so the config's, as predict's) by N concurrent streaming clients of the
official `openai` async client. Each client sends its next request when its answer has ended (a closed loop).

Prints one JSON line per run:
  serve-start:  seconds from launch to /health answering and to the first answer; memory at idle (GPU: the
                server's process as nvidia-smi sees it; CPU: its resident memory);
  serve:        per client count: aggregate generated tokens/s (completion tokens over the phase's wall time), the
                same until the last request was sent (`steady_tokens_per_s`: every client busy, before the drain),
                time to first token p50/p99, time between tokens p50/p99 (gaps between streamed chunks), failed
                requests, answers shorter than asked (EOS), peak memory, the engine's work from /health;
  predict:      predict on the same rows with the same config and flags: its generation tokens/s (the engine's log
                line) and end to end, and `serve`'s throughput at each client count as a share of it, whole and
                steady. predict plans the longest answers first, so it has no drain; 1,000 requests in file order
                through a closed loop end with one (the last long answers run with few rows busy).

GPU (Mistral-7B's architecture, random weights; benchmarks/run_gpu.sh serve runs it):
    python benchmarks/predict/bench_serve.py --model /tmp/mistral7b-random --file /tmp/dolly-lengths.jsonl \
        --config qlora-fast --clients 64 256 --predict
The peer, `transformers serve --continuous-batching` on the same base, under the same load (add --n to shorten):
    python benchmarks/predict/bench_serve.py --model /tmp/mistral7b-random --file /tmp/dolly-lengths.jsonl \
        --peer transformers --clients 256
Dry run on the CPU (the demo model and config, a few short requests: checks the script, measures nothing):
    python benchmarks/predict/bench_serve.py --dry-run
"""

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO_QUESTIONS = ["Name three colors.", "What is the capital of France?", "Write a haiku about the sea.",
                  "Explain what a battery does.", "Give me a tip for learning to cook."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


class Memory:
    """The server process's memory, sampled every half second: nvidia-smi's figure for its pid on a GPU, else its
    resident set."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self.gpu = subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode == 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def now(self) -> float:
        """GiB held now."""
        if self.gpu:
            query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
            out = subprocess.run(query, capture_output=True, text=True).stdout
            return sum(float(mib) for pid, mib in (line.split(",") for line in out.splitlines() if "," in line)
                       if int(pid) == self.pid) / 1024
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0.0
        return next((int(line.split()[1]) / 2**20 for line in status.splitlines() if line.startswith("VmRSS")), 0.0)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self.now())

    def reset(self) -> None:
        self.peak = self.now()

    def close(self) -> None:
        self._stop.set()


def rows_of(args) -> list[dict]:
    if args.file:
        rows = [json.loads(line) for line in Path(args.file).read_text().splitlines() if line.strip()]
    else:  # the dry run: a few demo questions, short answers of varied lengths
        rows = [{"instruction": DEMO_QUESTIONS[i % len(DEMO_QUESTIONS)], "context": "", "max_new_tokens": 4 + i % 13}
                for i in range(args.n)]
    return rows[:args.n]


async def one(client, model: str, row: dict, record: dict) -> None:
    """One streamed completion; fills `record`: ttft, gaps, tokens, asked, error, and the wall-clock times it was
    sent, got its first text and ended (`at`: [sent, first, end])."""
    sent = time.perf_counter()
    record["at"] = [time.time(), None, None]
    last = None
    try:
        # lit_mistral renders the instruction/context pair itself; a peer gets the same prompt as text
        pair = {"instruction": row["instruction"], "context": row.get("context") or ""}
        stream = await client.completions.create(
            model=model, prompt=row.get("prompt"), max_tokens=row["max_new_tokens"], stream=True,
            stream_options={"include_usage": True}, **({} if "prompt" in row else {"extra_body": pair}))
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                if last is None:
                    record["ttft"] = now - sent
                    record["at"][1] = record["at"][0] + record["ttft"]
                else:
                    record["gaps"].append(now - last)
                last = now
            if chunk.usage is not None:
                record["tokens"] = chunk.usage.completion_tokens
        record["at"][2] = record["at"][0] + time.perf_counter() - sent
        if record["tokens"] is None:
            record["error"] = "no usage in the stream"
    except Exception as err:  # a failed request: counted, the load goes on
        record["error"] = f"{type(err).__name__}: {err}"[:300]


async def load(base_url: str, key: str, model: str, rows: list[dict], clients: int,
               todo=None) -> tuple[list[dict], float]:
    """`clients` concurrent clients working through `rows` (those `todo` hands out: default all, in order); returns
    (one record per row, `sent` where it was sent, wall seconds)."""
    import openai

    # openai's own connection pool (up to 1,000 connections): enough for one per client
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600.0)
    records = [{"ttft": None, "gaps": [], "tokens": None, "asked": r["max_new_tokens"], "error": None, "sent": False}
               for r in rows]
    todo = iter(range(len(rows))) if todo is None else todo

    async def worker():
        for i in todo:
            records[i]["sent"] = True
            await one(client, model, rows[i], records[i])

    started = time.time()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.time() - started
    await client.close()
    for record in records:
        record["start"] = started
    return records, wall


_NEXT = None  # in a load process: the shared counter of the next row to send


def _share(counter) -> None:
    global _NEXT
    _NEXT = counter
    import openai  # noqa: F401  (imported before the common start)


def _claims(n: int):
    """Row indices from the counter the load processes share: each row is sent once, by whichever client is free
    first, as one process's clients share its queue."""
    while True:
        with _NEXT.get_lock():
            i, _NEXT.value = _NEXT.value, _NEXT.value + 1
        if i >= n:
            return
        yield i


def _shard(base_url: str, key: str, model: str, rows: list[dict], clients: int, start_at: float):
    """One load process: its clients over the rows it claims, from `start_at` (wall clock) on; (records, its end)."""
    time.sleep(max(0.0, start_at - time.time()))
    records, _ = asyncio.run(load(base_url, key, model, rows, clients, _claims(len(rows))))
    return records, time.time()


def load_spread(base_url: str, key: str, model: str, rows: list[dict], clients: int,
                procs: int) -> tuple[list[dict], float]:
    """`load` spread over `procs` processes (the clients shared out, the rows taken from one shared queue), started
    together: one Python process parsing every stream's events runs out of CPU before a fast server does. Returns
    (one record per row, in order; wall seconds from the common start to the last process's end)."""
    procs = max(1, min(procs, clients))
    if procs == 1:
        return asyncio.run(load(base_url, key, model, rows, clients))
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    counter = context.Value("i", 0)
    with context.Pool(procs, initializer=_share, initargs=(counter,)) as pool:
        start_at = time.time() + 3.0  # after every process has started and imported the client (`_share`)
        jobs = [(base_url, key, model, rows, clients // procs + (i < clients % procs), start_at) for i in range(procs)]
        results = pool.starmap(_shard, jobs, chunksize=1)
    records = [next(shard[i] for shard, _ in results if shard[i]["sent"]) for i in range(len(rows))]
    for record in records:
        record["start"] = start_at
    return records, max(end for _, end in results) - start_at


def steady_rate(records: list[dict]) -> float | None:
    """Tokens/s from the start until the last request was sent: while every client had a request out, before the
    drain at the end (where fewer requests than rows are left, and the longest answers run alone). Each answer's
    tokens count as spread evenly from its first text to its end."""
    ok = [r for r in records if r["error"] is None and r.get("at") and r["at"][2] is not None]
    if not ok:
        return None
    start, last_sent = records[0]["start"], max(r["at"][0] for r in records if r.get("at"))
    tokens = 0.0
    for r in ok:
        _, first, end = r["at"]
        if end <= last_sent:
            tokens += r["tokens"]
        elif first is not None and first < last_sent:
            tokens += r["tokens"] * (last_sent - first) / max(end - first, 1e-9)
    return round(tokens / max(last_sent - start, 1e-9), 1)


def summary(records: list[dict], wall: float) -> dict:
    ok = [r for r in records if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    errors = sorted({r["error"] for r in records if r["error"]})
    return dict(requests=len(records), failed=len(records) - len(ok), errors=errors[:5], generated_tokens=tokens,
                tokens_per_s=round(tokens / wall, 1), steady_tokens_per_s=steady_rate(records), wall_s=round(wall, 1),
                ttft_p50_ms=ms(percentile(ttft, 50)), ttft_p99_ms=ms(percentile(ttft, 99)),
                between_tokens_p50_ms=ms(percentile(gaps, 50)), between_tokens_p99_ms=ms(percentile(gaps, 99)),
                short_answers=sum(r["tokens"] < r["asked"] for r in ok))


def engine_work(before: dict, after: dict, wall: float) -> dict | None:
    """What the engine did in a phase, from /health's counts before and after it: decoding steps and their mean
    rows, prefills and their mean prompt tokens, ms per step (prefills included), and its busy share of the wall."""
    if "steps" not in after or "steps" not in before:
        return None
    d = {k: after[k] - before[k] for k in ("steps", "rows", "prefills", "prompt_tokens", "busy_s")}
    return dict(steps=d["steps"], mean_rows=round(d["rows"] / max(1, d["steps"]), 1), prefills=d["prefills"],
                prompt_tokens_per_prefill=round(d["prompt_tokens"] / max(1, d["prefills"])),
                ms_per_step=round(1000 * d["busy_s"] / max(1, d["steps"]), 1), busy_share=round(d["busy_s"] / wall, 3))


def health(base: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


def run_predict(args, cli: list[str], rows_file: Path, work: Path) -> dict:
    """predict on the same rows with the same config and flags, a fresh process; its figures."""
    import re

    out = work / "predictions.jsonl"
    cmd = [sys.executable, "-m", "lit_mistral", "predict", *cli, "--data.predict_path", str(rows_file),
           "--predictions.path", str(out), "--trainer.default_root_dir", str(work / "predict"),
           "--trainer.enable_progress_bar", "false", "--predictions.overwrite", "true"]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    text = done.stdout + done.stderr
    (work / "predict.log").write_text(text)
    if done.returncode:
        return dict(kind="predict", label=args.label, rc=done.returncode, tail=text.splitlines()[-15:])
    # split on newlines only, not splitlines: U+2028 may be in answers
    answers = [json.loads(line) for line in out.read_text().split("\n") if line]
    tokens = sum(r["response_tokens"] for r in answers)
    rate = re.search(r"([0-9.]+) new tokens/s", text)
    engine = re.search(r"Generation engine: (.*)", text)
    peak = re.search(r"peak ([0-9.]+) GiB", text)
    return dict(kind="predict", label=args.label, prompts=len(answers), generated_tokens=tokens,
                tokens_per_s=float(rate.group(1)) if rate else None, end_to_end_tokens_per_s=round(tokens / wall, 1),
                wall_s=round(wall, 1), peak_gib=float(peak.group(1)) if peak else None,
                engine=engine.group(1) if engine else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="--model.name_or_path (default: the config's)")
    p.add_argument("--file", default=None, help="dolly_lengths.py's .jsonl (default with --dry-run: demo questions)")
    p.add_argument("--n", type=int, default=1000, help="the first N rows of the file")
    p.add_argument("--config", default="qlora-fast", help="configs/<name>.yaml, for serve and predict alike")
    p.add_argument("--ckpt_path", default=None, help="an adapter folder (the 4-bit base + adapter mode)")
    p.add_argument("--flags", default="--model.generation.max_new_tokens 512",
                   help="extra flags for serve and predict alike")
    p.add_argument("--serve_flags", default="", help="extra flags for serve only (e.g. --max_rows 256)")
    p.add_argument("--clients", type=int, nargs="+", default=[64, 256])
    p.add_argument("--client_procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="processes the clients are spread over (default: half the CPUs, at most 8)")
    p.add_argument("--predict", action="store_true", help="also run predict on the same rows, after serve")
    p.add_argument("--peer", choices=["transformers"], default=None,
                   help="serve with `transformers serve --continuous-batching` on --model instead (its own server "
                        "and continuous batching; the prompts rendered in --prompt_style, sent as text)")
    p.add_argument("--prompt_style", default="mistral", help="the prompt style a peer's prompts are rendered in")
    p.add_argument("--label", default="")
    p.add_argument("--timeout", type=int, default=300, help="seconds for predict, and for serve to start")
    p.add_argument("--work", default=None, help="folder for logs and the rows file (default: a temporary one)")
    p.add_argument("--dry-run", action="store_true",
                   help="the demo model and config, 20 short requests at 4 and 8 clients, predict beside them")
    args = p.parse_args()
    if args.dry_run:
        args.config, args.n, args.clients, args.predict = "demo", min(args.n, 20), [4, 8], True
        args.flags = "--model.generation.max_new_tokens 24 --model.generation.max_rows 8 " \
                     "--model.generation.max_cache_tokens 2048"

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = rows_of(args)
    rows_file = work / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli = ["--config", str(ROOT / "configs" / f"{args.config}.yaml"),
           *(["--model.name_or_path", args.model] if args.model else []),
           *(["--ckpt_path", args.ckpt_path] if args.ckpt_path else []), *shlex.split(args.flags)]
    port, key = free_port(), "bench"
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if args.peer == "transformers":  # its own server on the same base, the same prompts as text (lit_mistral's style)
        sys.path.insert(0, str(ROOT))
        from lit_mistral.data.prompts import prompt_style
        from lit_mistral.data.records import Example

        style = prompt_style(args.prompt_style)
        rows = [dict(r, prompt=style.apply(Example(r["instruction"], r.get("context") or ""))[0]) for r in rows]
        command = [sys.executable, "-c", "import sys; from transformers.cli.transformers import app; "
                   "sys.argv[0] = 'transformers'; app()", "serve", args.model,
                   "--continuous-batching", "--host", "127.0.0.1", "--port", str(port), *shlex.split(args.serve_flags)]
    else:
        command = [sys.executable, "-m", "lit_mistral", "serve", *cli, "--port", str(port), "--api_key", key,
                   *shlex.split(args.serve_flags)]
    log = (work / "serve.log").open("w")
    launched = time.perf_counter()
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    memory = Memory(server.pid)
    results = []
    try:
        while health(base) is None:
            if server.poll() is not None or time.perf_counter() - launched > args.timeout:
                tail = (work / "serve.log").read_text().splitlines()[-20:]
                print(json.dumps(dict(kind="serve-start", label=args.label, rc=server.poll(), tail=tail)), flush=True)
                return
            time.sleep(0.5)
        up = time.perf_counter() - launched
        model = health(base).get("model", args.model)
        first, _ = asyncio.run(load(f"{base}/v1", key, model, [{**rows[0], "max_new_tokens": 1}], 1))
        answered = time.perf_counter() - launched
        time.sleep(1.0)
        print(json.dumps(dict(kind="serve-start", label=args.label, config=args.peer or args.config,
                              start_to_health_s=round(up, 1),
                              start_to_first_answer_s=round(answered, 1), first_error=first[0]["error"],
                              idle_gib=round(memory.now(), 2), memory="gpu" if memory.gpu else "rss")), flush=True)
        for clients in args.clients:
            memory.reset()
            before = health(base) or {}
            records, wall = load_spread(f"{base}/v1", key, model, rows, clients, args.client_procs)
            state = health(base) or {}
            results.append(dict(kind="serve", label=args.label, config=args.peer or args.config, clients=clients,
                                **summary(records, wall), peak_gib=round(memory.peak, 2),
                                rows_left_running=state.get("running_rows"), engine=engine_work(before, state, wall),
                                flags=args.flags, serve_flags=args.serve_flags, client_procs=args.client_procs))
            print(json.dumps(results[-1]), flush=True)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        memory.close()
        log.close()
    print(json.dumps(dict(kind="serve-stop", label=args.label, rc=server.returncode)), flush=True)
    if args.predict:
        figures = run_predict(args, cli, rows_file, work)
        rate = figures.get("tokens_per_s")
        if rate:
            figures["serve_share_of_predict"] = {r["clients"]: round(r["tokens_per_s"] / rate, 3) for r in results}
            figures["steady_share_of_predict"] = {r["clients"]: round(r["steady_tokens_per_s"] / rate, 3)
                                                  for r in results if r["steady_tokens_per_s"]}
        # the same requests under the same settings: the same number of tokens, unless answers end at EOS by chance
        figures["serve_generated_tokens"] = {r["clients"]: r["generated_tokens"] for r in results}
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
