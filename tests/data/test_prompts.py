"""Prompt styles: the Mistral, Alpaca and chat-template formats, and the choices named when a style is unknown."""

import pytest

from lit_mistral.data.prompts import prompt_style
from lit_mistral.data.records import Example
from lit_mistral.errors import LitMistralError


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
