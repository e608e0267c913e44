"""Predict's writer helpers without a run: which file `--predictions.overwrite` may replace, what resuming reads back
from an interrupted run (a cut-short last line dropped; a foreign row, or one made with other settings, refused),
and the generation rate the writer reports and the bar shows. (The writer itself runs in the predict journeys.)"""

import json

import pytest

from lit_mistral.errors import LitMistralError
from lit_mistral.predictions import GenerationRate, is_predictions, partial_path, read_done


def rows(*indexed: tuple[int, str], generation: dict | None = None) -> str:
    return "".join(json.dumps({"index": i, "instruction": text, **({"generation": generation} if generation else {})})
                   + "\n" for i, text in indexed)


def test_only_predictions_may_be_overwritten(tmp_path):
    path = tmp_path / "out.jsonl"
    for text, expected in [("", True), (rows((0, "a")), True), ('{"instruction": "a", "output": "b"}\n', False),
                           ("not json\n", False)]:
        path.write_text(text)
        assert is_predictions(path) is expected, text
    assert partial_path(path).name == "out.jsonl.partial"


def test_read_done_keeps_whole_rows_and_refuses_foreign_ones(tmp_path):
    path, inputs = tmp_path / "out.jsonl.partial", ["a", "b", "c"]
    path.write_text(rows((2, "c"), (0, "a")) + '{"index": 1, "instr')  # killed mid-line
    assert sorted(read_done(path, inputs)) == [0, 2]
    path.write_text(rows((0, "a"), (1, "x")))
    with pytest.raises(LitMistralError, match=r"out.jsonl.partial:2: this row does not belong to the current inputs"):
        read_done(path, inputs)
    path.write_text(rows((0, "a"), generation={"do_sample": True}))
    with pytest.raises(LitMistralError, match=r"model.generation.do_sample: the rows have True, this run False"):
        read_done(path, inputs, {"do_sample": False})
    assert list(read_done(path, inputs)) == [0]  # no settings to compare with: kept


def test_generation_rate_counts_rows_and_tokens():
    rate = GenerationRate()
    rate.start()
    rate.add([{"response_tokens": 3}, {"response_tokens": 5}])
    rate.add([{"response_tokens": 0}])
    assert (rate.rows, rate.tokens) == (3, 8)
    rows, tokens = rate.per_second()
    assert tokens == pytest.approx(rows * 8 / 3)
    assert "rows/s" in str(rate) and "new tokens/s" in str(rate)
