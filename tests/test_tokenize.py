"""Tokenization with loss masking: exact token ids of a Mistral prompt, the prompt/response boundary on every real
Dolly record, and over-long examples dropped or cut."""

import json

import pytest

from lit_mistral.data.prompts import prompt_style
from lit_mistral.data.records import Example
from lit_mistral.data.tokenize import encode_examples, encode_prompts, fit_to_length


def test_overlong_examples_dropped_or_truncated():
    items = [([1] * 10, 3), ([1] * 30, 5), ([1] * 30, 25)]
    with pytest.warns(UserWarning, match="dropped 2 of 3"):
        assert len(fit_to_length(items, 20, "drop", "data.path")) == 1
    with pytest.warns(UserWarning) as record:
        kept = fit_to_length(items, 20, "truncate", "data.path")
    assert [len(ids) for ids, _ in kept] == [10, 20]  # the one whose prompt alone is too long is dropped
    assert any("truncated 1 of 3" in str(w.message) for w in record)


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
