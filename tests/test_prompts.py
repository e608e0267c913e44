import json

import pytest

from lit_mistral.data import encode_examples, encode_prompts
from lit_mistral.errors import LitMistralError
from lit_mistral.prompts import Example, prompt_style


def test_mistral_format_with_and_without_context():
    style = prompt_style("mistral")
    assert style.apply(Example("Name a fish.", "", "Tope")) == ("[INST] Name a fish. [/INST]", " Tope")
    assert style.apply(Example("Summarize.", "Some text.", "Short.")) == (
        "[INST] Summarize.\n\nSome text. [/INST]", " Short.")
    assert style.apply(Example("Name a fish.")) == ("[INST] Name a fish. [/INST]", "")


def test_alpaca_format_has_input_section_only_with_context():
    style = prompt_style("alpaca")
    prompt, response = style.apply(Example("Name a fish.", "", "Tope"))
    assert "### Input" not in prompt and prompt.endswith("### Instruction:\nName a fish.\n\n### Response:\n")
    assert response == "Tope"
    prompt, _ = style.apply(Example("Summarize.", "Some text.", "Short."))
    assert "### Input:\nSome text.\n\n### Response:\n" in prompt


def test_chat_template_splits_prompt_and_response(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt, response = prompt_style("chat_template", tok).apply(Example("Name a fish.", "", "Tope"))
    assert prompt == "<|user|> Name a fish.\n<|assistant|>"
    assert response == " Tope"  # the template's </s> is cut: tokenization appends the EOS id itself


def test_chat_template_needs_a_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    with pytest.raises(LitMistralError, match="has none"):
        prompt_style("chat_template", tok)


def test_unknown_prompt_style_names_the_choices():
    with pytest.raises(LitMistralError, match=r"unknown prompt style 'llama'.*alpaca, chat_template, mistral"):
        prompt_style("llama")


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
