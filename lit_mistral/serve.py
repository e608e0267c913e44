"""`python -m lit_mistral serve`: an HTTP server in OpenAI's shape (`/v1/chat/completions`, `/v1/completions`,
`/v1/models`, `/health`) over one continuous-batching engine that every request shares.

FastAPI + uvicorn carry the HTTP side (request parsing, server-sent events, connections, graceful shutdown), as
vLLM's and SGLang's OpenAI servers do: a request handler here is a coroutine that renders the prompt, hands it to
the engine loop (`generation/loop.py`) and relays its tokens as they come, so thousands of open streams cost no
thread each. (LitServe batches requests into static batches of its own; the engine already batches continuously,
token by token.)"""

import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from lit_mistral.errors import LitMistralError
from lit_mistral.generation.loop import Relay
from lit_mistral.generation.session import Answer, Sampling
from lit_mistral.openai_requests import error_body, max_tokens_of, parse, sampling_of
from lit_mistral.serving import BadRequest, Prompter, TextStream, limits

log = logging.getLogger(__name__)

API_KEY_ENV = "LIT_MISTRAL_API_KEY"
FINISH = {"eos": "stop", "length": "length"}  # the engine's reasons as OpenAI names them


def check_settings(host: str, port: int, api_key: str | None, max_request_bytes: int, grace_period: float,
                   max_rows: int | None) -> None:
    """The server's settings, and that it can listen where asked: before the model loads."""
    problems = []
    if not 0 < port < 65536:
        problems.append(f"port={port}: expected 1 .. 65535")
    if max_request_bytes < 1024:
        problems.append(f"max_request_bytes={max_request_bytes}: expected at least 1024")
    if grace_period < 0:
        problems.append(f"grace_period={grace_period}: expected seconds >= 0")
    if max_rows is not None and max_rows < 1:
        problems.append(f"max_rows={max_rows}: expected >= 1 (or null: model.generation.max_rows)")
    if api_key is not None and not api_key.strip():
        problems.append("api_key is empty: give a key, or leave it unset (and unset $" + API_KEY_ENV + ")")
    if not problems:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(infos[0][4])
        except OSError as err:
            problems.append(f"host={host} port={port}: cannot listen there ({err.strerror or err}); another server "
                            "may hold the port: choose another --port")
    if problems:
        raise LitMistralError("serve: " + "; ".join(problems) + ". Fix: correct these settings (nothing was loaded "
                              "yet).")


@dataclass
class ServerState:
    """What every request reads: the engine loop, how prompts are rendered, the defaults and limits."""

    loop: Any  # generation.loop.EngineLoop
    prompter: Prompter
    tokenizer: Any
    model: Any
    model_id: str
    generation: Any  # config.Generation: the defaults of unset sampling fields and of max_tokens
    api_key: str | None = None
    draining: bool = False
    started: float = field(default_factory=time.time)
    relay: Relay | None = None  # made for the server's event loop at its first request


class Gate:
    """ASGI middleware in front of the application: on `/v1/`, the API key (401 without it) and no new requests
    while draining (503); everywhere, a request body over `limit` bytes is a 413 before any of it is parsed (by its
    Content-Length, or as it arrives when chunked)."""

    def __init__(self, app, state: "ServerState", limit: int) -> None:
        self.app, self.state, self.limit = app, state, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["path"].startswith("/v1/"):
            key = self.state.api_key
            if key is not None and not secrets.compare_digest(headers.get(b"authorization", b""),
                                                              f"Bearer {key}".encode()):
                return await self._answer(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key")
            if self.state.draining and scope["method"] == "POST":
                return await self._answer(send, 503, "the server is shutting down and takes no new requests",
                                          kind="server_error")
        length = headers.get(b"content-length")
        too_big = f"the request body is over {self.limit} bytes (--max_request_bytes)"
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._answer(send, 413, too_big)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BadRequest(too_big, status=413)
            return message

        return await self.app(scope, counted, send)

    @staticmethod
    async def _answer(send, status: int, message: str, kind: str = "invalid_request_error",
                      code: str | None = None) -> None:
        body = json.dumps(error_body(message, kind=kind, code=code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class Generation:
    """One request in the engine: its tokens relayed from the loop's thread into this event loop, its text
    streamed, cut at stop strings (the row freed at once: the engine drops it at the next step)."""

    def __init__(self, state: ServerState, ids: list[int], max_new: int, sampling: Sampling | None,
                 stop: list[str]) -> None:
        self.state, self.prompt_tokens = state, len(ids)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(state.tokenizer, stop)
        self.finish: str | None = None
        self.ended = False  # the engine ended it (EOS, length, error): nothing to cancel
        aloop = asyncio.get_running_loop()
        if state.relay is None or state.relay.aloop is not aloop:
            state.relay = Relay(aloop)
        relay, queue = state.relay, self.queue
        self.key = state.loop.submit(ids, max_new, sampling, lambda t: relay.put(queue, t),
                                     lambda a: relay.put(queue, a))

    @property
    def completion_tokens(self) -> int:
        return len(self.text.ids)

    async def pieces(self, request=None):
        """The answer's text, piece by piece, until it finishes (`finish` set): the tokens that arrived together
        make one piece (a client behind by several gets them in one event, not one event each); a client that
        disconnects (checked twice a second when `request` is given) ends it."""
        checked = time.monotonic()
        try:
            while self.finish is None:
                try:
                    item = await asyncio.wait_for(self.queue.get(), 0.5) if request is not None else \
                        await self.queue.get()
                except TimeoutError:
                    item = None
                if request is not None and time.monotonic() - checked > 0.5:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if item is None:
                    continue
                items = [item]
                while not self.queue.empty():
                    items.append(self.queue.get_nowait())
                text = []
                for item in items:
                    if self.finish is not None:
                        break
                    if isinstance(item, Answer) and item.finish.startswith("error"):
                        self.ended = True
                        if text:
                            yield "".join(text)
                        raise RuntimeError(item.finish)
                    text.append(self._take(item))
                if any(text):
                    yield "".join(text)
        finally:
            if not self.ended:
                self.state.loop.cancel(self.key)  # stopped, disconnected or failed: its row is free at the next step

    def _take(self, item) -> str:
        """A token's text (cut at a stop string), or the answer's end and the text held back till then."""
        if isinstance(item, Answer):
            self.ended = True
            self.finish = FINISH.get(item.finish, "stop")
            return self.text.finish()
        piece = self.text.feed(item)
        if self.text.stopped:
            self.finish = "stop"
        return piece

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def start(state: ServerState, body: dict, ids: list[int]) -> Generation:
    """Check the request against the engine's limits and put it into the engine."""
    generation = state.generation
    sampling, stop = sampling_of(body, generation)
    max_new = max_tokens_of(body, generation)
    if not ids:
        raise BadRequest("the prompt is empty", "prompt")
    why = state.loop.problems(ids, max_new)
    if why is not None or (state.model.config.max_position_embeddings or 1 << 62) < len(ids) + max_new:
        raise BadRequest(f"the prompt has {len(ids)} tokens and max_tokens is {max_new}: {len(ids) + max_new} "
                         f"positions, more than this server takes ({limits(state.model, state.loop)}). Shorten the "
                         "prompt or lower max_tokens.", "messages" if "messages" in body else "prompt")
    return Generation(state, ids, max_new, sampling, stop)


def build_app(state: ServerState, max_request_bytes: int):
    """The FastAPI application over `state`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="lit_mistral", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, err: BadRequest):
        return JSONResponse(error_body(err.message, err.param), status_code=err.status)

    @app.exception_handler(404)
    async def not_found(request: Request, err):
        return JSONResponse(error_body(f"no route {request.method} {request.url.path}", kind="not_found_error"), 404)

    @app.exception_handler(405)
    async def not_allowed(request: Request, err):
        return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}"), 405)

    @app.get("/health")
    async def health():
        return {"status": "draining" if state.draining else "ok", "model": state.model_id, **state.loop.load()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": int(state.started),
                                            "owned_by": "lit_mistral"}]}

    async def run(request: Request, kind: str):
        body = parse(await request.body(), kind)
        ids = prompt_ids(state, body, kind)
        job = start(state, body, ids)
        made, rid = int(time.time()), f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": made,
                "model": state.model_id}
        if not body.get("stream"):
            try:
                text = "".join([piece async for piece in job.pieces(request)])
            except RuntimeError as err:
                return JSONResponse(error_body(f"generation failed: {err}", kind="server_error"), status_code=500)
            if job.finish is None:  # the client left
                return JSONResponse(error_body("client disconnected"), status_code=499)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
                      if kind == "chat" else {"index": 0, "text": text, "logprobs": None})
            return {**base, "choices": [{**choice, "finish_reason": job.finish}], "usage": job.usage()}
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base["object"] = "chat.completion.chunk" if kind == "chat" else "text_completion"
        return StreamingResponse(events(job, base, kind, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, "completion")

    return Gate(app, state, max_request_bytes)


def prompt_ids(state: ServerState, body: dict, kind: str) -> list[int]:
    """The prompt's token ids: chat messages rendered as training rendered them; a completion's instruction (+
    context) under the prompt style, its raw text, or its token ids."""
    if kind == "chat":
        if body.get("messages") is None:
            raise BadRequest("messages: required", "messages")
        return state.prompter.messages(body["messages"])
    if body.get("instruction") is not None:
        if body.get("prompt") is not None:
            raise BadRequest("give prompt or instruction (+ context), not both", "prompt")
        return state.prompter.instruction(body["instruction"], body.get("context") or "")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, str) and prompt:
        return state.prompter.text(prompt)
    raise BadRequest("prompt: expected a non-empty string, a list of one, or a list of token ids (or instruction + "
                     "context)", "prompt")


async def events(job, base: dict, kind: str, usage: bool):
    """A streamed answer as server-sent events in OpenAI's chunk format: the role first (chat), each piece of text,
    the finish reason, the usage if asked, then `[DONE]`; a failure mid-stream as an error event."""
    def chunk(piece: str | None, finish: str | None = None, role: bool = False) -> str:
        if kind == "chat":
            delta = ({"role": "assistant", "content": ""} if role else {} if piece is None else {"content": piece})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'choices': [choice], **({'usage': None} if usage else {})})}\n\n"

    # a text chunk is the same JSON but for its text: rendered once around a placeholder, each piece put in its place
    before, after = chunk("\0").split(json.dumps("\0"))
    if kind == "chat":
        yield chunk(None, role=True)
    try:
        async for piece in job.pieces():
            yield before + json.dumps(piece) + after
    except RuntimeError as err:
        yield f"data: {json.dumps(error_body(f'generation failed: {err}', kind='server_error'))}\n\n"
        return
    yield chunk(None, job.finish)
    if usage:
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': job.usage()})}\n\n"
    yield "data: [DONE]\n\n"


def serve(state: ServerState, host: str, port: int, max_request_bytes: int, grace_period: float) -> None:
    """Serve until SIGTERM or Ctrl+C: then no new requests (new connections refused, new requests on open ones a
    503), those in flight finish (up to `grace_period` seconds, then they are cut), and this returns."""
    import uvicorn

    class Server(uvicorn.Server):
        def capture_signals(self):  # uvicorn's raises the signal again once shut down: the exit status would be 143
            import contextlib

            @contextlib.contextmanager
            def capturing():
                def stop(sig, frame):
                    if self.should_exit and sig == signal.SIGINT:
                        self.force_exit = True
                    state.draining, self.should_exit = True, True
                    log.warning("lit_mistral serve: %s received: finishing the requests in flight (up to %ss), "
                                "taking no new ones.", signal.Signals(sig).name, grace_period)
                previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)
            return capturing()

    config = uvicorn.Config(build_app(state, max_request_bytes), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=max(1, round(grace_period)), access_log=False)
    server = Server(config)
    print(f"lit_mistral serve: {state.model_id} on http://{host}:{port}/v1 (OpenAI API; "
          f"{'API key required' if state.api_key else 'no API key'}; GET /health)", flush=True)
    try:
        server.run()
    finally:
        state.loop.close(timeout=5)
    print("lit_mistral serve: stopped.", flush=True)


def api_key_from(given: str | None) -> str | None:
    """`--api_key`, else $LIT_MISTRAL_API_KEY, else None (no key asked)."""
    return given if given is not None else os.environ.get(API_KEY_ENV) or None
