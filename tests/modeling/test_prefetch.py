"""The background prefetch (`modeling/prefetch.py`): what it imports, that the CLI starts it before the data's setup,
and that the build waits for it."""

import threading
import time

import pytest
import torch
from conftest import cli_args, cli_fails, make_module, write_jsonl

from lit_mistral.modeling import prefetch


@pytest.fixture
def no_prefetch_yet(monkeypatch):
    monkeypatch.setattr(prefetch, "_thread", None)


def test_imports_what_the_build_needs_once(no_prefetch_yet, monkeypatch):
    """peft; bitsandbytes for a quantized base; Liger's patching module when its kernels will be applied (training,
    or generating on CUDA); once per process."""
    imported = []
    monkeypatch.setattr(prefetch.importlib, "import_module", imported.append)
    prefetch.start("liger", quantized=True, on_cuda=False, training=True)
    prefetch.wait()
    assert imported == ["peft", "peft.tuners.lora.layer", "bitsandbytes", "liger_kernel.transformers.monkey_patch"]
    prefetch.start(None, quantized=False, on_cuda=False, training=False)  # started already: nothing more
    prefetch.wait()
    assert len(imported) == 4
    monkeypatch.setattr(prefetch, "_thread", None)
    imported.clear()
    prefetch.start("liger", quantized=False, on_cuda=False, training=False)  # generating on a CPU: no Liger
    prefetch.wait()
    assert imported == ["peft", "peft.tuners.lora.layer"]


def test_a_failed_import_is_left_to_the_build(no_prefetch_yet, monkeypatch):
    def fail(name):
        raise ImportError(name)

    monkeypatch.setattr(prefetch.importlib, "import_module", fail)
    prefetch.start("liger", quantized=True, on_cuda=True, training=True)
    prefetch.wait()  # no exception: the build's own import says what is missing


def test_the_build_waits_for_the_prefetch(tiny_model_dir, monkeypatch):
    """build_model imports nothing before the prefetch thread is done (no module imported by two threads)."""
    from lit_mistral.modeling import build

    done, seen = [], []
    slow = threading.Thread(target=lambda: (time.sleep(0.5), done.append(True)))
    monkeypatch.setattr(prefetch, "_thread", slow)
    load_tokenizer = build.load_tokenizer
    monkeypatch.setattr(build, "load_tokenizer", lambda *a: (seen.append(list(done)), load_tokenizer(*a))[1])
    slow.start()
    make_module(tiny_model_dir, compute={"dtype": "float32", "gradient_checkpointing": False}).build(
        torch.device("cpu"))
    assert seen == [[True]]


def test_fit_starts_it_before_the_data_is_read(no_prefetch_yet, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The CLI starts the prefetch before Lightning sets up the data (a data error there comes after it), with the
    run's settings."""
    calls = []
    monkeypatch.setattr(prefetch, "start", lambda *args: calls.append(args))
    data = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "response": "b"}, '{"instruction": '])
    err = cli_fails(capsys, *cli_args("fit", tiny_model_dir, tmp_path / "runs", "--trainer.max_steps", "1",
                                      data=data))
    assert "bad.jsonl:2: malformed JSON" in err
    assert calls == [(None, True, False, True)]  # no Liger kernels (a CPU run), NF4, not on CUDA, training
