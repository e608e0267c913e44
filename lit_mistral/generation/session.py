"""The bookkeeping of one stream of prompts through the engine: which prompts wait, which rows run in which slot
with which cache blocks, how each row's next token is picked, and when a row finishes.

Kept apart from `engine.py`, which owns the model's forward, the paged KV cache and the CUDA graphs: a `Session`
decides what runs next and the `Engine` runs it. A serving loop and `predict` each keep one session open across
calls, so prompts added later fill the rows that free up."""

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lit_mistral.generation.sampling import sample

if TYPE_CHECKING:
    from lit_mistral.generation.engine import Engine


@dataclass
class Answer:
    """One prompt's answer: the generated token ids (without the EOS token) and why generation stopped:
    "eos" (the model emitted an EOS token) or "length" (max_new_tokens were generated)."""

    tokens: list[int]
    finish: str


@dataclass
class _Row:
    index: int  # the prompt's key: its position in the input (also what seeds its sampling)
    slot: int  # the row's line of the block table
    blocks: list[int]
    position: int  # where the token fed next (the last of `tokens`) goes in the cache: tokens cached so far
    max_new: int
    tokens: list[int]
    prompt: Sequence[int] = ()
    sampling: "Sampling | None" = None  # the row's own; None: the session's


@dataclass(frozen=True)
class Sampling:
    """One prompt's own sampling (a served request's): temperature 0 is greedy. Its answer depends on these and on
    its prompt only, whatever rows share its batch (the seed keys the noise, not the prompt's key)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


class Session:
    """One stream of prompts through an `Engine`: prompts are added in portions (`add`), and `run` answers them,
    returning each prompt's answer as it finishes; rows keep running between calls, so the next portion fills the
    rows that free up (what `predict` does with each batch of its dataloader). Sampling settings hold for the
    session; a prompt's key (its index in the input) seeds its sampling, so answers do not depend on the portions.

    Rows that free up are refilled in batches of `Engine.refill_rows` prompts (each prefill reads all the weights,
    as a decoding step does). `patience` is for prompts that arrive one at a time (a server's requests): fewer than
    `refill_rows` are prefilled once the first of them has waited `patience` decoding steps and the last prefill is
    as many steps back, where otherwise each arrival, or under a full load each row that frees up, would be a
    prefill of its own. None (predict): prompts come in portions, and the last few of the queue go at once."""

    def __init__(self, engine: "Engine", eos_token_ids: int | Sequence[int] | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 patience: int | None = None) -> None:
        self.engine = engine
        self.patience = patience
        self.eos = {eos_token_ids} if isinstance(eos_token_ids, int) else set(eos_token_ids or ())
        self.sampling = (do_sample, temperature, top_p, top_k, seed)
        # (key, prompt, max_new, its own sampling or None, the decoding steps run when it was added), in order
        self.waiting: deque[tuple[int, Sequence[int], int, Sampling | None, int]] = deque()
        self.running: dict[int, _Row] = {}  # slot -> row, in starting order
        self.free_slots = list(range(engine.max_rows - 1, -1, -1))
        self.free_blocks = list(range(engine.num_blocks - 1, 0, -1))
        self.filling = False
        self._prefilled_at = -(patience or 0)  # counts["steps"] at the last prefill
        self.counts = {"steps": 0, "rows": 0, "prefills": 0, "prompt_tokens": 0}  # rows: summed over the steps

    def describe(self) -> str:
        """The stream so far in numbers: decoding steps and their mean rows, prefills and their prompt tokens."""
        c = self.counts
        return (f"{c['steps']} decoding steps of {c['rows'] / max(1, c['steps']):.0f} rows on average (of "
                f"{self.engine.max_rows}), {c['prefills']} prefills of {c['prompt_tokens'] / max(1, c['prefills']):.0f}"
                " prompt tokens on average")

    def add(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int], keys: Sequence[int],
            sampling: Sequence[Sampling | None] | None = None) -> None:
        """Queue prompts (checked with `Engine.problems` by the caller) under their keys, each with its own
        `sampling` if given (None: the session's)."""
        self.engine._check(prompts, max_new_tokens)
        self.waiting.extend((key, prompt, new, own, self.counts["steps"]) for key, prompt, new, own in
                            zip(keys, prompts, max_new_tokens, sampling or [None] * len(prompts)))

    def cancel(self, key: int) -> bool:
        """Drop the prompt of `key`: out of the queue, or out of its row, whose slot and cache blocks are free for
        the next step. False if it is neither waiting nor running (finished already)."""
        for i, (waiting, *_) in enumerate(self.waiting):
            if waiting == key:
                del self.waiting[i]
                return True
        row = next((r for r in self.running.values() if r.index == key), None)
        if row is None:
            return False
        self._free(row)
        return True

    def load(self) -> dict[str, int]:
        """What the engine holds now: rows running and free, prompts waiting, cache blocks free and in all."""
        return {"running_rows": len(self.running), "free_rows": len(self.free_slots), "waiting": len(self.waiting),
                "free_blocks": len(self.free_blocks), "total_blocks": self.engine.num_blocks - 1}

    def _free(self, row: _Row) -> None:
        del self.running[row.slot]
        self.free_slots.append(row.slot)
        self.free_blocks.extend(row.blocks)

    def _pick(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        do_sample, temperature, top_p, top_k, seed = self.sampling
        session = Sampling(temperature, top_p, top_k, seed) if do_sample else None
        own = [row.sampling or session for row in rows]
        if all(s is None or s.temperature == 0 for s in own):
            return logits.argmax(-1).tolist()
        picked = logits.argmax(-1)
        groups: dict[Sampling, list[int]] = {}  # rows that sample alike: one call each (served rows mostly share)
        for i, s in enumerate(own):
            if s is not None and s.temperature > 0:
                groups.setdefault(s, []).append(i)
        for s, members in groups.items():
            # a session's prompt is keyed by its index; a row with its own sampling by its seed alone
            keys = torch.tensor([[0 if rows[i].sampling else rows[i].index, len(rows[i].tokens)] for i in members],
                                device=self.engine.device).T
            index = torch.tensor(members, device=logits.device)
            picked[index] = sample(logits[index], s.seed, keys[0], keys[1], s.temperature, s.top_k, s.top_p)
        return picked.tolist()

    @torch.inference_mode()  # as Lightning predicts; the cache pools are inference tensors whatever the caller's mode
    def run(self, starve: int = 0, on_finish: Callable[[int, Answer], None] | None = None) -> list[tuple[int, Answer]]:
        """Decode until every queued prompt is answered, or, with `starve` > 0, until fewer than `starve` prompts
        wait (add more, then run again). Returns `(key, answer)` of the prompts that finished, in finishing order;
        `on_finish(key, answer)` is called as each finishes."""
        done = []
        with self.engine._prepare():
            while (self.waiting or self.running) and not (starve and len(self.waiting) < starve):
                done += self.step(on_finish)
        return done

    def step(self, on_finish: Callable[[int, Answer], None] | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[tuple[int, Answer]]:
        """One round: waiting prompts that have a free row and the blocks for their whole answer are prefilled (in
        large batches: see `Engine.refill_rows`), then the running rows decode one token. Returns `(key, answer)` of
        the prompts that finished in it; `on_token(key, token)` is called for each token kept (not an EOS) and
        `on_finish` as each finishes. Call it inside `torch.inference_mode()` and `engine._prepare()` (`run` does;
        a serving loop enters them once)."""
        engine, done = self.engine, []

        def finish(row: _Row, reason: str) -> None:
            self._free(row)
            done.append((row.index, Answer(row.tokens, reason)))
            if on_finish is not None:
                on_finish(*done[-1])

        def take(rows: list[_Row], tokens: list[int]) -> None:
            for row, token in zip(rows, tokens):
                if token not in self.eos:
                    row.tokens.append(token)
                    if on_token is not None:
                        on_token(row.index, token)
                if token in self.eos or len(row.tokens) == row.max_new:
                    finish(row, "eos" if token in self.eos else "length")

        # the waiting prompts, in order, that have a free row and the blocks for their whole answer
        ready, spare = 0, len(self.free_blocks)
        for _, prompt, new, *_ in self.waiting:
            need = engine._blocks_needed(len(prompt), new)
            if ready == len(self.free_slots) or need > spare:
                break
            ready, spare = ready + 1, spare - need
        # refill in large batches (each prefill reads all weights), unless few rows are running
        if self.patience is None:
            batch = self.filling or ready >= min(engine.refill_rows, len(self.waiting))
        else:  # a fill cut short by the prefill budget goes on; else a batch, or a late prompt and a late prefill
            steps = self.counts["steps"]
            batch = self.filling or ready >= engine.refill_rows or (
                ready > 0 and steps - self.waiting[0][4] >= self.patience
                and steps - self._prefilled_at >= self.patience)
        self.filling = ready > 0 and (batch or len(self.running) < engine.refill_rows)
        if self.filling:
            started, budget = [], engine.prefill_tokens
            while len(started) < ready and (not started or len(self.waiting[0][1]) <= budget):
                key, prompt, new, sampling, _ = self.waiting.popleft()
                budget -= len(prompt)
                blocks = [self.free_blocks.pop() for _ in range(engine._blocks_needed(len(prompt), new))]
                started.append(_Row(key, self.free_slots.pop(), blocks, len(prompt), new, [], prompt, sampling))
                self.running[started[-1].slot] = started[-1]
            self.counts["prefills"] += 1
            self._prefilled_at = self.counts["steps"]
            self.counts["prompt_tokens"] += sum(len(r.prompt) for r in started)
            take(started, self._pick(engine._prefill(started), started))
            if self.patience is not None:
                self.filling = len(started) < ready
        if self.running:
            rows = list(self.running.values())
            self.counts["steps"] += 1
            self.counts["rows"] += len(rows)
            logits = engine._decode(rows)
            for row in rows:
                row.position += 1  # the fed token is in the cache now
            take(rows, self._pick(logits, rows))
        return done
