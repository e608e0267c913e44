"""What each split holds: record ranges, the seeded validation fraction, predict prompts within their answer
limits and the KV cache."""

import pytest

from lit_mistral.data.records import Example
from lit_mistral.data.splits import answer_limit, check_cache, hold_out, predict_plan, select
from lit_mistral.errors import LitMistralError


def test_select_takes_a_record_range_and_names_one_past_the_end():
    records = list(range(10))
    assert select(records, None, "data.train_records", "d.jsonl") is records
    assert select(records, (2, 5), "data.train_records", "d.jsonl") == [2, 3, 4]
    with pytest.warns(UserWarning, match=r"data.val_records=\[8, 20\]: d.jsonl has only 10 records; using \[8, 10\]"):
        assert select(records, (8, 20), "data.val_records", "d.jsonl") == [8, 9]
    with pytest.raises(LitMistralError, match=r"data.train_records=\[10, 12\] selects nothing: d.jsonl has 10"):
        select(records, (10, 12), "data.train_records", "d.jsonl")


def test_hold_out_is_seeded_disjoint_and_in_file_order():
    records = list(range(20))
    train, val = hold_out(records, 0.25, seed=1)
    assert len(val) == 5 and sorted(train + val) == records and train == sorted(train) and val == sorted(val)
    assert hold_out(records, 0.25, seed=1) == (train, val) and hold_out(records, 0.25, seed=2)[1] != val
    assert hold_out(records, 0.0, seed=1) == (records, [])
    with pytest.raises(LitMistralError, match=r"data.val_fraction=0.9 leaves no training records out of 1"):
        hold_out([0], 0.9, seed=1)


def item(prompt_tokens: int, own_limit: int | None = None, where: str = "p.jsonl:1") -> dict:
    example = Example(instruction="x", context="", response=None, where=where, max_new_tokens=own_limit)
    return {"input_ids": [1] * prompt_tokens, "index": 0, "example": example, "max_new_tokens": own_limit}


def test_answer_limit_is_the_rows_own_within_the_settings():
    assert [answer_limit(item(3, n), 16) for n in (None, 4, 40)] == [16, 4, 16]


def test_check_cache_names_the_input_needing_the_most_and_the_size_that_fits():
    items = [item(10, where="p.jsonl:1"), item(50, where="p.jsonl:2"), item(30, 2, where="p.jsonl:3")]
    check_cache(items, None, 16, None)  # no bound: nothing to check
    check_cache(items, 66, 16, None)
    with pytest.raises(LitMistralError, match=r"max_cache_tokens=40 holds fewer KV-cache positions than 1 input\(s\) "
                                              r"need; the most, 66, for p.jsonl:2 \(50 prompt tokens \+ 16 new\)\. "
                                              r"Fix: --model.generation.max_cache_tokens 66 or more"):
        check_cache(items, 40, 16, None)
    check_cache(items, 40, 16, context=60)  # the 50-token prompt does not fit the context: skipped, needs no cache


def test_predict_plan_leaves_done_rows_out_and_puts_long_answers_first():
    items = [item(10), item(50), item(30, 2), item(20)]
    assert predict_plan(items, set(), 2, None, 16) == [[1, 3], [0, 2]]
    assert predict_plan(items, {1}, 2, None, 16) == [[3, 0], [2]]
    assert predict_plan(items, set(), 8, 100, 16) == [[1], [3, 0], [2]]  # rows x (widest + new) within 100
