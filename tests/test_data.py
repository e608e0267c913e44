import json

import pytest
import torch

from conftest import write_jsonl
from lit_mistral.data import (BatchPlan, Fields, InstructionDataModule, collate_packed, collate_padded,
                              collate_prompts, fit_to_length, read_examples)
from lit_mistral.errors import LitMistralError

GOOD = {"instruction": "Name a fish.", "context": "", "response": "Tope", "category": "open_qa"}


def read(path, **kw):
    return read_examples(str(path), Fields(), "data.path", **kw)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_reads_every_training_format(tmp_path, fmt, demo_records):
    import datasets

    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, demo_records)
    elif fmt == "json":
        path.write_text(json.dumps(demo_records))
    else:
        getattr(datasets.Dataset.from_list(demo_records), f"to_{fmt}")(str(path))
    examples = read(path)
    assert len(examples) == 64
    assert examples[3].instruction == demo_records[3]["instruction"]
    assert examples[3].context == demo_records[3]["context"].strip()


def test_field_names_can_be_remapped(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"prompt": "Say hi.", "input": None, "output": "Hi."}])
    [example] = read_examples(str(path), Fields("prompt", "input", "output", None), "data.path")
    assert (example.instruction, example.context, example.response) == ("Say hi.", "", "Hi.")


def test_predict_files_txt_and_jsonl(tmp_path):
    txt = tmp_path / "q.txt"
    txt.write_text("First question?\n\n  \nSecond question?\n")
    examples = read_examples(str(txt), Fields(), "data.predict_path", need_response=False)
    assert [e.instruction for e in examples] == ["First question?", "Second question?"]
    assert examples[1].where.endswith("q.txt:4")
    jsonl = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "Sum up.", "context": "Text."}])
    [example] = read_examples(str(jsonl), Fields(), "data.predict_path", need_response=False)
    assert (example.context, example.response) == ("Text.", None)


BAD_RECORDS = [
    ('{"instruction": "x", "response": "y"', "malformed JSON"),
    (json.dumps({"context": "", "response": "y"}), "field 'instruction' is missing"),
    (json.dumps({"instruction": "x"}), "field 'response' is missing"),
    (json.dumps({"instruction": 5, "response": "y"}), "field 'instruction' must be a string, got int"),
    (json.dumps({"instruction": "x", "response": ["y"]}), "field 'response' must be a string, got list"),
    (json.dumps({"instruction": "x", "context": 3, "response": "y"}), "field 'context' must be a string"),
    (json.dumps({"instruction": "   ", "response": "y"}), "field 'instruction' is empty"),
    (json.dumps({"instruction": "x", "response": ""}), "field 'response' is empty"),
    (json.dumps(["x", "y"]), "expected a JSON object"),
]


@pytest.mark.parametrize("line,message", BAD_RECORDS)
def test_bad_record_named_by_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, line, GOOD])
    with pytest.raises(LitMistralError) as err:
        read(path)
    assert f"bad.jsonl:2: {message}" in str(err.value)
    assert "--data.skip_invalid true" in str(err.value)


def test_undecodable_bytes_named_by_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"instruction": "caf\xe9", "response": "y"}\n')
    with pytest.raises(LitMistralError, match=r"bad.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 21\)"):
        read(path)


def test_all_problems_reported_at_once_or_skipped(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, BAD_RECORDS[0][0], GOOD, BAD_RECORDS[1][0]])
    with pytest.raises(LitMistralError, match=r"2 problems found:\n.*bad.jsonl:2.*\n.*bad.jsonl:4"):
        read(path)
    with pytest.warns(UserWarning, match="skipped 2 invalid record"):
        assert len(read(path, skip_invalid=True)) == 2


@pytest.mark.parametrize("name,content,message", [
    ("missing.jsonl", None, "does not exist"),
    ("data.xml", "<a/>", "unsupported extension '.xml'"),
    ("empty.jsonl", "\n\n", "holds no usable records"),
    ("list.json", '{"a": 1}', "expected a JSON list of records"),
    ("broken.json", '[{"instruction": "x",\n "response": }]', r"broken.json:2: malformed JSON"),
])
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(LitMistralError, match=message):
        read(path)


def test_collate_padded_masks_prompt_and_padding():
    items = [{"input_ids": [1, 5, 6, 7, 2], "n_prompt": 3}, {"input_ids": [1, 8, 2], "n_prompt": 2}]
    batch = collate_padded(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 2], [-100, -100, 2, -100, -100]]
    assert batch["num_tokens"] == 8
    unmasked = collate_padded(items, pad_id=0, mask_prompt=False)
    assert unmasked["labels"].tolist() == [[-100, 5, 6, 7, 2], [-100, 8, 2, -100, -100]]


def test_collate_packed_keeps_examples_apart():
    items = [{"input_ids": [1, 5, 6, 7, 2], "n_prompt": 3}, {"input_ids": [1, 8, 2], "n_prompt": 2}]
    batch = collate_packed(items)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 1, 8, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 2, -100, -100, 2]]
    assert batch["cu_seq_lens"].tolist() == [0, 5, 8] and batch["max_length"] == 5
    # without prompt masking the first token of each example still carries no label: no target crosses a boundary
    assert collate_packed(items, mask_prompt=False)["labels"].tolist() == [[-100, 5, 6, 7, 2, -100, 8, 2]]


def test_collate_prompts_pads_left():
    items = [{"input_ids": [1, 5, 6], "index": 0, "example": None}, {"input_ids": [1, 8], "index": 1, "example": None}]
    batch = collate_prompts(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [0, 1, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]


def test_batch_plan_token_budget_and_ranks():
    lengths = [100, 300, 50, 400, 250, 120, 80, 500, 60, 90]
    plan = BatchPlan(lengths, batch_size=4, max_tokens=600, packed=True, seed=1)
    batches = list(plan)
    assert sorted(i for b in batches for i in b) == list(range(10))  # each example once per epoch
    assert all(sum(lengths[i] for i in b) <= 600 for b in batches)
    assert list(plan) == batches  # deterministic within an epoch
    plan.set_epoch(1)
    assert list(plan) != batches  # reshuffled the next epoch
    plan.set_epoch(0)
    ranks = [list(BatchPlan(lengths, 4, 600, True, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(batches) // 2  # same step count on every process
    seen = [i for rank in ranks for b in rank for i in b]
    assert len(seen) == len(set(seen))  # no example twice in an epoch
    dropped = [i for b in batches[2 * (len(batches) // 2):] for i in b]  # only the uneven tail batch
    assert sorted(seen + dropped) == list(range(10))


def test_batch_plan_padded_budget_and_length_grouping():
    lengths = list(range(10, 330, 10))  # 32 examples
    plan = BatchPlan(lengths, batch_size=4, max_tokens=800, length_grouped=True, seed=0)
    batches = list(plan)
    assert all(len(b) * max(lengths[i] for i in b) <= 800 for b in batches)
    fixed = list(BatchPlan(lengths, batch_size=4, length_grouped=True, seed=0))
    padding = sum(4 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in fixed)
    shuffled = list(BatchPlan(lengths, batch_size=4, seed=0))
    padding_shuffled = sum(4 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in shuffled)
    assert padding < padding_shuffled / 3


def test_batch_plan_skips_batches_done_before_a_resume():
    plan = BatchPlan(list(range(1, 21)), batch_size=2, seed=3)
    full = list(plan)
    plan.skip = 4
    assert list(plan) == full[4:]
    assert list(plan) == full  # the skip applies once


def test_overlong_examples_dropped_or_truncated():
    items = [([1] * 10, 3), ([1] * 30, 5), ([1] * 30, 25)]
    with pytest.warns(UserWarning, match="dropped 2 of 3"):
        assert len(fit_to_length(items, 20, "drop", "data.path")) == 1
    with pytest.warns(UserWarning) as record:
        kept = fit_to_length(items, 20, "truncate", "data.path")
    assert [len(ids) for ids, _ in kept] == [10, 20]  # the one whose prompt alone is too long is dropped
    assert any("truncated 1 of 3" in str(w.message) for w in record)


def datamodule(tiny_model_dir, path, **kw):
    return InstructionDataModule(path=str(path), tokenizer=str(tiny_model_dir), max_length=256, **kw)


def test_setup_splits_by_record_ranges(tiny_model_dir, tmp_path, demo_records):
    path = write_jsonl(tmp_path / "d.jsonl", demo_records)
    dm = datamodule(tiny_model_dir, path, train_records=(0, 50), val_records=(50, 64))
    dm.setup("fit")
    assert len(dm.train_set) == 50 and len(dm.val_set) == 14
    assert [e.instruction for e in dm.val_examples] == [r["instruction"] for r in demo_records[50:]]


def test_val_fraction_split_is_seeded(tiny_model_dir, tmp_path, demo_records):
    path = write_jsonl(tmp_path / "d.jsonl", demo_records)
    splits = []
    for seed in (1, 1, 2):
        dm = datamodule(tiny_model_dir, path, val_fraction=0.25, seed=seed)
        dm.setup("fit")
        splits.append([e.instruction for e in dm.val_examples])
    assert len(splits[0]) == 16 and splits[0] == splits[1] and splits[0] != splits[2]


@pytest.mark.parametrize("kwargs,message", [
    (dict(train_records=(0, 50), val_records=(40, 60)), "overlap"),
    (dict(val_fraction=1.5), "val_fraction=1.5"),
    (dict(prompt_style="vicuna"), "unknown prompt style 'vicuna'"),
    (dict(max_tokens=100), "below data.max_length"),
])
def test_bad_data_settings_fail_at_construction(tiny_model_dir, kwargs, message):
    with pytest.raises(LitMistralError, match=message):
        datamodule(tiny_model_dir, "x.jsonl", **kwargs)


def test_record_range_past_the_end(tiny_model_dir, tmp_path, demo_records):
    path = write_jsonl(tmp_path / "d.jsonl", demo_records)
    with pytest.raises(LitMistralError, match=r"train_records=\[800, 1000\] selects nothing: .* has 64 records"):
        datamodule(tiny_model_dir, path, train_records=(800, 1000)).setup("fit")


def test_validate_without_validation_data(tiny_model_dir, tmp_path, demo_records):
    path = write_jsonl(tmp_path / "d.jsonl", demo_records)
    with pytest.raises(LitMistralError, match="no validation data"):
        datamodule(tiny_model_dir, path).setup("validate")


def test_packed_loader_respects_token_budget(tiny_model_dir, tmp_path, demo_records):
    path = write_jsonl(tmp_path / "d.jsonl", demo_records)
    dm = datamodule(tiny_model_dir, path, packing=True, max_tokens=512)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(len(b["cu_seq_lens"]) - 1 for b in batches) == 64
    assert all(b["input_ids"].shape[1] <= 512 and b["num_tokens"] == b["input_ids"].shape[1] for b in batches)
    assert torch.equal(batches[0]["position_ids"][0, : batches[0]["cu_seq_lens"][1]],
                       torch.arange(int(batches[0]["cu_seq_lens"][1])))


@pytest.mark.parametrize("packing", [False, True])
def test_validation_batches_name_their_examples(tiny_model_dir, tmp_path, demo_records, packing):
    """Each validation batch lists the position of its examples in val_examples (for per-category metrics), also
    when an example whose prompt alone exceeds max_length had to be left out."""
    records = [dict(r) for r in demo_records[:10]]
    records[3]["context"] = " ".join(["water"] * 300)  # prompt longer than max_length: dropped from val_set
    path = write_jsonl(tmp_path / "d.jsonl", records)
    dm = InstructionDataModule(path=str(path), tokenizer=str(tiny_model_dir), train_records=(0, 2),
                               val_records=(2, 10), max_length=128, batch_size=3, packing=packing)
    dm.setup("validate")
    indices = [i for batch in dm.val_dataloader() for i in batch["index"]]
    assert indices == [0, 2, 3, 4, 5, 6, 7]  # record 3 of the file is val example 1
    assert [dm.val_examples[i].instruction for i in indices] == [records[2 + i]["instruction"] for i in indices]


def test_predict_batches_bound_rows_and_cache_tokens():
    from lit_mistral.data import predict_batches

    lengths = [10, 400, 12, 11, 300, 9, 1000, 8]
    # rows only: longest first, 3 at a time
    assert predict_batches(lengths, range(8), 3) == [[6, 1, 4], [2, 3, 0], [5, 7]]
    # a cache budget: rows x (longest prompt + 20 new tokens) <= 1100; the 1000-token prompt alone is over it
    batches = predict_batches(lengths, range(8), 100, max_tokens=1100, new_tokens=20)
    assert batches == [[6], [1, 4], [2, 3, 0, 5, 7]]
    assert all(len(b) * (lengths[b[0]] + 20) <= 1100 for b in batches[1:])
    # rows already answered (a resumed run) are left out
    assert predict_batches(lengths, [0, 2, 5], 100, 1100, 20) == [[2, 0, 5]]


def test_validation_plan_covers_every_example_on_any_number_of_ranks():
    """Training drops the batches that would give ranks unequal step counts; validation deals out the examples and
    keeps them all (one packed batch's worth of examples on 2 ranks: both get some), and evens out the batch counts
    with filler batches that count for nothing (under FSDP a rank that stops early leaves the others hanging)."""
    from lit_mistral.data import Filler, TokenizedDataset

    lengths = [50 + 7 * i for i in range(9)]
    for world in (1, 2, 3, 12):
        for batch_size, max_tokens in ((4, 10_000), (2, None), (4, 130)):
            ranks = [list(BatchPlan(lengths, batch_size, max_tokens, True, shuffle=False, rank=r, world_size=world,
                                    equal_steps=False)) for r in range(world)]
            real = [i for batches in ranks for batch in batches for i in batch if not isinstance(i, Filler)]
            assert sorted(real) == list(range(9)) and all(ranks)
            assert len({len(batches) for batches in ranks}) == 1, (world, batch_size, [len(b) for b in ranks])
            fillers = [batch for batches in ranks for batch in batches if isinstance(batch[0], Filler)]
            assert all(batch == [0] for batch in fillers)  # the shortest example, alone
            if (world, batch_size) == (2, 2):  # 5 examples (3 batches) and 4 (2 batches)
                assert len(fillers) == 1 and isinstance(ranks[1][-1][0], Filler)
            if world == 12 and max_tokens == 10_000:  # 9 ranks with one batch, 3 with nothing else
                assert len(fillers) == 3
            if world == 1:
                assert not fillers
    # a filler is run (the same shapes as any batch) with no labels and no example index
    dataset = TokenizedDataset([([1, 5, 6, 2], 2), ([1, 7, 2], 1)])
    filler = collate_packed([dataset[Filler(1)]])
    assert filler["input_ids"].tolist() == [[1, 7, 2]] and (filler["labels"] == -100).all()
    assert filler["index"] == [None] and collate_packed([dataset[1]])["labels"].tolist() == [[-100, 7, 2]]
    # a single batch on 2 ranks in training: neither rank can take it alone
    assert [list(BatchPlan(lengths, 9, None, False, shuffle=True, rank=r, world_size=2)) for r in range(2)] == [[], []]
