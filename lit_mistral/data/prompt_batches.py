"""Prompts planned into batches for generation (longest answer limit first, bounded by rows and by KV-cache
positions) and left-padded. The one path that batches prompts for generation: `predict` and the validation answers
both go through it."""

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def predict_batches(lengths: Sequence[int], todo: Sequence[int], max_rows: int, max_tokens: int | None = None,
                    new_tokens: int | Sequence[int] = 0) -> list[list[int]]:
    """Batches of the prompts `todo` (indices into `lengths`), the longest answer limit first (`new_tokens`, one
    number for all or one per prompt), then the longest prompt: consecutive prompts share a batch while it has at
    most `max_rows` rows and, with `max_tokens`, rows x (its widest prompt + new tokens) stays within `max_tokens`
    (the key/value cache the batch fills). A prompt over the budget alone gets a batch of its own."""
    news = [new_tokens] * len(lengths) if isinstance(new_tokens, int) else list(new_tokens)
    # longest answer limit first (the continuous engine then has no long answers left alone at the end), then
    # longest prompt (static batches of similar prompts pad little)
    order = sorted(todo, key=lambda i: (-news[i], -lengths[i]))
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        width = max(lengths[j] + news[j] for j in batch) if batch else 0
        if batch and len(batch) < max_rows and (
                max_tokens is None or (len(batch) + 1) * max(width, lengths[i] + news[i]) <= max_tokens):
            batch.append(i)
        else:
            batches.append([i])
    return batches


class PresetBatches(Sampler[list[int]]):
    """Batches decided in advance (predict: prompts grouped by length, finished rows left out)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches


def collate_prompts(items: list[dict], pad_id: int) -> dict:
    """Left-pad prompts for batched generation (new tokens then line up at the right end). Items: `input_ids`,
    `index`, `example`, and optionally `max_new_tokens` (the row's own limit; None: the settings')."""
    longest = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        if n:
            input_ids[row, longest - n :] = torch.tensor(it["input_ids"])
            attention_mask[row, longest - n :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "index": [it["index"] for it in items],
            "example": [it["example"] for it in items], "prompts": [list(it["input_ids"]) for it in items],
            "max_new_tokens": [it.get("max_new_tokens") for it in items]}
