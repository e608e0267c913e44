"""Answering prompts with the model as it stands: the weights generation runs on (the adapter merged, or kept
apart), a list of prompts answered in planned batches and returned in its own order, and the same answers when the
prompts are split across processes and gathered."""

import pytest
import torch
from conftest import adapted, answer_alone, prompt_items
from peft import PeftModel

from lit_mistral.config import Generation
from lit_mistral.generation import answering
from lit_mistral.generation.answering import answer, answer_across, for_inference
from lit_mistral.generation.predictor import Predictor

ROWS = [3, 0, 12, 5, 7]  # demo records of several lengths, in no order of length


@pytest.mark.parametrize("weights", ["merged", "auto", "adapter"])
def test_generation_runs_on_merged_weights_unless_the_adapter_is_kept_apart(tiny_model_dir, weights):
    model = adapted(tiny_model_dir).model
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        chosen = for_inference(model, weights, torch.device("cpu"), torch.float32)
        assert isinstance(chosen, PeftModel) == (weights == "adapter")  # auto: merged on CPUs
        torch.testing.assert_close(chosen(input_ids=ids).logits, expected, atol=2e-4, rtol=0)


def test_a_plain_model_is_used_as_it_is(tiny_lm):
    model, _ = tiny_lm
    assert for_inference(model, "merged", torch.device("cpu"), torch.float32) is model


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_answers_come_back_in_the_order_of_the_prompts(tiny_lm, demo_records, engine):
    model, tokenizer = tiny_lm
    items = prompt_items(tokenizer, [demo_records[r] for r in ROWS])
    items = [dict(it, index=f"row {i}") for i, it in enumerate(items)]  # keys of the caller's own
    predictor = Predictor(model, tokenizer, Generation(max_new_tokens=4, engine=engine, cuda_graphs=False),
                          max_rows=2)
    batches = []
    records = answer(predictor, items, max_rows=2, device=torch.device("cpu"),
                     between_batches=lambda: batches.append(len(batches)))
    assert len(batches) == 3  # 5 prompts, 2 rows a batch
    assert [r["index"] for r in records] == [f"row {i}" for i in range(5)]
    assert [r["instruction"] for r in records] == [demo_records[r]["instruction"] for r in ROWS]
    for r, it in zip(records, items):
        assert (r["response"], r["response_tokens"]) == answer_alone(model, tokenizer, it["input_ids"], 4)


def test_prompts_split_across_processes_are_gathered_in_order(tiny_lm, demo_records, monkeypatch):
    """Two processes simulated one after the other: each answers its share; the gathering (here: every share
    answered so far) hands the second all of them."""
    model, tokenizer = tiny_lm
    items = prompt_items(tokenizer, [demo_records[r] for r in ROWS])
    settings = Generation(engine="static")
    alone = answer_across(model, tokenizer, items, 2, settings, 4, torch.device("cpu"))
    shares = []

    def gather(part, world_size):
        shares.append(part)
        return shares + [part] * (world_size - len(shares))

    monkeypatch.setattr(answering, "gather_objects", gather)
    for rank in (0, 1):
        gathered = answer_across(model, tokenizer, items, 2, settings, 4, torch.device("cpu"), rank, world_size=2)
    assert [[i for i, _ in part] for part in shares] == [[0, 2, 4], [1, 3]]  # every other prompt
    assert gathered == alone and [r["index"] for r in alone] == list(range(5))


def test_a_sharded_models_short_share_is_padded_and_the_padding_dropped(tiny_lm, demo_records, monkeypatch, tmp_path):
    """FSDP: every process answers as many prompts, and keeps decoding until all are done (`synced_gpus`, a
    collective: a one-process group stands in for the two)."""
    model, tokenizer = tiny_lm
    items = prompt_items(tokenizer, [demo_records[r] for r in ROWS])
    settings = Generation(engine="continuous")  # sharded: static batches whatever the settings say
    alone = answer_across(model, tokenizer, items, 2, settings, 4, torch.device("cpu"))
    answered, parts = [], []
    monkeypatch.setattr(answering, "answer", lambda predictor, its, *a: answered.append(
        (predictor.use_engine, predictor.synced_gpus, [it["index"] for it in its])) or answer(predictor, its, *a))
    monkeypatch.setattr(answering, "gather_objects", lambda part, world_size: parts.append(part) or [part])
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    try:
        mine = answer_across(model, tokenizer, items, 2, settings, 4, torch.device("cpu"), 1, 2, sharded=True)
    finally:
        torch.distributed.destroy_process_group()
    assert answered == [(False, True, [1, 3, 0])]  # rank 1's two prompts, then the first prompt as padding
    assert mine == [alone[1], alone[3]] and [i for i, _ in parts[0]] == [1, 3]
