"""Tokenization with loss masking. An instruction example becomes its prompt ids (no loss) followed by its response
ids and EOS (the loss), exactly as predict will feed the prompt and expect the answer; a conversation becomes its
chat-formatted ids with loss on each assistant turn and its end-of-turn token (`chat_formats.py`). Either way an item
is `(ids, spans, index)`: the token ids, the [start, end) ranges that carry loss, and the input's position. Inputs
longer than `max_length` are dropped or cut, and counted."""

from collections.abc import Sequence
from dataclasses import replace

from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from lit_mistral.data.prompts import PromptStyle
from lit_mistral.data.records import Example
from lit_mistral.errors import LitMistralError, raise_problems

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding, example boundaries)


def longest_token(tokenizer) -> int:
    """The most characters of text one token of `tokenizer` stands for: the length of its longest vocabulary entry
    (byte-level and byte-fallback vocabularies spell a token with at least as many characters as it covers)."""
    return max(map(len, tokenizer.get_vocab()), default=1)


def encode_examples(examples: Sequence[Example], style: PromptStyle, tokenizer,
                    max_length: int | None = None) -> list[tuple[list[int], int]]:
    """Token ids of each example (prompt, response, EOS) and the number of prompt tokens.

    The prompt ids are exactly what predict feeds the model, and the rest are exactly what it must generate
    after them: the full text is tokenized once (so the response is tokenized in context), and when the tokenizer
    merges across the prompt/response boundary, the response is tokenized on its own after the prompt ids.

    With `max_length`, the work per example is bounded before tokenizing: a field longer than `max_length` tokens
    can possibly be (more characters than `max_length + 1` of the tokenizer's longest tokens) is cut there first,
    so the example still comes out longer than `max_length` (and `fit_to_length` drops or truncates it, as any
    over-long example) at the cost of a few thousand tokens, where tokenizing a 50 MB record took minutes and
    gigabytes. Its first `max_length` tokens are those of the whole record."""
    whole, examples, cut = examples, *bounded(examples, tokenizer, max_length)
    texts = [style.apply(e) for e in examples]
    special = style.add_special_tokens
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=special)["input_ids"]
    fulls = tokenizer([p + r for p, r in texts], add_special_tokens=special)["input_ids"]
    out = []
    for (prompt, response), p_ids, ids, example in zip(texts, prompts, fulls, examples):
        if ids[: len(p_ids)] != p_ids:
            ids = p_ids + tokenizer(response, add_special_tokens=False)["input_ids"]
        if len(ids) == len(p_ids) and response.strip():
            raise LitMistralError(f"{example.where}: the response tokenizes to nothing. Fix: check the record.")
        out.append((ids + [tokenizer.eos_token_id], len(p_ids)))
    for i in cut:
        if len(out[i][0]) <= max_length:  # a tokenizer whose unknown token spans a whole word: cutting says nothing
            out[i] = encode_examples([whole[i]], style, tokenizer)[0]
    return out


def bounded(items: Sequence, tokenizer, max_length: int | None) -> tuple[list, set[int]]:
    """`items` (examples or conversations) cut where they are longer than `max_length` tokens can possibly be (more
    characters than `max_length + 1` of the tokenizer's longest tokens: an example's field, a conversation's text
    in all), and the positions of those cut: what bounds the work of tokenizing an input whatever its size. A cut
    input still tokenizes to more than `max_length`, and its first `max_length` tokens are the whole input's."""
    if max_length is None:
        return list(items), set()
    limit = (max_length + 1) * longest_token(tokenizer)
    items, cut = list(items), set()
    for i, e in enumerate(items):
        if hasattr(e, "messages"):  # a conversation
            if sum(len(m.content) for m in e.messages) > limit:
                items[i] = e.cut(limit)
                cut.add(i)
        elif max(len(e.instruction), len(e.context), len(e.response or "")) > limit:
            items[i] = replace(e, instruction=e.instruction[:limit], context=e.context[:limit],
                               response=None if e.response is None else e.response[:limit])
            cut.add(i)
    return items, cut


def encode_prompts(examples: Sequence[Example], style: PromptStyle, tokenizer,
                   max_length: int | None = None) -> list[list[int]]:
    """Prompt token ids for generation: the same ids `encode_examples` puts before each response. With
    `max_length` (the most a prompt may have to be answered), fields are cut first as `bounded` says: a prompt
    longer than that comes out longer than that still, at a bounded cost, which is all generation needs to skip
    it."""
    short, cut = bounded(examples, tokenizer, max_length)
    out = tokenizer([style.apply(e)[0] for e in short], add_special_tokens=style.add_special_tokens)["input_ids"]
    for i in cut:
        if len(out[i]) <= max_length:  # a tokenizer whose unknown token spans a whole word: cutting says nothing
            out[i] = encode_prompts([examples[i]], style, tokenizer)[0]
    return out


class Filler(int):
    """A batch-plan index whose example is run but counts for nothing (all its tokens prompt, no labels, no index):
    what keeps every process's validation batch count equal."""


class TokenizedDataset(Dataset):
    """Tokenized inputs, as items `(ids, spans, index)`: `input_ids`, the `spans` that carry loss, and `index`, the
    input's position in the list it was made from."""

    def __init__(self, items: list[tuple]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        ids, spans, index = self.items[i]
        if isinstance(i, Filler):  # run to keep processes in step; counts for nothing
            return {"input_ids": ids, "spans": [], "index": None}
        return {"input_ids": ids, "spans": spans, "index": index}

    @property
    def lengths(self) -> list[int]:
        return [len(item[0]) for item in self.items]


def fit_to_length(items: list[tuple], max_length: int, overlong: str, key: str) -> list[tuple]:
    """Apply `max_length` to (ids, n_prompt, ...) items: drop long examples, or cut them (losing their EOS), and say
    how many. Fields after n_prompt are kept as they are."""
    kept, dropped, cut = [], 0, 0
    for ids, n_prompt, *rest in items:
        if len(ids) <= max_length:
            kept.append((ids, n_prompt, *rest))
        elif overlong == "truncate" and n_prompt < max_length:
            kept.append((ids[:max_length], n_prompt, *rest))
            cut += 1
        else:
            dropped += 1
    if dropped:
        rank_zero_warn(f"{key}: dropped {dropped} of {len(items)} examples longer than data.max_length={max_length} "
                       f"tokens (data.overlong={overlong}).")
    if cut:
        rank_zero_warn(f"{key}: truncated {cut} of {len(items)} examples to data.max_length={max_length} tokens; "
                       "they lose their EOS, so the model does not learn to stop on them (data.overlong=truncate).")
    if not kept:
        raise LitMistralError(f"{key}: every example is longer than data.max_length={max_length} tokens. "
                              "Fix: raise --data.max_length.")
    return kept


class Formatter:
    """How inputs of one kind become token ids: instruction records (`kind` "instruction") through the prompt style
    `style`, conversations ("messages", "sharegpt") through the chat format of the same name (`mistral` or
    `chat_template`, with `chat_template` a Jinja template replacing the tokenizer's own)."""

    def __init__(self, kind: str, style: str, tokenizer, chat_template: str | None = None,
                 template_source: str | None = None) -> None:
        from lit_mistral.data.chat_formats import chat_format
        from lit_mistral.data.prompts import prompt_style

        self.kind, self.tokenizer = kind, tokenizer
        if kind == "instruction":
            self.style = prompt_style(style, tokenizer)
        elif style == "alpaca":
            raise LitMistralError("data.prompt_style=alpaca has no form for conversations. Fix: --data.prompt_style "
                                  "chat_template (the tokenizer's own template) or mistral.")
        else:
            self.chat = chat_format(style, tokenizer, chat_template, template_source)

    def encode(self, items: Sequence, max_length: int, overlong: str, key: str,
               skip_invalid: bool = False) -> list[tuple]:
        """`(ids, spans, index)` of every input that fits `max_length` (as `overlong` says; counted in the log). A
        conversation that the chat format cannot render as trained is an error, or with `skip_invalid` left out."""
        from lit_mistral.data.chat_formats import (
            encode_conversations,
            fit_conversations,
        )

        if self.kind == "instruction":
            encoded = encode_examples(items, self.style, self.tokenizer, max_length)  # bounded work per record
            encoded = [(ids, n, i) for i, (ids, n) in enumerate(encoded)]
            return [(ids, [(n, len(ids))] if n < len(ids) else [], i)
                    for ids, n, i in fit_to_length(encoded, max_length, overlong, key)]
        short, cut = bounded(items, self.tokenizer, max_length)  # bounded work per conversation
        encoded, problems = encode_conversations(short, self.chat)
        for j, item in enumerate(encoded):
            if item.index in cut and len(item.ids) <= max_length:  # a word-level tokenizer: cutting says nothing
                whole, _ = encode_conversations([items[item.index]], self.chat)
                if whole:
                    encoded[j] = replace(whole[0], index=item.index)
        if problems and not skip_invalid:
            raise_problems(problems, "Fix: correct these conversations, or set --data.skip_invalid true to leave "
                                     "them out.")
        if problems:
            rank_zero_warn(f"{key}: skipped {len(problems)} conversation(s) the chat format cannot render as trained "
                           f"(data.skip_invalid=true): {problems[0]}")
        kept, _ = fit_conversations(encoded, max_length, overlong, key)
        return [(item.ids, item.spans, item.index) for item in kept]

    def prompts(self, items: Sequence, max_length: int | None = None) -> list[list[int]]:
        """The prompt ids that ask for each input's answer: an instruction's prompt, or a conversation up to its
        last user turn, formatted as in training; an input longer than `max_length` tokens is cut first (see
        `bounded`): it comes out longer than that still, at a bounded cost, which is all generation needs to skip
        it."""
        if self.kind == "instruction":
            return encode_prompts(items, self.style, self.tokenizer, max_length)
        asked = [c.without_answer() for c in items]
        short, cut = bounded(asked, self.tokenizer, max_length)
        out = [self.chat.prompt_ids(c) for c in short]
        for i in cut:
            if len(out[i]) <= max_length:  # a word-level tokenizer: cutting says nothing
                out[i] = self.chat.prompt_ids(asked[i])
        return out
