"""What `serve` and `chat` share (`LitTrainer._generation_state`, lit_mistral/serving.py): the model loaded from an
adapter on the 4-bit base or from an `export` folder, and the answer text streamed and cut at stop strings. Driven
through `chat` in this process (a piped conversation): `serve` loads through the same function."""

import io
import sys

import pytest
from conftest import cli_args, run_cli

from lit_mistral.serving import TextStream

TURNS = ["Name a fish.", "Why?"]


def chat(capsys, monkeypatch, model_dir, root, *extra) -> list[str]:
    """The answers of a chat on `model_dir` to TURNS, piped in (greedy, 6 new tokens each), one line each."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(TURNS) + "\n"))
    capsys.readouterr()
    run_cli(*cli_args("chat", model_dir, root, "--model.compute.dtype", "float32",
                      "--model.generation.max_new_tokens", "6", *extra))
    out = capsys.readouterr().out
    return out.split("\n")[:-1]


def test_the_adapter_on_the_4bit_base_answers_as_its_export_folder(tiny_model_dir, adapter_dir, tmp_path, capsys,
                                                                   monkeypatch):
    base = chat(capsys, monkeypatch, tiny_model_dir, tmp_path / "runs")
    adapter = chat(capsys, monkeypatch, tiny_model_dir, tmp_path / "runs", "--ckpt_path", adapter_dir)
    exported = tmp_path / "merged"
    run_cli("export", "--model.name_or_path", tiny_model_dir, "--model.compute.dtype", "float32",
            "--trainer.accelerator", "cpu", "--ckpt_path", adapter_dir, "--output_dir", exported, "--dtype", "float32")
    # the export folder holds the merged weights in float32: served as they are, not quantized again
    merged = chat(capsys, monkeypatch, exported, tmp_path / "runs", "--model.quantization.method", "null")
    assert len(adapter) == len(TURNS) and all(adapter)
    assert merged == adapter
    assert base != adapter  # the adapter was loaded: its answers are not the bare base's


@pytest.mark.parametrize("stops, pieces, text, stopped", [
    ([], ["a", "b", "c"], "abc", False),
    (["bc"], ["", "a", ""], "a", True),  # the last letter is held back while it may begin "bc"
    (["x"], ["a", "b", "c"], "abc", False),
])
def test_text_stream_holds_back_what_may_begin_a_stop_string(stops, pieces, text, stopped):
    class Letters:  # token i is the letter "abc"[i]
        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return "".join("abc"[i] for i in ids)

    stream = TextStream(Letters(), stops)
    assert [stream.feed(i) for i in range(3)] == pieces
    assert "".join(pieces) + stream.finish() == text and stream.stopped == stopped


TEXTS = ["Hello wörld, the café is open!", "  two  spaces, 日本語 and émoji 🙂 ok", "New\nline\ttab end."]


@pytest.mark.parametrize("which", ["demo", "word"])
def test_text_stream_token_by_token_is_the_whole_answer_decoded(which, smollm2_gguf, tiny_model_dir):
    """Fed one token at a time, the stream's text is the answer decoded at once, through `tokenizers`' DecodeStream
    (both are fast tokenizers: the demo model's byte-level BPE, the tests' word tokenizer) and through the decoded
    windows (the same tokenizer seen without its backend)."""
    from lit_mistral.sources import load_tokenizer

    tokenizer = load_tokenizer(*smollm2_gguf) if which == "demo" else load_tokenizer(str(tiny_model_dir))
    class Windows:  # only `decode`: the way for tokenizers without a `tokenizers` backend
        decode = staticmethod(tokenizer.decode)

    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for decoder in (tokenizer, Windows()):
            stream = TextStream(decoder)
            assert (stream._stream is not None) == (decoder is tokenizer)
            streamed = "".join(stream.feed(i) for i in ids) + stream.finish()
            assert streamed == tokenizer.decode(ids, skip_special_tokens=True), (text, streamed)


def test_text_stream_goes_on_through_bytes_that_are_not_utf8(mistral_tokenizer):
    """Mistral's tokenizer has a token per byte; a model can generate bytes that form no character, which
    `tokenizers`' DecodeStream refuses ("Invalid prefix encountered"). The stream goes on with the windows from
    where it was: the same text as the windows alone give, and the whole decode wherever that is valid text."""
    import random

    class Windows:
        decode = staticmethod(mistral_tokenizer.decode)

    refused = [26688, 107, 150, 19539]  # a word, two bytes that are no character, a word: DecodeStream raises
    stream = TextStream(mistral_tokenizer)
    text = "".join(stream.feed(i) for i in refused) + stream.finish()
    assert stream._stream is None and text.startswith(mistral_tokenizer.decode(refused[:1])) and "\ufffd" in text
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(3, 259) if rng.random() < 0.4 else rng.randrange(mistral_tokenizer.vocab_size)
               for _ in range(30)]
        texts = []
        for decoder in (mistral_tokenizer, Windows()):
            stream = TextStream(decoder, stops=["\n\n"])
            texts.append("".join(stream.feed(i) for i in ids) + stream.finish())
        assert texts[0] == texts[1]
        whole = mistral_tokenizer.decode(ids, skip_special_tokens=True).split("\n\n")[0]
        if "\ufffd" not in whole:
            assert texts[0] == whole
