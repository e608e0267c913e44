"""Reading and checking records: every format, remapped fields, predict inputs, every bad record named by file and
line, all at once or skipped."""

import json

import pytest
from conftest import write_jsonl

from lit_mistral.data.records import Fields, read_examples
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
    fields = Fields(instruction="prompt", context="input", response="output", category=None)
    [example] = read_examples(str(path), fields, "data.path")
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


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "questions.txt"])
def test_a_byte_order_mark_is_dropped(tmp_path, name):
    """Windows editors start UTF-8 files with a byte order mark; it is not part of the first record."""
    text = {"train.jsonl": json.dumps(GOOD) + "\n", "train.json": json.dumps([GOOD]),
            "questions.txt": "Name a fish.\n"}[name]
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    [example] = read_examples(str(path), Fields(), "data.path", need_response=name != "questions.txt")
    assert example.instruction == "Name a fish."


def test_a_folder_is_named_as_a_folder(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(LitMistralError, match=r"data.path: '.*data' is a folder, not a file\. Fix: give a file in "
                                              r"it \(\.jsonl, \.json, \.parquet, \.csv\)\."):
        read(tmp_path / "data")


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_fields_no_record_has_are_one_error_naming_what_is_there(tmp_path, fmt):
    import datasets

    alpaca = [{"prompt": "Name a fish.", "input": "", "output": "Tope"}] * 5
    path = tmp_path / f"alpaca.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, alpaca)
    else:
        getattr(datasets.Dataset.from_list(alpaca), f"to_{fmt}")(str(path))
    with pytest.raises(LitMistralError) as err:
        read(path)
    noun = "field" if fmt == "jsonl" else "column"
    what = (f"{path} has no column 'instruction' (data.fields.instruction) and no column 'response' "
            f"(data.fields.response); its columns are ['input', 'output', 'prompt']" if noun == "column" else
            f"no record of {path} has the field 'instruction' (data.fields.instruction) or the field 'response' "
            f"(data.fields.response); the records' fields are ['input', 'output', 'prompt']")
    assert str(err.value) == (f"data.path: {what}. Fix: name the {noun}s that hold them: --data.fields.instruction "
                              f"<{noun}> --data.fields.response <{noun}>.")
    examples = read_examples(str(path), Fields(instruction="prompt", context="input", response="output"), "data.path")
    assert len(examples) == 5


def test_json_messages_ending_in_at_and_null_fields_read_well(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, '{"instruction": "Name a fish', {**GOOD, "response": None}])
    with pytest.raises(LitMistralError) as err:
        read(path)
    assert "bad.jsonl:2: malformed JSON (Unterminated string starting at column 17)" in str(err.value)
    assert "bad.jsonl:3: field 'response' is null" in str(err.value)
