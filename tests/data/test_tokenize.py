"""Tokenization with loss masking: exact token ids of a Mistral prompt, the prompt/response boundary on every real
Dolly record, and over-long examples dropped or cut."""

import json

import pytest

from lit_mistral.data.prompts import prompt_style
from lit_mistral.data.records import Example
from lit_mistral.data.tokenize import encode_examples, encode_prompts, fit_to_length, longest_token


class Counting:
    """A tokenizer that remembers the longest text it was given to tokenize."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, *map(len, [text] if isinstance(text, str) else text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def word_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_overlong_examples_dropped_or_truncated():
    items = [([1] * 10, 3), ([1] * 30, 5), ([1] * 30, 25)]
    with pytest.warns(UserWarning, match="dropped 2 of 3"):
        assert len(fit_to_length(items, 20, "drop", "data.path")) == 1
    with pytest.warns(UserWarning) as record:
        kept = fit_to_length(items, 20, "truncate", "data.path")
    assert [len(ids) for ids, _ in kept] == [10, 20]  # the one whose prompt alone is too long is dropped
    assert any("truncated 1 of 3" in str(w.message) for w in record)


def test_an_enormous_record_costs_what_overlong_says(word_tokenizer):
    """A field of millions of characters is cut before tokenizing to what can matter for max_length tokens: the
    example is still over-long (dropped or truncated and counted like any other), its first max_length tokens are
    the whole record's, and no text longer than a few thousand characters is tokenized."""
    style, spy = prompt_style("mistral"), Counting(word_tokenizer)
    enormous = "fish water " * 200_000  # 2.2 million characters
    examples = [Example("Name a fish.", "", enormous), Example("Name a fish.", enormous, "Tope"),
                Example("Say hi.", "", "Hi.")]
    items = encode_examples(examples, style, spy, max_length=64)
    assert spy.longest <= 65 * longest_token(word_tokenizer) + 100 and all(len(ids) > 64 for ids, _ in items[:2])
    with pytest.warns(UserWarning, match=r"data.path: dropped 2 of 3 examples longer than data.max_length=64"):
        assert [len(ids) for ids, _ in fit_to_length(items, 64, "drop", "data.path")] == [len(items[2][0])]
    long = [Example("Name a fish.", "", "fish water " * 2000)]  # long enough to be cut, short enough to compare
    [(ids, n_prompt)] = encode_examples(long, style, word_tokenizer, max_length=64)
    [(whole, _)] = encode_examples(long, style, word_tokenizer)
    with pytest.warns(UserWarning, match="truncated 1 of 1"):
        assert fit_to_length([(ids, n_prompt)], 64, "truncate", "data.path") == [(whole[:64], n_prompt)]


def test_a_long_unknown_word_is_not_taken_for_a_long_record(word_tokenizer):
    """A word-level tokenizer reads a word it does not know as one token, however long: cutting tells nothing then,
    and the record is tokenized whole."""
    example = Example("Name a fish.", "", "x" * 5000)
    style = prompt_style("mistral")
    assert encode_examples([example], style, word_tokenizer, max_length=64) == encode_examples([example], style,
                                                                                               word_tokenizer)


# -- the real Mistral-7B tokenizer ---------------------------------------------------------------------------------


def test_exact_token_ids_of_a_mistral_prompt(mistral_tokenizer):
    example = Example("Which is a species of fish? Tope or Rope", "", "Tope")
    [(ids, n_prompt)] = encode_examples([example], prompt_style("mistral"), mistral_tokenizer)
    # <s> ▁[ INST ] ▁Which ▁is ▁a ▁species ▁of ▁fish ? ▁To pe ▁or ▁R ope ▁[ / INST ] | ▁To pe </s>
    assert ids == [1, 733, 16289, 28793, 9595, 349, 264, 7018, 302, 8006, 28804, 1791, 386, 442, 399, 1845, 733,
                   28748, 16289, 28793, 1791, 386, 2]
    assert n_prompt == 20
    assert encode_prompts([example], prompt_style("mistral"), mistral_tokenizer) == [ids[:n_prompt]]


def test_masking_boundary_is_exact_on_real_dolly_records(mistral_tokenizer, dolly_path):
    """For every real record: the prompt ids are what predict feeds the model, the rest are exactly the tokens of
    the response followed by EOS, and an empty context never shows up as text."""
    rows = [json.loads(line) for line in dolly_path.read_text().splitlines()]
    examples = [Example(r["instruction"], r["context"], r["response"], r["category"]) for r in rows]
    style = prompt_style("mistral")
    encoded = encode_examples(examples, style, mistral_tokenizer)
    prompts = encode_prompts(examples, style, mistral_tokenizer)
    assert len(encoded) == 228
    for example, (ids, n_prompt), prompt_ids in zip(examples, encoded, prompts):
        assert ids[:n_prompt] == prompt_ids
        assert ids[0] == mistral_tokenizer.bos_token_id and ids[-1] == mistral_tokenizer.eos_token_id
        assert mistral_tokenizer.eos_token_id not in ids[:-1]
        response_ids = ids[n_prompt:-1]
        assert mistral_tokenizer.decode(response_ids) == example.response.strip()
        prompt_text = mistral_tokenizer.decode(prompt_ids, skip_special_tokens=True)
        assert prompt_text.endswith("[/INST]") and "None" not in prompt_text.replace(example.instruction, "").replace(
            example.context, "")
        if not example.context:
            assert "\n\n" not in prompt_text.replace(example.instruction, "")
