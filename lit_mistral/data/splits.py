"""What each split holds, checked before the model loads: the training and validation records (record ranges of a
file, or a seeded fraction held out of the training records) and the predict prompts (tokenized as training
formats them, each with its answer limit, within the KV cache the settings allow). Apart from the DataModule, whose
`setup` and `predict_dataloader` call these, so that its hooks stay one job each."""

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_mistral.data.prompt_batches import predict_batches
from lit_mistral.data.tokenize import Formatter
from lit_mistral.errors import LitMistralError


def select(examples: list, rng: tuple[int, int] | None, key: str, source: str) -> list:
    """The records [start, stop) of `source` (all without a range); a range past the end is an error, one that runs
    past it is cut (with a warning)."""
    if rng is None:
        return examples
    start, stop = rng
    if start >= len(examples):
        raise LitMistralError(f"{key}={list(rng)} selects nothing: {source} has {len(examples)} records. "
                              f"Fix: choose a range below {len(examples)}.")
    if stop > len(examples):
        rank_zero_warn(f"{key}={list(rng)}: {source} has only {len(examples)} records; "
                       f"using [{start}, {len(examples)}].")
    return examples[start:stop]


def hold_out(train: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, validation): `fraction` of `train` held out by a seeded shuffle, each part in file order
    (0: nothing held out)."""
    if fraction <= 0:
        return train, []
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(train) * fraction))
    if n_val >= len(train):
        raise LitMistralError(f"data.val_fraction={fraction} leaves no training records out of "
                              f"{len(train)}. Fix: lower it.")
    return [train[i] for i in sorted(order[n_val:])], [train[i] for i in sorted(order[:n_val])]


def prompt_items(formatter: Formatter, examples: list, context: int | None) -> list[dict]:
    """Prompt items for generation (`input_ids`, `index`: position in `examples`, `example`, `max_new_tokens`: its
    own limit), formatted and tokenized as training formats prompts (a conversation: up to its last user turn);
    inputs are cut past the model's `context` before tokenizing."""
    prompts = formatter.prompts(examples, context)
    return [{"input_ids": ids, "index": i, "example": e, "max_new_tokens": e.max_new_tokens}
            for i, (e, ids) in enumerate(zip(examples, prompts))]


def answer_limit(item: dict, max_new_tokens: int) -> int:
    """The most new tokens of a predict item's answer: its own limit, within the settings'."""
    return min(item["max_new_tokens"] or max_new_tokens, max_new_tokens)


def predict_plan(items: list[dict], done: set[int], max_rows: int, max_cache_tokens: int | None,
                 max_new_tokens: int) -> list[list[int]]:
    """The batches of the predict items not `done`: longest prompts first (little padding per batch; the memory
    peak comes at once), each batch within `max_rows` rows and `max_cache_tokens` KV-cache positions."""
    lengths = [len(item["input_ids"]) for item in items]
    news = [answer_limit(item, max_new_tokens) for item in items]
    todo = [i for i in range(len(lengths)) if i not in done]
    return predict_batches(lengths, todo, max_rows, max_cache_tokens, news)


def check_cache(items: list[dict], max_cache_tokens: int | None, max_new_tokens: int, context: int | None) -> None:
    """`model.generation.max_cache_tokens` (the DataModule's `predict_max_tokens`) holds the longest prompt and
    its answer, which it must to generate it: found before the model loads (prompts that do not fit the model's
    context are skipped, and need no cache)."""
    if max_cache_tokens is None:
        return
    needs = [(len(it["input_ids"]) + answer_limit(it, max_new_tokens), it) for it in items
             if context is None or len(it["input_ids"]) + answer_limit(it, max_new_tokens) <= context]
    need, item = max(needs, key=lambda pair: pair[0], default=(0, None))
    if need > max_cache_tokens:
        over = sum(n > max_cache_tokens for n, _ in needs)
        raise LitMistralError(
            f"model.generation.max_cache_tokens={max_cache_tokens} holds fewer KV-cache positions than "
            f"{over} input(s) need; the most, {need}, for {item['example'].where} ({len(item['input_ids'])} "
            f"prompt tokens + {answer_limit(item, max_new_tokens)} new). Fix: --model.generation.max_cache_tokens "
            f"{need} or more (null: as many as the rows need), or a lower --model.generation.max_new_tokens.")
