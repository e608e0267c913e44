"""Multi-turn conversations: reading and checking rows before any model loads.

Two shapes, one per file (or dataset), detected from the fields its rows have or forced with `format`:

- `messages` (OpenAI): `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`;
- `sharegpt`: `{"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}`
  (`user` and `assistant` are accepted as `from` too).

Both become a `Conversation` of `Message`s with the roles system/user/assistant. The caller reads the files and
passes `(where, row)` pairs; every problem found is returned as a `"{where}: ..."` string, so that the caller can
raise them all in one error (`errors.raise_problems`) or leave the bad rows out.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from lit_mistral.errors import LitMistralError

ConversationFormat = Literal["messages", "sharegpt"]


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class Conversation:
    """One checked conversation: an optional system turn, then user/assistant turns alternating from a user turn."""

    messages: list[Message]
    where: str = ""  # "file.jsonl:12" or "hub-id[7]": named in every error about this conversation
    category: str | None = None
    max_new_tokens: int | None = None  # a predict input's own answer limit (within the settings')

    def as_dicts(self) -> list[dict[str, str]]:
        """The messages as chat templates take them."""
        return [{"role": m.role, "content": m.content} for m in self.messages]

    # what evaluation and predictions show of any input: the question asked last, and the answer to it if given

    @property
    def instruction(self) -> str:
        return next(m.content for m in reversed(self.messages) if m.role == "user")

    context = ""

    @property
    def response(self) -> str | None:
        return self.messages[-1].content if self.messages[-1].role == "assistant" else None

    def cut(self, chars: int) -> "Conversation":
        """The conversation's first `chars` characters of text: the turn where they run out is cut there and the
        turns after it are left out (a conversation that ends with a user turn, a prompt, still does: with an
        empty one when the cut falls before it)."""
        messages, left = [], chars
        for m in self.messages:
            if left <= 0:
                break
            messages.append(Message(m.role, m.content[:left]))
            left -= len(m.content)
        if self.messages[-1].role == "user" and messages[-1].role != "user":
            messages.append(Message("user", ""))
        return Conversation(messages, self.where, self.category, self.max_new_tokens)

    def without_answer(self) -> "Conversation":
        """The conversation up to its last user turn (what the model is asked to continue)."""
        end = max(i for i, m in enumerate(self.messages) if m.role == "user") + 1
        return Conversation(self.messages[:end], self.where, self.category, self.max_new_tokens)


@dataclass(frozen=True)
class _Shape:
    field: str  # the row's key holding the list of turns
    role_key: str
    content_key: str
    roles: dict[str, str]  # the shape's role names -> system/user/assistant


SHAPES: dict[str, _Shape] = {
    "messages": _Shape("messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "sharegpt": _Shape("conversations", "from", "value", {"system": "system", "human": "user", "user": "user",
                                                          "gpt": "assistant", "assistant": "assistant"}),
}


class ReadConversations(NamedTuple):
    conversations: list[Conversation]
    format: str | None  # the shape read ("messages" | "sharegpt"): detected or forced; None if no row shows one
    problems: list[str]  # "{where}: ..." for every bad row; the rows they name are left out of `conversations`


def detect_format(rows: Iterable[tuple[str, object]]) -> tuple[str | None, str | None]:
    """(shape, where) of the first row that has a `messages` or a `conversations` field; (None, None) if none has."""
    for where, row in rows:
        if isinstance(row, dict):
            for name, shape in SHAPES.items():
                if shape.field in row:
                    return name, where
    return None, None


def read_conversations(rows: Iterable[tuple[str, object]], format: ConversationFormat | None = None,
                       need_answer: bool = True, category_field: str | None = "category") -> ReadConversations:
    """Check every row of one file (or dataset) and turn the good ones into `Conversation`s.

    Args:
        rows: `(where, row)` pairs, `where` like "file.jsonl:12".
        format: "messages" or "sharegpt" to force a shape; None: detected from the first row with either field
            (a row of the other shape is then a problem: one file holds one shape).
        need_answer: Training (True): a conversation must end with an assistant turn, the answer to learn.
            Prediction (False): it must end with a user turn, which the model answers.
        category_field: Row key of an optional category (per-category metrics); None: no categories.
    """
    rows = list(rows)
    if format is not None and format not in SHAPES:
        raise LitMistralError(f"format={format!r}: unknown conversation format. Fix: use one of "
                              f"{', '.join(SHAPES)}, or leave it out to detect it from the rows.")
    detected, first = (format, None) if format is not None else detect_format(rows)
    conversations, problems = [], []
    for where, row in rows:
        conversation, bad = _row_to_conversation(row, where, detected, first, need_answer, category_field)
        problems += bad
        if conversation is not None:
            conversations.append(conversation)
    return ReadConversations(conversations, detected, problems)


def _expected_fields() -> str:
    return " or ".join(f"a {s.field!r} list ({name})" for name, s in SHAPES.items())


def _row_to_conversation(row, where: str, format: str | None, first: str | None, need_answer: bool,
                         category_field: str | None) -> tuple[Conversation | None, list[str]]:
    """Check one raw row; return the `Conversation` or the list of what is wrong with it."""
    if not isinstance(row, dict):
        return None, [f"{where}: expected a JSON object with {_expected_fields()}, got {type(row).__name__}"]
    if format is None:
        fields = ", ".join(repr(k) for k in list(row)[:6]) or "none"
        return None, [f"{where}: expected {_expected_fields()}; the row's fields are {fields}"]
    shape = SHAPES[format]
    if shape.field not in row:
        others = [name for name, s in SHAPES.items() if s.field in row]
        if not others and first is not None:  # the shape was detected from another row
            fields = ", ".join(repr(k) for k in list(row)[:6]) or "none"
            return None, [f"{where}: the file mixes shapes: this row has no {shape.field!r} (its fields are {fields}) "
                          f"but {first} is a conversation ({format} shape): one file must hold one shape, "
                          "instruction records or conversations"]
        if not others:
            return None, [f"{where}: field {shape.field!r} is missing"]
        other = SHAPES[others[0]].field
        if first is None:  # the shape was forced
            return None, [f"{where}: field {shape.field!r} is missing (format={format!r}); the row has {other!r}, "
                          f"the {others[0]} shape: set the format to {others[0]!r}, or leave it out to detect it"]
        return None, [f"{where}: has {other!r} ({others[0]} shape) but {first} has {shape.field!r} ({format} "
                      "shape): one file must hold one shape"]
    messages, problems = _check_turns(row[shape.field], where, shape, need_answer)
    category = row.get(category_field) if category_field else None
    if category is not None and not isinstance(category, str):
        problems.append(f"{where}: field {category_field!r} must be a string, got {type(category).__name__}")
    if problems:
        return None, problems
    return Conversation(messages, where, category), []


def _a(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


def _check_turns(turns, where: str, shape: _Shape, need_answer: bool) -> tuple[list[Message], list[str]]:
    key, role_key, content_key = shape.field, shape.role_key, shape.content_key
    if not isinstance(turns, list):
        return [], [f"{where}: {key!r} must be a list of turns, got {type(turns).__name__}"]
    if not turns:
        return [], [f"{where}: {key!r} is empty"]
    messages, raw_roles, problems = [], [], []
    for i, turn in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            problems.append(f"{at} must be an object with {role_key!r} and {content_key!r}, got {type(turn).__name__}")
            continue
        role, content = turn.get(role_key), turn.get(content_key)
        if role is None:
            problems.append(f"{at} has no {role_key!r}")
        elif not isinstance(role, str) or role not in shape.roles:
            problems.append(f"{at}: unknown {role_key} {str(role)[:40]!r}; allowed: {', '.join(shape.roles)}")
        if content is None:
            problems.append(f"{at} has no {content_key!r}")
        elif not isinstance(content, str):
            problems.append(f"{at}: {content_key!r} must be a string, got {type(content).__name__}")
        elif not content.strip():
            problems.append(f"{at}: {content_key!r} is empty")
        messages.append(Message(shape.roles.get(role, "") if isinstance(role, str) else "", content))
        raw_roles.append(role)
    if problems:
        return [], problems
    # order: an optional system turn first, then user, assistant, user, ... (a template has no place for others)
    start = 1 if messages[0].role == "system" else 0
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i].role != expected:
            return [], [f"{where}: {key}[{i}] is {raw_roles[i]!r} where {_a(expected)} turn belongs: after an "
                        "optional system turn first, turns alternate user, assistant, user, ... starting with user"]
    if start == len(messages):
        return [], [f"{where}: {key!r} has no user turn"]
    last = messages[-1].role
    if need_answer and last != "assistant":
        return [], [f"{where}: ends with a user turn; training needs an assistant turn last (the answer to learn)"]
    if not need_answer and last != "user":
        return [], [f"{where}: ends with an assistant turn; to predict, the last turn must be the user's (the model "
                    "writes the next assistant turn)"]
    return messages, []
