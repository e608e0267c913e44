"""`Predictor`: the continuous engine's batches are portions of one stream (a call returns the answers that finished,
the last drains it) with the answers static batches give; prompts the engine refuses go to static batches, prompts
without room in the context are skipped; the tokens that end an answer; the fallback to static batches."""

import logging
from types import SimpleNamespace

import pytest
from conftest import answer_alone, prompt_items

from lit_mistral.config import Generation
from lit_mistral.data.prompt_batches import collate_prompts
from lit_mistral.data.records import Example
from lit_mistral.generation.predictor import Predictor, eos_ids

LIMITS = [6, 3, None, 6, 1, None]  # each row's own answer limit (None: the settings')


def stream(predictor: Predictor, items: list[dict], portions: list[slice]) -> list[list[dict]]:
    """The records each call of `predictor` returns, one call per portion of `items` (the last one `last`)."""
    pad = predictor.tokenizer.pad_token_id
    return [predictor(collate_prompts(items[p], pad), last=i == len(portions) - 1) for i, p in enumerate(portions)]


def by_index(calls: list[list[dict]]) -> dict[int, dict]:
    records = [r for call in calls for r in call]
    assert len(records) == len({r["index"] for r in records})  # each prompt answered once
    return {r["index"]: r for r in records}


def test_the_engine_streams_the_answers_static_batches_give(tiny_lm, demo_records):
    model, tokenizer = tiny_lm
    items = prompt_items(tokenizer, demo_records[:6], LIMITS)
    portions = [slice(0, 4), slice(4, 6)]
    engine = Predictor(model, tokenizer, Generation(max_new_tokens=6, engine="continuous", max_rows=2,
                                                    cuda_graphs=False))
    static = Predictor(model, tokenizer, Generation(max_new_tokens=6, engine="static", max_rows=2))
    assert engine.use_engine and not static.use_engine

    calls = stream(engine, items, portions)
    # the first call returns what finished meanwhile (2 rows for 4 prompts: some), the last call the rest
    assert 0 < len(calls[0]) < 4 and {r["index"] for r in calls[0]} <= {0, 1, 2, 3}
    streamed, batched = by_index(calls), by_index(stream(static, items, portions))
    assert sorted(streamed) == list(range(6)) and streamed == batched
    for i, it in enumerate(items):
        text, n = answer_alone(model, tokenizer, it["input_ids"], LIMITS[i] or 6)
        assert (streamed[i]["response"], streamed[i]["response_tokens"]) == (text, n)
    assert engine.pending == {}


def test_sampled_answers_do_not_depend_on_the_portions(tiny_lm, demo_records):
    model, tokenizer = tiny_lm
    items = prompt_items(tokenizer, demo_records[:6])
    settings = Generation(max_new_tokens=5, do_sample=True, temperature=1.5, top_k=0, top_p=1.0, engine="continuous",
                          max_rows=3, cuda_graphs=False, seed=3)
    whole = by_index(stream(Predictor(model, tokenizer, settings), items, [slice(0, 6)]))
    split = by_index(stream(Predictor(model, tokenizer, settings), items, [slice(0, 1), slice(1, 4), slice(4, 6)]))
    assert whole == split
    greedy = {i: answer_alone(model, tokenizer, it["input_ids"], 5)[0] for i, it in enumerate(items)}
    assert [r["response"] for r in whole.values()] != [greedy[i] for i in whole]  # it did sample


def test_prompts_the_engine_refuses_go_to_static_batches_and_those_without_room_are_skipped(tiny_lm, demo_records):
    model, tokenizer = tiny_lm
    items = prompt_items(tokenizer, demo_records[:2])
    long_prompt = (items[0]["input_ids"] * 8)[:40]  # 40 tokens + 4 new: over the engine's 32 cache positions
    over_context = [1] + [7] * (model.config.max_position_embeddings - 2)  # 1023 tokens + 4 new: over 1024
    items += [{"input_ids": ids, "index": i, "example": Example(f"prompt {i}")}
              for i, ids in ((2, long_prompt), (3, over_context))]
    predictor = Predictor(model, tokenizer, Generation(max_new_tokens=4, engine="continuous", max_rows=2,
                                                       max_cache_tokens=32, cuda_graphs=False))
    records = by_index(stream(predictor, items, [slice(0, 4)]))

    assert records[3]["finish"] == "skipped" and records[3]["error"].startswith(
        "the prompt has 1023 tokens; with max_new_tokens=4 it does not fit the model's context of 1024 tokens.")
    for i in range(3):  # 2: in a static batch of its own
        assert (records[i]["response"], records[i]["response_tokens"]) == answer_alone(
            model, tokenizer, items[i]["input_ids"], 4)
        assert records[i]["prompt_tokens"] == len(items[i]["input_ids"])
    # the two short prompts ran on the engine
    assert predictor.session.counts["prompt_tokens"] == len(items[0]["input_ids"]) + len(items[1]["input_ids"])


def test_continuous_on_a_sharded_model_falls_back_to_static_batches(tiny_lm, caplog):
    model, tokenizer = tiny_lm
    with caplog.at_level(logging.WARNING, logger="lit_mistral.generation.predictor"):
        predictor = Predictor(model, tokenizer, Generation(engine="continuous"), static=True)
    assert not predictor.use_engine
    assert caplog.messages == ["model.generation.engine=continuous: the model is sharded; generating in static "
                               "batches."]


@pytest.mark.parametrize("configured,expected", [(None, {2}), (9, {2, 9}), ([2, 9, 11], {2, 9, 11})])
def test_an_answer_ends_at_the_tokenizers_eos_or_the_generation_configs(configured, expected):
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=configured))
    assert eos_ids(model, SimpleNamespace(eos_token_id=2)) == expected
