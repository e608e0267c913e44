"""`EngineLoop`: one continuous-batching `Session` fed by many callers at once (the requests of `serve`, the turns of
`chat`), on a thread of its own.

Written by hand: the engine's scheduling is the engine's (`Session.step`); what this adds is the hand-over between
threads. Callers `submit` a prompt with callbacks and may `cancel` it at any time; the loop takes both in between
two engine steps, so a new prompt joins the running rows at the next step, and a cancelled one (a client gone, a
stop string seen) leaves its row and cache blocks free for the next step. Callbacks run on the loop's thread: they
must only hand the token over (`Relay` into asyncio queues)."""

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lit_mistral.generation.session import Answer, Sampling, Session

log = logging.getLogger(__name__)


@dataclass
class _Job:
    prompt: Sequence[int]
    max_new: int
    sampling: Sampling | None
    on_token: Callable[[int], None]
    on_finish: Callable[[Answer], None]


class EngineLoop:
    """Runs `session` on a daemon thread until `close`.

    Args:
        session: the stream the prompts join (its engine sized for the load: rows and cache positions).
        context: what the loop's thread runs the engine in (autocast is per thread: the precision's context).
    """

    def __init__(self, session: Session, context: Callable[[], contextlib.AbstractContextManager] =
                 contextlib.nullcontext) -> None:
        self.session, self.context = session, context
        self._keys = itertools.count(1)
        self._lock = threading.Condition()
        self._new: list[tuple[int, _Job]] = []  # submitted, not yet in the session
        self._cancelled: list[int] = []
        self._jobs: dict[int, _Job] = {}  # key -> job, from its submission to its end
        self._closing = False
        self._cancelled_total = 0  # prompts ended by `cancel` while waiting or running
        self._busy = 0.0  # seconds in `session.step`
        self._load = self._snapshot()  # read by other threads: replaced whole after each step
        self._ended: list[tuple[_Job, Answer]] = []  # told once `_load` shows their rows and blocks freed
        self._thread = threading.Thread(target=self._run, name="lit_mistral-engine", daemon=True)
        self._thread.start()

    def problems(self, prompt: Sequence[int], max_new: int) -> str | None:
        """Why the engine cannot take this prompt (too long for the cache or the window), or None."""
        return self.session.engine.problems([prompt], [max_new]).get(0)

    def submit(self, prompt: Sequence[int], max_new: int, sampling: Sampling | None,
               on_token: Callable[[int], None], on_finish: Callable[[Answer], None]) -> int:
        """Queue a prompt (checked with `problems` first); returns its key. `on_token(token)` for each new token,
        then `on_finish(answer)` once (finish "eos", "length", "cancelled" or "error"), both on the loop's thread."""
        key = next(self._keys)
        with self._lock:
            if self._closing:
                raise RuntimeError("the engine loop is closed")
            self._new.append((key, _Job(prompt, max_new, sampling, on_token, on_finish)))
            self._lock.notify()
        return key

    def cancel(self, key: int) -> None:
        """Stop the prompt of `key` at the next step; its `on_finish` gets finish "cancelled" (nothing if it has
        finished already)."""
        with self._lock:
            self._cancelled.append(key)
            self._lock.notify()

    def load(self) -> dict[str, int | float]:
        """Rows running and free, prompts waiting (in the engine and submitted), cache blocks free and in all, how
        many prompts were cancelled so far, and the engine's work so far: decoding steps, rows decoded over them,
        prefills, prompt tokens prefilled, and seconds spent stepping (`busy_s`)."""
        with self._lock:
            return dict(self._load, waiting=self._load["waiting"] + len(self._new), cancelled=self._cancelled_total)

    def close(self, timeout: float | None = None) -> None:
        """Cancel what is left and stop the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(timeout)

    # ---- the loop's thread ----

    def _take_commands(self) -> bool:
        """Move submissions into the session and apply cancellations; wait while there is nothing to do. False
        once closing."""
        with self._lock:
            while not (self._new or self._cancelled or self._closing or self.session.waiting or self.session.running):
                self._lock.wait()
            new, self._new = self._new, []
            cancelled, self._cancelled = self._cancelled, []
            closing = self._closing
        if new:
            for key, job in new:
                self._jobs[key] = job
            self.session.add([j.prompt for _, j in new], [j.max_new for _, j in new], [k for k, _ in new],
                             [j.sampling for _, j in new])
        for key in cancelled + (list(self._jobs) if closing else []):
            job = self._jobs.pop(key, None)
            if job is not None:
                self.session.cancel(key)
                self._cancelled_total += 1
                self._ended.append((job, Answer([], "cancelled")))
        if self._ended:
            self._publish()
        return not closing

    def _snapshot(self) -> dict[str, int | float]:
        """The session's load and counts, and the seconds spent stepping."""
        return dict(self.session.load(), **self.session.counts, busy_s=round(self._busy, 3))

    def _publish(self) -> None:
        """Publish the session's load, then tell the prompts that ended: whoever hears of an end sees its row and
        cache blocks freed in `load()`."""
        with self._lock:
            self._load = self._snapshot()
        ended, self._ended = self._ended, []
        for job, answer in ended:
            job.on_finish(answer)

    def _finished(self, key: int, answer: Answer) -> None:
        job = self._jobs.pop(key, None)
        if job is not None:
            self._ended.append((job, answer))

    def _token(self, key: int, token: int) -> None:
        job = self._jobs.get(key)
        if job is not None:
            job.on_token(token)

    def _run(self) -> None:
        with torch.inference_mode(), self.context(), self.session.engine._prepare():
            while self._take_commands():
                started = time.perf_counter()
                try:
                    self.session.step(self._finished, self._token)
                except Exception as err:  # e.g. out of memory: the prompts in the engine fail, the loop goes on
                    log.exception("generation failed; the prompts it held end with an error")
                    held = [w[0] for w in self.session.waiting] + [r.index for r in self.session.running.values()]
                    for key in held:
                        self.session.cancel(key)
                        job = self._jobs.pop(key, None)
                        if job is not None:
                            self._ended.append((job, Answer([], f"error: {type(err).__name__}: {err}")))
                self._busy += time.perf_counter() - started
                self._publish()


class Relay:
    """Hands an `EngineLoop`'s tokens and ends over to asyncio queues in one event loop (`serve`'s requests), with
    one wake-up of the event loop per batch, not per token: a step ends with a token for every running row, and a
    `call_soon_threadsafe` for each would be a write to the event loop's wake-up pipe, and a hand-over of the GIL,
    per token."""

    def __init__(self, aloop: asyncio.AbstractEventLoop) -> None:
        self.aloop = aloop
        self._pending: list[tuple[asyncio.Queue, Any]] = []
        self._lock = threading.Lock()
        self.wakeups = 0

    def put(self, queue: asyncio.Queue, item) -> None:
        """On the engine loop's thread: `item` into `queue`, in order, at the event loop's next turn."""
        with self._lock:
            first = not self._pending
            self._pending.append((queue, item))
        if first:
            self.wakeups += 1
            self.aloop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, item in pending:
            queue.put_nowait(item)
