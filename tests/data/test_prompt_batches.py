"""Prompt batches for generation: the batch plan (rows and KV-cache positions) and left padding."""

from lit_mistral.data.prompt_batches import collate_prompts, predict_batches


def test_collate_prompts_pads_left():
    items = [{"input_ids": [1, 5, 6], "index": 0, "example": None}, {"input_ids": [1, 8], "index": 1, "example": None}]
    batch = collate_prompts(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [0, 1, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]


def test_predict_batches_bound_rows_and_cache_tokens():
    lengths = [10, 400, 12, 11, 300, 9, 1000, 8]
    # rows only: longest first, 3 at a time
    assert predict_batches(lengths, range(8), 3) == [[6, 1, 4], [2, 3, 0], [5, 7]]
    # a cache budget: rows x (longest prompt + 20 new tokens) <= 1100; the 1000-token prompt alone is over it
    batches = predict_batches(lengths, range(8), 100, max_tokens=1100, new_tokens=20)
    assert batches == [[6], [1, 4], [2, 3, 0, 5, 7]]
    assert all(len(b) * (lengths[b[0]] + 20) <= 1100 for b in batches[1:])
    # rows already answered (a resumed run) are left out
    assert predict_batches(lengths, [0, 2, 5], 100, 1100, 20) == [[2, 0, 5]]
