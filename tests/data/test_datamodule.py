"""The DataModule: splits by record ranges or a seeded fraction, settings checked at construction, loaders that
keep to their token budget and name their examples."""

import pytest
import torch
from conftest import write_jsonl

from lit_mistral.data.datamodule import InstructionDataModule
from lit_mistral.errors import LitMistralError


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


def chat(records: list[dict], shape: str = "messages") -> dict:
    """A conversation whose turns are demo records' instructions and responses (words the tiny tokenizer knows)."""
    turns = [{"role": role, "content": r[key]} for r in records for role, key in (("user", "instruction"),
                                                                                  ("assistant", "response"))]
    if shape == "sharegpt":
        return {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]}
                                  for t in turns]}
    return {"messages": turns, "category": "open_qa"}


def test_conversations_are_detected_and_only_assistant_turns_carry_loss(tiny_model_dir, tmp_path, caplog,
                                                                       demo_records):
    """A file of `messages` rows is read as conversations (said in the log); each assistant turn and its end of
    turn carry the loss, packed or padded; a file of the other shape is one clear error."""
    import logging

    path = write_jsonl(tmp_path / "chat.jsonl", [chat(demo_records[:2])] * 6)
    dm = InstructionDataModule(path=str(path), tokenizer=str(tiny_model_dir), prompt_style="chat_template",
                               train_records=(0, 4), val_records=(4, 6), batch_size=2, packing=True)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert "holds conversations (messages shape)" in caplog.text
    batch = next(iter(dm.val_dataloader()))
    labels = batch["labels"][0][batch["labels"][0] != -100].tolist()
    answers = " </s> ".join(r["response"] for r in demo_records[:2]) + " </s>"
    assert dm.tokenizer.decode(labels) == dm.tokenizer.decode(dm.tokenizer(f"{answers} {answers}")["input_ids"][1:])
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [chat(demo_records[:1]), chat(demo_records[:1], "sharegpt")])
    with pytest.raises(LitMistralError, match=r"mixed.jsonl:2: has 'conversations' \(sharegpt shape\) but "):
        InstructionDataModule(path=str(mixed), tokenizer=str(tiny_model_dir), prompt_style="chat_template").setup("fit")
    with pytest.raises(LitMistralError, match="prompt_style=alpaca has no form for conversations"):
        InstructionDataModule(path=str(path), tokenizer=str(tiny_model_dir), prompt_style="alpaca").setup("fit")


def test_conversations_and_records_do_not_mix(tiny_model_dir, tmp_path, demo_records):
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat(demo_records[:1])] * 4)
    records = write_jsonl(tmp_path / "records.jsonl", demo_records[:4])
    dm = InstructionDataModule(path=str(chats), val_path=str(records), tokenizer=str(tiny_model_dir),
                               prompt_style="chat_template")
    with pytest.raises(LitMistralError, match="holds instruction data where the data read before holds messages"):
        dm.setup("fit")


def test_an_enormous_record_is_cut_before_it_is_tokenized(tiny_model_dir, tmp_path, demo_records, monkeypatch):
    """A record of megabytes (valid JSON) costs what data.overlong says, in training and in validation, not minutes
    and gigabytes of tokenizing."""
    from transformers import AutoTokenizer

    records = [dict(r) for r in demo_records[:8]]
    records[2]["response"] = records[7]["response"] = "fish water " * 300_000  # 3.3 MB each
    dm = datamodule(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", records), train_records=(0, 6),
                    val_records=(6, 8))
    dm.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenize, longest = type(dm.tokenizer).__call__, []

    def counting(self, text, **kwargs):
        longest.append(max(map(len, [text] if isinstance(text, str) else text)))
        return tokenize(self, text, **kwargs)

    monkeypatch.setattr(type(dm.tokenizer), "__call__", counting)
    with pytest.warns(UserWarning, match=r"data.path: dropped 1 of 6 examples longer than data.max_length=256"):
        dm.setup("fit")
    assert max(longest) < 100_000 and len(dm.train_set) == 5
    assert len(dm.val_set) == 2 and max(dm.val_set.lengths) == 256  # validation keeps it, truncated


@pytest.mark.parametrize("broken, line, error", [
    ("{% for m in messages %}\n{{ m['content'] }}\n", 2, "TemplateSyntaxError"),  # no endfor: at the end
    ("{% for m in messages %}\n<|{{ m['role'] }}|>\n{{ m.content.no_such() }}</s>{% endfor %}", 3, "UndefinedError"),
])
def test_a_broken_chat_template_is_named_with_its_line_before_the_data(tiny_model_dir, tmp_path, demo_records, broken,
                                                                       line, error):
    """Broken Jinja is the template's fault, not every conversation's: one error naming the template file and its
    line, even with skip_invalid (which used to drop every conversation and then blame max_length)."""
    template = tmp_path / "chat.jinja"
    template.write_text(broken)
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(demo_records[:2])] * 4)
    for skip_invalid in (False, True):
        dm = datamodule(tiny_model_dir, path, prompt_style="chat_template", chat_template=str(template),
                        skip_invalid=skip_invalid)
        with pytest.raises(LitMistralError) as err:
            dm.setup("fit")
        assert str(err.value).startswith(f"data.chat_template {template}, line {line}: the Jinja template fails "
                                         f"({error}: "), str(err.value)
        assert "Fix: correct the template" in str(err.value) and "chat.jsonl" not in str(err.value)
