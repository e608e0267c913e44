"""Generating answers in static batches through transformers' `generate`: left-padded prompt batches
(`data.prompt_batches`) generated and turned into output records."""

import torch


def context_window(model) -> int | None:
    """Longest prompt + answer the model takes, in tokens (None: not stated by its config)."""
    return getattr(model.config, "max_position_embeddings", None)


def row_limits(batch: dict, max_new_tokens: int) -> list[int]:
    """Each row's most new tokens: its own limit, within `max_new_tokens`."""
    limits = batch.get("max_new_tokens") or [None] * len(batch["index"])
    return [min(n or max_new_tokens, max_new_tokens) for n in limits]


def record(index, example, prompt_tokens: int, response: str | None, response_tokens: int, finish: str,
           error: str | None = None) -> dict:
    """The output row of one answered (or skipped) prompt."""
    out = {"index": index}
    if hasattr(example, "messages"):  # a conversation: its messages, then the turn that is answered
        out["messages"] = example.as_dicts()
    out.update(instruction=example.instruction, context=example.context, response=response,
               prompt_tokens=prompt_tokens, response_tokens=response_tokens, finish=finish)
    if error:
        out["error"] = error
    return out


def skipped(index, example, prompt_tokens: int, max_new_tokens: int, context: int | None) -> dict:
    """The row of a prompt that leaves no room for its answer in the model's context window (a prompt longer than
    the window was cut before tokenizing: its count is where the cut left it)."""
    if context is not None and prompt_tokens > context:
        return record(index, example, prompt_tokens, None, 0, "skipped", error=(
            f"the prompt has more than {context} tokens: it does not fit the model's context of {context} tokens. "
            "Fix: shorten it."))
    return record(index, example, prompt_tokens, None, 0, "skipped", error=(
        f"the prompt has {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it does not fit the model's "
        f"context of {context} tokens. Fix: shorten it or lower --model.generation.max_new_tokens."))


def answer_text(tokenizer, ids: list[int], limit: int, eos_ids: set[int]) -> tuple[str, int, str]:
    """(text, token count, finish) of generated `ids`, cut at the first EOS or at `limit` tokens."""
    cut = next((i for i, t in enumerate(ids[:limit]) if t in eos_ids), None)
    ids, finish = (ids[:cut], "eos") if cut is not None else (ids[:limit], "length")
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids), finish


@torch.no_grad()
def generate(model, tokenizer, batch: dict, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
             top_k: int, context: int | None = None, cache: str = "dynamic", synced_gpus: bool = False) -> list[dict]:
    """Generate answers for one left-padded batch of prompts with transformers' `generate`; one record per prompt,
    in batch order. Rows with a limit of their own (`max_new_tokens` of the batch) are cut to it.

    A prompt that leaves no room for its new tokens in the model's `context` window gets a record saying so
    (finish "skipped") instead of an answer. `synced_gpus` (a model sharded over processes, each calling this with
    its own batch): every process runs the same number of decoding steps, a batch of skipped prompts included."""
    lengths = batch["attention_mask"].sum(1).tolist()
    limits = row_limits(batch, max_new_tokens)
    rows = [i for i, (n, new) in enumerate(zip(lengths, limits)) if context is None or n + new <= context]
    answers: dict[int, tuple[str, int, str]] = {}
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
                             max_new_tokens=max(limits[i] for i in rows) if rows else max_new_tokens,
                             do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
        for row, ids in zip(rows, out[:, width:].tolist()):  # new tokens start at the same column for every row
            answers[row] = answer_text(tokenizer, ids, limits[row], {tokenizer.eos_token_id})
    return [record(index, example, lengths[row], *answers[row]) if row in answers
            else skipped(index, example, lengths[row], limits[row], context)
            for row, (index, example) in enumerate(zip(batch["index"], batch["example"]))]
