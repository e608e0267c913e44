"""`python -m lit_mistral serve` on the demo model (SmolLM2-135M-Instruct, NF4, the demo config), in a subprocess on
a free port, driven by the official `openai` client: one server for the module (the SIGTERM test, last, ends it)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, cli_fails, run_cli

openai = pytest.importorskip("openai")

KEY = "test-key"
QUESTIONS = ["What is the capital of France?", "Name three colors."]
SERVER_FLAGS = ["--model.generation.max_rows", "8", "--model.generation.max_cache_tokens", "4096",
                "--model.generation.max_new_tokens", "24"]


def call(method: str, url: str, body: bytes | str | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a plain HTTP request (what a client other than openai's may send)."""
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    """(process, base url, predict's records for QUESTIONS): the server started, then predict run on the same
    questions in this process."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "lit_mistral", "serve", "--config",
                                    str(ROOT / "configs" / "demo.yaml"), "--port", str(port), "--api_key", KEY,
                                    "--grace_period", "20", *SERVER_FLAGS], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if call("GET", f"{base}/health")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.3)
        else:
            pytest.fail(f"the server did not start: {log.read_text()[-3000:]}")
        # predict once the server idles (two processes computing at once on a few cores slow each other down)
        root = tmp_path_factory.mktemp("predict")
        (root / "questions.txt").write_text("\n".join(QUESTIONS) + "\n")
        run_cli("predict", "--config", ROOT / "configs" / "demo.yaml", "--data.predict_path", root / "questions.txt",
                "--predictions.path", root / "predictions.jsonl", "--trainer.default_root_dir", root,
                "--trainer.enable_progress_bar", "false", *SERVER_FLAGS)
        records = [json.loads(line) for line in (root / "predictions.jsonl").read_text().splitlines()]
        yield process, base, records
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0, timeout=60)


def health(base: str) -> dict:
    return call("GET", f"{base}/health")[1]


def test_greedy_answers_are_predicts_token_for_token(server, client):
    _, _, records = server
    model = client.models.list().data[0].id
    for record in records:
        instruction = client.completions.create(model=model, prompt="", temperature=0, max_tokens=24,
                                                extra_body={"instruction": record["instruction"], "prompt": None})
        chat = client.chat.completions.create(model=model, temperature=0, max_tokens=24,
                                              messages=[{"role": "user", "content": record["instruction"]}])
        answers = [(instruction.choices[0].text, instruction.usage, instruction.choices[0].finish_reason),
                   (chat.choices[0].message.content, chat.usage, chat.choices[0].finish_reason)]
        for text, usage, finish in answers:
            assert text.strip() == record["response"]
            assert usage.completion_tokens == record["response_tokens"]
            assert usage.prompt_tokens == record["prompt_tokens"]
            assert finish == {"eos": "stop", "length": "length"}[record["finish"]]


def test_streaming_chat_and_completion_with_usage(client):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTIONS[1]}]
    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    raw = client.completions.create(model="demo", prompt="The capital of France is", max_tokens=8, temperature=0,
                                    stream=True)
    pieces = list(raw)
    assert "".join(p.choices[0].text for p in pieces).strip() and pieces[-1].choices[0].finish_reason == "length"
    # a stop string cuts the text before it; the same seed samples the same answer
    cut = client.completions.create(model="demo", prompt="The capital of France is", max_tokens=8, temperature=0,
                                    stop=["xyz", "."])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == " Paris"
    sampled = [client.completions.create(model="demo", prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                         top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_eight_concurrent_requests_share_the_engine(server, client):
    async_client = openai.AsyncOpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0, timeout=60)
    import asyncio

    async def one(i: int):
        stream = await async_client.chat.completions.create(
            model="demo", max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"{QUESTIONS[i % 2]} ({i})"}])
        return [chunk async for chunk in stream]

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(8)))

    before = health(server[1])
    results = asyncio.run(all_of_them())
    for chunks in results:
        assert chunks[-1].usage.completion_tokens > 0
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    state = health(server[1])
    assert state["running_rows"] == 0 and state["free_blocks"] == state["total_blocks"]
    # serve's rows: 256 by default (more than the config's 8), over the cache the config sizes (4,096 positions)
    assert state["free_rows"] == 256 and state["total_blocks"] * 16 == 4096
    # the engine's work, as /health counts it: the 8 prompts prefilled, every later token decoded
    assert 1 <= state["prefills"] - before["prefills"] <= 8 and state["busy_s"] > before["busy_s"]
    tokens = sum(chunks[-1].usage.completion_tokens for chunks in results)
    assert state["rows"] - before["rows"] >= tokens - 8


def test_bad_requests_get_4xx_while_a_good_request_completes(server, client):
    base = server[1]
    answer = {}

    def good():
        answer["text"] = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="demo", max_tokens=48, temperature=0, stream=True,
            messages=[{"role": "user", "content": QUESTIONS[0]}]) if c.choices)

    thread = threading.Thread(target=good)
    thread.start()
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    chat = f"{base}/v1/chat/completions"
    hello = [{"role": "user", "content": "hello"}]
    cases = [
        (chat, b'{"messages": [', 400, "not valid JSON"),
        (chat, json.dumps({"messages": hello, "max_tokens": "5"}), 400, "max_tokens: expected int"),
        (chat, json.dumps({"messages": []}), 400, "non-empty list"),
        (chat, json.dumps({"messages": [{"role": "user", "content": ""}]}), 400, "is empty"),
        (chat, json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), 400, "unknown role"),
        (chat, json.dumps({"messages": hello, "n": 2}), 400, "n=2 is not supported"),
        (chat, json.dumps({"messages": hello, "logprobs": True}), 400, "logprobs=true is not supported"),
        (chat, json.dumps({"messages": hello, "colour": "red"}), 400, "unknown field 'colour'"),
        (chat, json.dumps({"messages": hello, "max_tokens": 100000}), 400, "the KV cache holds 4096 positions"),
        (f"{base}/v1/completions", json.dumps({"prompt": "x" * 60000}), 400, "positions, more than"),
    ]
    for url, body, status, message in cases:
        got, response = call("POST", url, body, auth)
        assert got == status, (message, response)
        assert message in response["error"]["message"] and response["error"]["type"], response
    # a body over the limit is refused by its Content-Length, unread (a client still sending a real 2 MiB body may
    # see the connection close instead of the answer: the header alone says it)
    got, response = call("POST", chat, b"{}", {**auth, "Content-Length": str(1 << 21)})
    assert got == 413 and "over 1048576 bytes" in response["error"]["message"], response
    got, response = call("POST", chat, json.dumps({"messages": hello}), {"Content-Type": "application/json"})
    assert got == 401 and response["error"]["code"] == "invalid_api_key"
    assert call("GET", f"{base}/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
    thread.join(60)
    assert answer["text"].strip().startswith("The capital of France is Paris")


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, client):
    base = server[1]
    before = health(base)["cancelled"]
    stream = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=400, temperature=1.0,
                                       seed=3, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the connection closes with the answer far from its end
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        state = health(base)
        if state["cancelled"] == before + 1 and state["running_rows"] == 0:
            break
        time.sleep(0.1)
    assert state["cancelled"] == before + 1 and state["running_rows"] == 0
    assert state["free_blocks"] == state["total_blocks"] and state["free_rows"] == 256


def test_sigterm_finishes_the_answers_in_flight_then_exits_0(server, client):
    process, base, _ = server
    chunks = []
    stream = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=48, temperature=1.0,
                                       seed=5, stream=True)
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 2:
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises((openai.APIConnectionError, openai.APIStatusError)):
                client.completions.create(model="demo", prompt="Hi", max_tokens=4)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") and len(chunks) > 2
    assert process.wait(30) == 0


def test_the_api_key_comes_from_the_option_else_the_environment(monkeypatch):
    from lit_mistral.serve import API_KEY_ENV, api_key_from

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert api_key_from(None) is None  # no key asked
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key_from(None) == "from-env" and api_key_from("given") == "given"


def test_bad_server_settings_fail_before_the_model_loads(smollm2_gguf, capsys):
    config = ["--config", ROOT / "configs" / "demo.yaml"]
    err = cli_fails(capsys, "serve", *config, "--port", "70000", "--max_request_bytes", "10")
    assert "port=70000: expected 1 .. 65535" in err and "max_request_bytes=10" in err and "Loaded" not in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        err = cli_fails(capsys, "serve", *config, "--port", str(taken.getsockname()[1]))
    assert "cannot listen there" in err


def test_tokens_that_arrive_together_make_one_piece_after_one_wakeup():
    """A whole engine step's tokens, handed over from the engine's thread at once, wake the event loop once and
    reach the client as one piece; an error after some text still sends that text first."""
    import asyncio

    from lit_mistral.generation.session import Answer
    from lit_mistral.serve import Generation, ServerState

    class Letters:  # token i is the letter chr(97 + i)
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i) for i in ids)

    class Engine:  # an engine loop whose thread delivers a step's items all at once
        cancelled = None

        def submit(self, ids, max_new, sampling, on_token, on_finish):
            self.on_token, self.on_finish = on_token, on_finish
            return 7

        def cancel(self, key):
            self.cancelled = key

    async def answer(items):
        engine = Engine()
        state = ServerState(loop=engine, prompter=None, tokenizer=Letters(), model=None, model_id="m",
                            generation=None)
        job = Generation(state, [1, 2], 8, None, stop=[])

        # the engine's step, all of it before the event loop's next turn (as when the engine's thread outruns it)
        for item in items:
            (engine.on_finish if isinstance(item, Answer) else engine.on_token)(item)
        pieces = []
        try:
            async for piece in job.pieces():
                pieces.append(piece)
        except RuntimeError as err:
            pieces.append(f"<{err}>")
        return pieces, state.relay.wakeups, job.finish, engine.cancelled

    assert asyncio.run(answer([0, 1, 2, Answer([0, 1, 2], "length")])) == (["abc"], 1, "length", None)
    assert asyncio.run(answer([3, 4, Answer([], "error: boom")])) == (["de", "<error: boom>"], 1, None, None)
