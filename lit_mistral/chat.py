"""`python -m lit_mistral chat`: talk to the model in the terminal, on the same engine loop as `serve`.

Each line typed (or piped in: one turn per line) is a user turn; the answer streams as it is generated. The
conversation is kept across turns, rendered as training rendered conversations, and its oldest exchanges are dropped
(with a notice) when it no longer fits. `/reset` starts over, `/exit` (or Ctrl+D, or the pipe's end) quits, Ctrl+C
stops the answer being written, not the chat. Answers go to stdout, notices to stderr, so a piped chat's output is
its answers, one after the other."""

import queue
import sys
from typing import TextIO

from lit_mistral.generation.session import Answer, Sampling
from lit_mistral.serving import BadRequest, Prompter, TextStream, limits

HELP = "(/reset clears the conversation, /exit quits; Ctrl+C stops an answer)"


class Chat:
    """A conversation with the model behind `loop` (an `EngineLoop`)."""

    def __init__(self, loop, prompter: Prompter, tokenizer, model, generation, system: str | None = None,
                 out: TextIO | None = None, notices: TextIO | None = None) -> None:
        self.loop, self.prompter, self.tokenizer, self.model = loop, prompter, tokenizer, model
        self.max_new = generation.max_new_tokens
        self.sampling = (Sampling(generation.temperature, generation.top_p, generation.top_k, generation.seed)
                         if generation.do_sample else None)
        # the streams of the moment (not of import time): a caller may have replaced sys.stdout
        self.system, self.out, self.notices = system, out or sys.stdout, notices or sys.stderr
        self.history: list[dict] = []

    def notice(self, text: str) -> None:
        print(text, file=self.notices, flush=True)

    def prompt(self, user: str) -> list[int] | None:
        """The prompt ids of the conversation with `user` appended, the oldest exchanges dropped until it fits
        (None, said, when even the new turn alone does not)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        dropped = 0
        context = getattr(self.model.config, "max_position_embeddings", None) or 1 << 62
        while True:
            ids = self.prompter.messages(head + self.history + [{"role": "user", "content": user}])
            fits = self.loop.problems(ids, self.max_new) is None and len(ids) + self.max_new <= context
            if fits or not self.history:
                break
            self.history = self.history[2:]  # the oldest user turn and its answer
            dropped += 1
        if dropped:
            self.notice(f"(the conversation no longer fit: dropped its {dropped} oldest exchange"
                        f"{'s' if dropped > 1 else ''}; {limits(self.model, self.loop)})")
        if not fits:
            self.notice(f"(this message is {len(ids)} tokens: with up to {self.max_new} new ones it does not fit; "
                        f"{limits(self.model, self.loop)}. Send a shorter one.)")
            return None
        return ids

    def answer(self, ids: list[int]) -> str:
        """Stream the answer to `ids` to `out`; Ctrl+C stops it (what was written is kept). Returns its text."""
        tokens: queue.SimpleQueue = queue.SimpleQueue()
        stream, text, key = TextStream(self.tokenizer), "", None
        try:
            key = self.loop.submit(ids, self.max_new, self.sampling, tokens.put, tokens.put)
            while True:
                try:
                    item = tokens.get(timeout=0.1)  # a timed wait lets Ctrl+C through
                except queue.Empty:
                    continue
                piece = stream.finish() if isinstance(item, Answer) else stream.feed(item)
                if not text:
                    piece = piece.lstrip()  # the turn's header often leaves the answer a leading space or newline
                text += piece
                self.out.write(piece)
                self.out.flush()
                if isinstance(item, Answer):
                    if item.finish.startswith("error"):
                        self.notice(f"(generation failed: {item.finish})")
                    break
        except KeyboardInterrupt:
            if key is not None:
                self.loop.cancel(key)
            self.notice("\n(stopped)")
        self.out.write("\n")
        self.out.flush()
        return text.strip()

    def turn(self, line: str) -> bool:
        """Handle one line; False once the chat should end."""
        line = line.strip()
        if not line:
            return True
        if line == "/exit":
            return False
        if line == "/reset":
            self.history = []
            self.notice("(conversation cleared)")
            return True
        try:
            ids = self.prompt(line)
        except BadRequest as err:
            self.notice(f"({err.message})")
            return True
        if ids is not None:
            self.history += [{"role": "user", "content": line}, {"role": "assistant", "content": self.answer(ids)}]
        return True

    def run(self, lines: TextIO | None = None) -> None:
        """Read turns from `lines` (default: stdin) until /exit or its end."""
        lines = lines or sys.stdin
        interactive = lines.isatty()
        if interactive:
            self.notice(HELP)
        while True:
            try:
                line = input("> ") if interactive else lines.readline()
            except KeyboardInterrupt:
                self.notice(f"\n{HELP}")
                continue
            except EOFError:
                break
            if not interactive and not line:  # the pipe's end
                break
            try:
                if not self.turn(line):
                    break
            except KeyboardInterrupt:  # before the answer began (its own Ctrl+C stops the answer)
                self.notice("\n(stopped)")
