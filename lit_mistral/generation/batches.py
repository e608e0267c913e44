"""Generating answers in static batches through transformers' `generate`: prompts planned into batches (longest
first, bounded by rows and by KV-cache positions), left-padded, generated, and turned into output records. The one
path that batches prompts for generation: `predict` and the validation answers both go through it."""

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def predict_batches(lengths: Sequence[int], todo: Sequence[int], max_rows: int, max_tokens: int | None = None,
                    new_tokens: int = 0) -> list[list[int]]:
    """Batches of the prompts `todo` (indices into `lengths`), longest first: consecutive prompts share a batch while
    it has at most `max_rows` rows and, with `max_tokens`, rows x (its longest prompt + `new_tokens`) stays within
    `max_tokens` (the key/value cache the batch fills). A prompt over the budget alone gets a batch of its own."""
    order = sorted(todo, key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        width = lengths[batch[0]] + new_tokens if batch else 0  # the first prompt of a batch is its longest
        if batch and len(batch) < max_rows and (max_tokens is None or (len(batch) + 1) * width <= max_tokens):
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
    """Left-pad prompts for batched generation (new tokens then line up at the right end)."""
    longest = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        if n:
            input_ids[row, longest - n :] = torch.tensor(it["input_ids"])
            attention_mask[row, longest - n :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "index": [it["index"] for it in items],
            "example": [it["example"] for it in items], "skip": [it.get("skip") for it in items]}


def _record(index, example, prompt_tokens: int, response: str | None, response_tokens: int, finish: str,
            error: str | None = None) -> dict:
    record = {"index": index}
    if hasattr(example, "messages"):  # a conversation: its messages, then the turn that is answered
        record["messages"] = example.as_dicts()
    record.update(instruction=example.instruction, context=example.context, response=response,
                  prompt_tokens=prompt_tokens, response_tokens=response_tokens, finish=finish)
    if error:
        record["error"] = error
    return record


@torch.no_grad()
def generate(model, tokenizer, batch: dict, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
             top_k: int, context: int | None = None, cache: str = "dynamic", synced_gpus: bool = False) -> list[dict]:
    """Generate answers for one left-padded batch of prompts; one record per prompt, in batch order.

    A prompt that leaves no room for `max_new_tokens` in the model's `context` window gets a record saying so
    (finish "skipped") instead of an answer. `synced_gpus` (a model sharded over processes, each calling this with
    its own batch): every process runs the same number of decoding steps, a batch of skipped prompts included."""
    lengths = batch["attention_mask"].sum(1).tolist()
    fits = [context is None or n + max_new_tokens <= context for n in lengths]
    answers: dict[int, tuple[str, int, str]] = {}
    rows = [i for i, ok in enumerate(fits) if ok]
    if rows or synced_gpus:
        # drop the left padding only skipped prompts needed; all skipped (synced_gpus): the last token of the first
        # prompt steps for the other processes, and its output is not read (no rows)
        width = max(lengths[i] for i in rows) if rows else 1
        input_ids, attention_mask = (batch[k][rows or [0], -width:] for k in ("input_ids", "attention_mask"))
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
        if cache == "static":
            sampling["cache_implementation"] = "static"
        if synced_gpus:
            sampling["synced_gpus"] = True
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                             max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
        for row, ids in zip(rows, out[:, width:].tolist()):  # new tokens start at the same column for every row
            finish = "length"
            if tokenizer.eos_token_id in ids:
                ids, finish = ids[: ids.index(tokenizer.eos_token_id)], "eos"
            answers[row] = (tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids), finish)
    records = []
    for row, (index, example) in enumerate(zip(batch["index"], batch["example"])):
        if row in answers:
            records.append(_record(index, example, lengths[row], *answers[row]))
        else:
            records.append(_record(index, example, lengths[row], None, 0, "skipped", error=(
                f"the prompt has {lengths[row]} tokens; with max_new_tokens={max_new_tokens} it does not fit the "
                f"model's context of {context} tokens. Fix: shorten it or lower --model.max_new_tokens.")))
    return records
