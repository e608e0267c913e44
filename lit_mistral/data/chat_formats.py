"""Chat formats: how a checked `Conversation` becomes token ids, with loss on the assistant turns only.

- `mistral`: `<s>[INST] {user} [/INST] {assistant}</s>[INST] {user2} [/INST] {assistant2}</s>`, a system turn put
  before the first user message with a blank line after it (as Mistral's own templates do);
- `chat_template`: the tokenizer's own Jinja chat template, or one given as a string (ChatML, Llama-3, ...).

`encode(conversation)` gives an `Encoded`: the ids and one [start, end) token span per assistant turn, holding that
turn's tokens and the token that closes it (`</s>`, `<|im_end|>`, `<|eot_id|>`: whatever the format ends a turn
with) and nothing else: not the system or user text, not the assistant header. `prompt_ids` of a conversation that
ends with a user turn is, token for token, what `encode` puts before the answer to that turn, so a model is prompted
at prediction exactly as it was trained.

A dataset item is `(encoded.ids, encoded.spans, index)`, as for instruction examples (`tokenize.py`), and batches
are collated alike (`batching.py`: labels inside the spans, IGNORE_INDEX elsewhere). `fit_conversations` applies
`max_length`.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from lightning.pytorch.utilities import rank_zero_warn

from lit_mistral.data.conversations import Conversation
from lit_mistral.errors import LitMistralError

IGNORE_INDEX = -100  # label of tokens that carry no loss (system and user turns, headers, padding)


class BadConversation(LitMistralError):
    """What is wrong with one conversation (its message starts with its `where`): collected, not fatal at once."""


@dataclass
class Encoded:
    """One tokenized conversation: `ids` and, for each assistant turn in order, the [start, end) range of `ids`
    that carries loss (the turn's tokens and the token closing it)."""

    ids: list[int]
    spans: list[tuple[int, int]]
    where: str = ""
    index: int = 0  # the conversation's position in the list it was encoded from

    def labels(self) -> list[int]:
        """`ids` inside the spans, IGNORE_INDEX elsewhere; aligned with `ids` (the model shifts them)."""
        labels = [IGNORE_INDEX] * len(self.ids)
        for start, end in self.spans:
            labels[start:end] = self.ids[start:end]
        return labels

    def truncated(self, max_length: int) -> "Encoded | None":
        """Whole turns from the start up to the last assistant turn that ends within `max_length` tokens; None when
        the first assistant turn does not fit."""
        spans = [span for span in self.spans if span[1] <= max_length]
        if not spans:
            return None
        return Encoded(self.ids[: spans[-1][1]], spans, self.where, self.index)


class ChatFormat:
    """Turns a `Conversation` into an `Encoded` (training) or prompt ids (prediction)."""

    name: ClassVar[str]

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {})
        self.special_ids = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
        self.special_texts = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if t.special}

    def encode(self, conversation: Conversation) -> Encoded:
        raise NotImplementedError

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        """The ids that prompt the model for the next assistant turn of `conversation` (which ends with a user turn)."""
        raise NotImplementedError

    @staticmethod
    def _check_prompt(conversation: Conversation) -> None:
        if conversation.messages[-1].role != "user":
            raise LitMistralError(f"{conversation.where}: a prompt must end with a user turn (the model writes the "
                                  f"next assistant turn), not a {conversation.messages[-1].role} turn.")


class MistralFormat(ChatFormat):
    """The `[INST]` format over several turns, tokenized piece by piece as Mistral's reference tokenizer
    (mistral-common) does: each `[INST] ... [/INST]` and each answer on its own, so every `[INST]` begins with '▁['
    (after `<s>` and after `</s>` alike) and a one-turn conversation gets exactly the ids of `prompt_style: mistral`.
    (Tokenizing the whole rendered string gives '[' after `<s>` and `</s>` with the fast tokenizer.) Spans are known
    from the pieces' lengths. Text in the data that spells a special token ("</s>") stays text."""

    name = "mistral"

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise LitMistralError("prompt_style 'mistral' needs a tokenizer with BOS and EOS tokens, and this one "
                                  "lacks one. Fix: use prompt_style 'chat_template'.")
        if "[INST]" in self.special_texts:
            raise LitMistralError("prompt_style 'mistral' writes [INST] as text, but this tokenizer has it as a "
                                  "special token (Mistral v0.3 and later). Fix: use prompt_style 'chat_template', "
                                  "the tokenizer's own template.")

    def _text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _build(self, conversation: Conversation) -> Encoded:
        messages = conversation.messages
        system = messages[0].content if messages[0].role == "system" else None
        ids, spans = [self.tokenizer.bos_token_id], []
        for message in messages[1 if system is not None else 0:]:
            if message.role == "user":
                user = message.content if system is None else f"{system}\n\n{message.content}"
                system = None  # only the first user turn carries it
                ids += self._text(f"[INST] {user} [/INST]")
            else:
                start = len(ids)
                ids += self._text(f" {message.content}") + [self.tokenizer.eos_token_id]
                spans.append((start, len(ids)))
        return Encoded(ids, spans, conversation.where)

    def encode(self, conversation: Conversation) -> Encoded:
        return self._build(conversation)

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        self._check_prompt(conversation)
        return self._build(conversation).ids


class TemplateFormat(ChatFormat):
    """A Jinja chat template (the tokenizer's own, or `template`), with loss on assistant turns only.

    An assistant turn's characters in the full rendering run from the end of the conversation rendered up to it
    with the generation prompt (which ends with the assistant header) to the end of the conversation rendered up to
    and including it; the fast tokenizer's offsets map them to tokens. The labels run from the first token after the
    prompt to the first special token in the turn, the one closing it (a newline the template writes after it is
    not labelled). Checked on every turn: the renderings are prefixes of the full one (else the template is not
    prefix-stable and turns cannot be located), the prompt alone tokenizes to the tokens before the turn, a special
    token closes the turn, and the text labelled is the answer (up to surrounding whitespace)."""

    name = "chat_template"

    PROBE = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]

    def __init__(self, tokenizer, template: str | None = None, source: str | None = None) -> None:
        super().__init__(tokenizer)
        # where the template comes from, for its errors: the file given, or the tokenizer's own
        self.source = source or f"the chat template of the tokenizer {getattr(tokenizer, 'name_or_path', '')!r}"
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise LitMistralError("prompt_style 'chat_template' needs a chat template, and this tokenizer has none. "
                                  "Fix: give a template (e.g. read from a .jinja file), or use prompt_style 'mistral'.")
        if not getattr(tokenizer, "is_fast", False):
            raise LitMistralError("prompt_style 'chat_template' locates turns with token offsets, which only fast "
                                  "tokenizers give. Fix: load the tokenizer with use_fast=True.")
        self.template = template
        # the BOS the tokenizer adds on its own, kept unless the rendering starts with the BOS text (templates that
        # write it themselves); anything else it adds (an EOS at the end) has no place in a chat
        probe = tokenizer("a")["input_ids"]
        self._adds_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
        longest_first = sorted(self.special_texts, key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None
        # rendered once before the data: a template that cannot render the simplest conversation is broken, and
        # one error naming it beats every conversation "refused"
        for messages, generation in ((self.PROBE, False), (self.PROBE[:1], True)):
            self.render(messages, generation)

    def template_error(self, err: Exception, where: str) -> LitMistralError:
        """The template's own error (bad Jinja, or an expression that fails), naming the template and its line."""
        import jinja2

        line = err.lineno if isinstance(err, jinja2.TemplateSyntaxError) else None
        tb = err.__traceback__
        while tb is not None:  # jinja maps the rendering's frames to the template's lines, in a file "<template>"
            if tb.tb_frame.f_code.co_filename == "<template>":
                line = tb.tb_lineno
            tb = tb.tb_next
        message = getattr(err, "message", None) or str(err) or type(err).__name__
        at = f", line {line}" if line is not None else ""
        return LitMistralError(f"{self.source}{at}: the Jinja template fails ({type(err).__name__}: {message}) "
                               f"when rendering {where}. Fix: correct the template, or use prompt_style 'mistral'.")

    def render(self, messages: list[dict], generation: bool, where: str = "") -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation)
        except Exception as err:
            import jinja2

            if not where or type(err) is not jinja2.TemplateError:  # not a refusal (raise_exception): broken
                raise self.template_error(err, f"the conversation at {where}" if where else
                                          "a user turn and an assistant turn") from None
            raise BadConversation(f"{where}: the chat template refuses this conversation ({err}); a template "
                                  "without a system role, for one, refuses system turns") from None

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]
        if self._adds_bos and not text.startswith(self.tokenizer.bos_token):
            ids, offsets = [self.tokenizer.bos_token_id] + ids, [(0, 0)] + offsets
        return ids, offsets

    def _check_text(self, conversation: Conversation) -> None:
        """Text spelling a special token would become that token once rendered (the template's own specials are
        text too): an answer would seem to end early, or a user could close the turn."""
        for i, message in enumerate(conversation.messages):
            found = self._special_text.search(message.content) if self._special_text else None
            if found:
                raise BadConversation(f"{conversation.where}: turn {i} ({message.role}) contains {found.group()!r}, "
                                      "the text of a special token, which the rendered template would turn into the "
                                      "token itself; remove it (prompt_style 'mistral' keeps such text as text)")

    def encode(self, conversation: Conversation) -> Encoded:
        where, messages = conversation.where, conversation.as_dicts()
        self._check_text(conversation)
        full = self.render(messages, False, where)
        ids, offsets = self._tokenize(full)
        spans = []
        for i, message in enumerate(conversation.messages):
            if message.role != "assistant":
                continue
            before, after = self.render(messages[:i], True, where), self.render(messages[: i + 1], False, where)
            if not (after.startswith(before) and full.startswith(after)):
                raise LitMistralError(
                    f"{where}: the chat template is not prefix-stable: the conversation rendered up to turn {i} "
                    "is not the start of the whole conversation rendered, so assistant turns cannot be located "
                    "for loss masking (templates that render the last turn differently, or drop earlier turns' "
                    "reasoning, do this). Fix: give a template that renders each turn the same wherever it stands, "
                    "or use prompt_style 'mistral'.")
            prompt = self._tokenize(before)[0]
            start = len(prompt)
            if ids[:start] != prompt:
                raise BadConversation(
                    f"{where}: the tokenizer joins the end of the prompt with the start of assistant turn {i} "
                    f"({full[len(before) - 8 : len(before) + 8]!r}), so the prompt at prediction would not be the "
                    "tokens trained on; strip the leading whitespace of that turn")
            close = start  # the first special token that starts inside the turn closes it
            while close < len(ids) and offsets[close][0] < len(after) and ids[close] not in self.special_ids:
                close += 1
            if close == len(ids) or offsets[close][0] >= len(after):
                raise LitMistralError(
                    f"{where}: the chat template ends assistant turns with no special token "
                    f"({full[len(before) : len(after)][-40:]!r}), so the model would not learn to end its turn. "
                    "Fix: use a template that closes assistant turns with the EOS or an end-of-turn token, or "
                    "prompt_style 'mistral'.")
            answer = full[len(before) : offsets[close][0]]
            if answer.strip() != message.content.strip():
                raise LitMistralError(
                    f"{where}: the chat template renders assistant turn {i} as {full[len(before) : len(after)][:80]!r}"
                    ": the labels, from the end of the generation prompt to the first special token in the turn "
                    f"({self.tokenizer.convert_ids_to_tokens(ids[close])!r}), would be {answer[:40]!r}, not the "
                    f"answer {message.content[:40]!r}. Fix: use a template whose generation prompt "
                    "(add_generation_prompt) writes the whole assistant header and that renders answers as they are, "
                    "or prompt_style 'mistral'.")
            spans.append((start, close + 1))
        return Encoded(ids, spans, where)

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        self._check_prompt(conversation)
        self._check_text(conversation)
        return self._tokenize(self.render(conversation.as_dicts(), True, conversation.where))[0]


CHAT_FORMATS: dict[str, type[ChatFormat]] = {cls.name: cls for cls in (MistralFormat, TemplateFormat)}


def chat_format(name: str, tokenizer, template: str | None = None, source: str | None = None) -> ChatFormat:
    """The chat format registered under `name`; `template` (a Jinja string, read from `source`) replaces the
    tokenizer's own."""
    if name not in CHAT_FORMATS:
        raise LitMistralError(f"data.prompt_style: unknown style for conversations {name!r}. "
                              f"Fix: use one of {', '.join(sorted(CHAT_FORMATS))}.")
    if name == TemplateFormat.name:
        return TemplateFormat(tokenizer, template, source)
    if template is not None:
        raise LitMistralError(f"data.chat_template: a chat template was given with prompt_style {name!r}, which has "
                              "its own. Fix: use prompt_style 'chat_template' with it, or drop the template.")
    return CHAT_FORMATS[name](tokenizer)


def encode_conversations(conversations: Sequence[Conversation], fmt: ChatFormat) -> tuple[list[Encoded], list[str]]:
    """Encode every conversation; the problems of those that cannot be ("{where}: ..."), for the caller to raise
    together or skip. A template that cannot work at all raises at once."""
    encoded, problems = [], []
    for i, conversation in enumerate(conversations):
        try:
            encoded.append(fmt.encode(conversation))
        except BadConversation as err:
            problems.append(str(err))
            continue
        encoded[-1].index = i
    return encoded, problems


def fit_conversations(encoded: Sequence[Encoded], max_length: int, overlong: Literal["drop", "truncate"] = "drop",
                      key: str = "data.path") -> tuple[list[Encoded], dict[str, int]]:
    """Apply `max_length`: drop longer conversations, or truncate them at a turn boundary (`Encoded.truncated`;
    dropped if even the first answer does not fit). Returns the kept ones and the counts {"kept", "truncated",
    "dropped"} ("kept" includes "truncated"), which are also logged."""
    kept, truncated, dropped = [], 0, 0
    for item in encoded:
        if len(item.ids) <= max_length:
            kept.append(item)
            continue
        cut = item.truncated(max_length) if overlong == "truncate" else None
        if cut is None:
            dropped += 1
        else:
            kept.append(cut)
            truncated += 1
    if dropped:
        rank_zero_warn(f"{key}: dropped {dropped} of {len(encoded)} conversations longer than data.max_length="
                       f"{max_length} tokens (data.overlong={overlong}"
                       f"{'; their first answer does not fit' if overlong == 'truncate' else ''}).")
    if truncated:
        rank_zero_warn(f"{key}: cut {truncated} of {len(encoded)} conversations after their last assistant turn "
                       f"that fits in data.max_length={max_length} tokens (data.overlong=truncate).")
    if not kept:
        raise LitMistralError(f"{key}: every conversation is longer than data.max_length={max_length} tokens. "
                              "Fix: raise --data.max_length.")
    return kept, {"kept": len(kept), "truncated": truncated, "dropped": dropped}
