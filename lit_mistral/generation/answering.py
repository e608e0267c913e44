"""Answering prompts with a model as it stands: the weights to generate with (the adapter folded in, or kept apart),
and answers to a list of prompts split across processes, kept in step and gathered."""

import contextlib
import time

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_mistral.data.prompt_batches import collate_prompts, predict_batches
from lit_mistral.distributed import gather_objects, in_step
from lit_mistral.generation.predictor import Predictor


def merge_fits(model, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a dequantized copy of `model` in `dtype` fits: always on CPUs; on GPUs when it takes at most a third
    of the free memory (the 4-bit copy is freed layer by layer while merging)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    unquantized = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    return 3 * unquantized < free + unquantized // 4


def for_inference(model, weights: str, device: torch.device, dtype: torch.dtype):
    """The model to generate with: `model` itself (`weights` adapter), or, for `merged` (and `auto` where it fits),
    a plain transformers model with the adapter folded into a dequantized copy of the base."""
    from peft import PeftModel

    from lit_mistral.modeling.merge import merge_adapter

    if not isinstance(model, PeftModel) or weights == "adapter" or (
            weights == "auto" and not merge_fits(model, device, dtype)):
        return model
    started = time.perf_counter()
    merged = merge_adapter(model, dtype)
    rank_zero_info(f"Merged the adapter into a dequantized copy of the base for generation "
                   f"({time.perf_counter() - started:.1f}s; --model.generation.weights adapter keeps them apart).")
    return merged


@torch.no_grad()
def answer(predictor: Predictor, items: list[dict], max_rows: int, device: torch.device,
           between_batches=None) -> list[dict]:
    """Answer prompt `items` (`input_ids`, `index`, `example`) with `predictor` in batches of at most `max_rows`,
    planned as predict plans them (longest first); records in the order of `items`. `between_batches` is called
    after each batch (it may raise to stop: a SIGTERM)."""
    records = {}
    plan = predict_batches([len(it["input_ids"]) for it in items], range(len(items)), max_rows)
    for i, rows in enumerate(plan):
        batch = collate_prompts([dict(items[r], index=r) for r in rows], predictor.tokenizer.pad_token_id)
        batch.update(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        for record in predictor(batch, last=i == len(plan) - 1):
            records[record["index"]] = record
        if between_batches is not None:
            between_batches()
    return [dict(records[i], index=it["index"]) for i, it in enumerate(items)]


def answer_across(model, tokenizer, items: list[dict], max_rows: int, settings, max_new_tokens: int,
                  device: torch.device, rank: int = 0, world_size: int = 1, sharded: bool = False,
                  gathering=contextlib.nullcontext, between_batches=None):
    """Greedy answers (at most `max_new_tokens`; the engine and other `settings` as generation has them) to
    `items`, split across `world_size` processes and gathered, so that every process returns all of them, in order.
    `sharded` (FSDP): every decoding step is a collective, so every process answers the same number of prompts (a
    short share is padded with the first item, its answer dropped), in static batches (the engine calls the layers
    directly, outside FSDP's units), and generation keeps stepping a process whose answers have ended until all
    have (`synced_gpus`); `gathering` is the context in which the sharded weights outside the decoder layers are
    whole. `between_batches`: as for `answer`."""
    shares = [list(range(len(items)))[r::world_size] for r in range(world_size)]
    lockstep = sharded and world_size > 1
    mine = in_step(shares, rank, 0) if lockstep else shares[rank]
    predictor = Predictor(model, tokenizer, settings, greedy=True, max_new_tokens=max_new_tokens, static=sharded,
                          max_rows=max_rows, cuda_graphs=False, synced_gpus=lockstep)
    with gathering():
        records = answer(predictor, [items[i] for i in mine], max_rows, device, between_batches)
    records = list(zip(shares[rank], records))  # padding left out
    merged = sorted((pair for part in gather_objects(records, world_size) for pair in part), key=lambda p: p[0])
    return [record for _, record in merged]
