"""What `serve` and `chat` share: the model loaded as `predict` loads it (the config, `--ckpt_path`), one engine loop
sized for many requests, prompts rendered exactly as training rendered them, and answer text streamed as tokens
arrive, cut at stop strings."""

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lit_mistral.checkpointing import restore_adapter
from lit_mistral.data.chat_formats import chat_format
from lit_mistral.data.conversations import read_conversations
from lit_mistral.data.prompts import prompt_style
from lit_mistral.data.records import Example
from lit_mistral.data.tokenize import encode_prompts
from lit_mistral.errors import LitMistralError
from lit_mistral.generation.answering import for_inference
from lit_mistral.generation.batches import context_window
from lit_mistral.generation.engine import Engine, _sliding_window
from lit_mistral.generation.loop import EngineLoop
from lit_mistral.generation.predictor import eos_ids
from lit_mistral.generation.session import Session


class BadRequest(Exception):
    """What is wrong with one request (or one chat turn): told to its sender, who may send another."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def load_for_generation(module, ckpt_path: str | None, device: torch.device):
    """`module`'s model built for `device` with the adapter of `ckpt_path` (a .ckpt file; an adapter folder is
    already the module's `adapter_path`), made ready to generate as `predict` makes it (merged where
    `model.generation.weights` says so), in eval mode. Returns (model, tokenizer)."""
    torch.manual_seed(module.generation.seed)
    module.build(device, training=False)
    if ckpt_path is not None and Path(ckpt_path).is_file():
        restore_adapter(module, ckpt_path)
    model = for_inference(module.model, module.generation.weights, device, module.spec.compute.torch_dtype(device))
    model.config.use_cache = True
    return model.eval(), module.tokenizer


# decoding steps a request may wait for others to share its prefill, when enough rows are running that refilling waits
# for a batch (Session's `patience`): a few steps more to the first token, for fewer prefills that each read all the
# weights, as a decoding step does
PATIENCE = 4

# rows a server decodes together unless told: one for each of 256 concurrent clients, as vLLM's `max_num_seqs`.
# More rows than the cache holds cost nothing but their line of the block table: a request whose pages are not free
# waits for them, so the cache (and the memory) stays as `model.generation` sizes it. With fewer rows than clients,
# a request waits for a row to free up: its time to first token grows by whole answers (BENCHMARKS.md, Serve).
SERVE_ROWS = 256


def engine_loop(model, tokenizer, generation, max_length: int, rows: int | None = None,
                context=contextlib.nullcontext, whole_context: bool = False,
                cache_rows: int | None = None) -> EngineLoop:
    """One engine for all requests: `rows` (default `model.generation.max_rows`) rows, and the cache
    `model.generation.max_cache_tokens` says, or unset, `max_length` + `max_new_tokens` positions (with
    `whole_context`: the model's whole context, or its sliding window) for each of `cache_rows` (default: `rows`)
    rows, within the model's context. `context`: what the engine's thread runs in (the precision's autocast)."""
    ok, why = Engine.supports(model)
    if not ok:
        raise LitMistralError(f"serve and chat run on lit_mistral's generation engine, which cannot run this model: "
                              f"{why}. Fix: use predict (transformers' generate) for this model.")
    rows = rows or generation.max_rows
    window = context_window(model)
    slide = _sliding_window(model.config)
    whole = min(w for w in (window, slide, 1 << 20) if w)
    per_row = whole if whole_context else min(max_length + generation.max_new_tokens, whole)
    engine = Engine(model, max_rows=rows, max_tokens=generation.max_cache_tokens or (cache_rows or rows) * per_row,
                    cuda_graphs=generation.cuda_graphs)
    return EngineLoop(Session(engine, sorted(eos_ids(model, tokenizer)), patience=PATIENCE), context)


def warm_up(loop: EngineLoop) -> None:
    """A two-token answer before the first request (kernels compiled, the one-row CUDA graph captured)."""
    from threading import Event

    done = Event()
    token = min(loop.session.eos or {0})
    loop.submit([token], 2, None, lambda t: None, lambda a: done.set())
    done.wait()


def limits(model, loop: EngineLoop) -> str:
    """The longest prompt + answer the engine takes, in words."""
    engine = loop.session.engine
    parts = [f"the KV cache holds {(engine.num_blocks - 1) * engine.block_size} positions"]
    if context_window(model) is not None:
        parts.append(f"the model's context is {context_window(model)} tokens")
    if engine.window is not None:
        parts.append(f"its sliding window {engine.window}")
    return ", ".join(parts)


def message_text(content, where: str) -> str:
    """An OpenAI message's content as text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"{where}.content: expected a string or a list of text parts ({{'type': 'text', 'text': ...}});"
                     " other parts (images, audio) are not supported", where)


class Prompter:
    """Request inputs as token ids, formatted as training formatted them (`data.prompt_style`, `data.chat_template`):
    chat messages through the chat format of conversations, an instruction (+ context) through the prompt style of
    records (the same ids for a one-turn chat under `mistral`), or raw text tokenized as it is."""

    def __init__(self, style: str, tokenizer, template: str | None = None) -> None:
        self.tokenizer, self.style_name = tokenizer, style
        self.style = prompt_style(style, tokenizer)
        self.chat = None if style == "alpaca" else chat_format(style, tokenizer, template)

    def messages(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: expected a non-empty list of {'role', 'content'} objects", "messages")
        rows = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise BadRequest(f"messages[{i}]: expected an object with 'role' and 'content'", f"messages[{i}]")
            rows.append({"role": m.get("role"), "content": message_text(m.get("content"), f"messages[{i}]")})
        read = read_conversations([("messages", {"messages": rows})], "messages", need_answer=False)
        if read.problems:
            raise BadRequest("; ".join(read.problems), "messages")
        conversation = read.conversations[0]
        if self.chat is None:  # alpaca: one instruction, no turns
            if len(conversation.messages) != 1:
                raise BadRequest("this model was trained with data.prompt_style alpaca, which has no form for "
                                 "several turns or a system message: send one user message", "messages")
            return self.instruction(conversation.messages[0].content)
        try:
            return self.chat.prompt_ids(conversation)
        except LitMistralError as err:
            raise BadRequest(str(err).removeprefix("messages: "), "messages") from None

    def instruction(self, instruction: str, context: str = "") -> list[int]:
        return encode_prompts([Example(instruction, context)], self.style, self.tokenizer)[0]

    def text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]


@dataclass
class TextStream:
    """Answer text as token ids arrive: each `feed` returns the new text that is final (decoded in context, so a
    word's leading space survives, and not ending in half a character), held back while it could be the start of a
    stop string; `stopped` once a stop string appears (the text ends before it).

    With a fast tokenizer that does not clean up spaces after decoding, `tokenizers`' own `DecodeStream` decodes
    (one call into Rust per token, where the windows take two calls of transformers' `decode`, run on the server's
    event loop for every stream); otherwise each token's text is the decoded window's growth. `DecodeStream` refuses
    some byte-fallback tokens that do not form UTF-8 (a model can generate them; Mistral's tokenizer has 256): the
    stream then goes on with the windows, from the same place."""

    tokenizer: object
    stops: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.ids: list[int] = []
        self.text, self.sent = "", 0  # text decoded so far; how much of it was handed out
        self._prefix = self._read = 0  # ids[_prefix:_read]: the context the next piece is decoded after
        self.stopped = False
        self._stream = self._backend = None
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            try:
                from tokenizers.decoders import DecodeStream
            except ImportError:  # tokenizers before 0.21
                return
            self._stream, self._backend = DecodeStream(skip_special_tokens=True), backend

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, token)
            except Exception:  # tokenizers raises a bare Exception ("Invalid prefix encountered"): windows from here
                self._stream = None
            else:
                if piece is not None:
                    self.text += piece
                    self._prefix, self._read = self._read, len(self.ids)
                return self._release(final=False)
        self._grow(final=False)
        return self._release(final=False)

    def _grow(self, final: bool) -> None:
        """Adds the text of ids[_read:], decoded after ids[_prefix:_read]; unless `final`, not while it ends in
        half a character."""
        if self._read == len(self.ids):
            return
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if final or (len(after) > len(before) and not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def finish(self) -> str:
        """The text still held back, at the end of the answer (half a character included, as a whole decode
        shows it)."""
        if not self.stopped:
            self._grow(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stops:
            longest = max(map(len, self.stops))
            start = max(0, self.sent - longest)
            found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if found:
                self.text, self.stopped, final = self.text[:min(found)], True, True
        end = len(self.text) if final or not self.stops else max(self.sent, len(self.text) - longest + 1)
        piece, self.sent = self.text[self.sent:end], end
        return piece
