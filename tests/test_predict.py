"""predict as users run it: rows in input order, merged or adapter weights alike, resume, per-row skips."""

import json

import pytest
import torch
import torch.nn.functional as F

from lit_mistral.cli import main
from test_export import adapted

QUESTIONS = ["Name a fish.", "What is the capital of France and why is it famous among travellers?", "Why?",
             "How do plants make food from sunlight, water and air?", "Say hi."]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict") / "adapter"
    adapted(tiny_model_dir).save_adapter(folder)
    return folder


def predict(tiny_model_dir, adapter_dir, questions, out, *extra):
    main(["predict", "--model.name_or_path", str(tiny_model_dir), "--model.compute_dtype", "float32",
          "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(questions.parent / "runs"), "--data.predict_path", str(questions),
          "--data.predict_batch_size", "2", "--ckpt_path", str(adapter_dir), "--model.max_new_tokens", "6",
          "--predictions.path", str(out), *map(str, extra)])
    return [json.loads(line) for line in out.read_text().split("\n") if line]


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "questions.txt"
    path.write_text("\n".join(QUESTIONS) + "\n")
    return path


def test_rows_in_input_order_and_merged_equals_adapter(tiny_model_dir, adapter_dir, questions, tmp_path):
    merged = predict(tiny_model_dir, adapter_dir, questions, tmp_path / "merged.jsonl", "--model.inference", "merged")
    applied = predict(tiny_model_dir, adapter_dir, questions, tmp_path / "adapter.jsonl",
                      "--model.inference", "adapter")
    assert [r["instruction"] for r in merged] == QUESTIONS and [r["index"] for r in merged] == list(range(5))
    # greedy decoding on the merged weights gives the answers of the 4-bit base + adapter
    assert [r["response"] for r in merged] == [r["response"] for r in applied]
    assert all(r["response_tokens"] == 6 and r["finish"] == "length" for r in merged)


def test_resume_keeps_finished_rows_and_fills_the_rest(tiny_model_dir, adapter_dir, questions, tmp_path):
    out = tmp_path / "answers.jsonl"
    # a generated text may hold U+2028/U+0085, which JSON leaves raw: they must not split rows
    done = {"index": 3, "instruction": QUESTIONS[3], "context": "", "response": "kept\u2028line\x85", "prompt_tokens": 1,
            "response_tokens": 1, "finish": "eos"}
    out.write_text(json.dumps(done, ensure_ascii=False) + "\n" + '{"index": 1, "instruction": "What is')  # killed
    with pytest.raises(SystemExit):  # an existing file is never overwritten silently
        predict(tiny_model_dir, adapter_dir, questions, out)
    rows = predict(tiny_model_dir, adapter_dir, questions, out, "--predictions.resume", "true")
    assert [r["index"] for r in rows] == list(range(5))
    assert rows[3] == done and all(r["response_tokens"] == 6 for i, r in enumerate(rows) if i != 3)


def test_resume_refuses_rows_of_other_inputs(tiny_model_dir, adapter_dir, questions, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    out.write_text(json.dumps({"index": 0, "instruction": "Something else."}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        predict(tiny_model_dir, adapter_dir, questions, out, "--predictions.resume", "true")
    assert exit_info.value.code == 2
    assert "answers.jsonl:1: this row does not belong to the current inputs" in capsys.readouterr().err


def test_prompt_longer_than_the_context_gets_a_skip_record(tiny_model_dir, adapter_dir, tmp_path):
    questions = tmp_path / "q.jsonl"
    long = " ".join(["fish"] * 1030)  # the tiny model's context is 1024 tokens
    questions.write_text(json.dumps({"instruction": "Name a fish."}) + "\n" + json.dumps({"instruction": long}) + "\n")
    rows = predict(tiny_model_dir, adapter_dir, questions, tmp_path / "out.jsonl")
    assert rows[0]["finish"] == "length" and rows[1]["finish"] == "skipped" and rows[1]["response"] is None
    assert "does not fit the model's context of 1024 tokens" in rows[1]["error"]


def test_output_folder_must_exist(tiny_model_dir, adapter_dir, questions, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict(tiny_model_dir, adapter_dir, questions, tmp_path / "missing" / "out.jsonl")
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_decode_attention_equals_sdpa_with_repeated_heads():
    """The decoding-step attention (grouped-query heads without copying K/V) gives SDPA's answer, with a left-padding
    mask as bool or additive float, and with none."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from lit_mistral.attention import decode_attention

    torch.manual_seed(0)
    b, h, h_kv, length, d = 3, 8, 2, 11, 16
    q, k, v = torch.randn(b, h, 1, d), torch.randn(b, h_kv, length, d), torch.randn(b, h_kv, length, d)
    keep = torch.ones(b, 1, 1, length, dtype=torch.bool)
    keep[0, ..., :4] = False  # row 0 is left-padded by 4
    for mask in (keep, torch.zeros(b, 1, 1, length).masked_fill(~keep, float("-inf")), None):
        expected = F.scaled_dot_product_attention(q, repeat_kv(k, h // h_kv), repeat_kv(v, h // h_kv),
                                                  attn_mask=mask, scale=0.3).transpose(1, 2)
        torch.testing.assert_close(decode_attention(q, k, v, mask, 0.3), expected, atol=1e-5, rtol=1e-5)


def test_generation_with_our_attention_equals_sdpa(tiny_model_dir, monkeypatch):
    """Greedy batched generation of left-padded prompts: the same tokens with lit_varlen (decoding steps through
    decode_attention) as with transformers' SDPA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_mistral import attention

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    batch = tokenizer(["Name a fish .", "Which is a species of fish ? Tope or Rope"], return_tensors="pt",
                      padding=True)
    calls = []
    decode = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention", lambda *a: calls.append(1) or decode(*a))
    out = {}
    for impl in ("sdpa", attention.NAME):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl).eval()
        out[impl] = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(out["sdpa"], out[attention.NAME])
    assert len(calls) == 11 * 2  # 11 decoding steps (the 12th token comes from the prompt's forward) x 2 layers


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_attention_equals_sdpa_on_real_tokens(side):
    """The prompts' forward packs each row's real tokens (no (T x T) scores of the padded batch): the same outputs
    as SDPA with the padding mask, at every real token."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from lit_mistral.attention import padded_attention

    torch.manual_seed(0)
    b, h, h_kv, t, d = 3, 8, 2, 9, 16
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, h_kv, t, d), torch.randn(b, h_kv, t, d)
    real = torch.ones(b, t, dtype=torch.bool)
    pads = {0: 4, 2: 1}
    for row, n in pads.items():
        if side == "left":
            real[row, :n] = False
        else:
            real[row, t - n :] = False
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = causal[None, None] & real[:, None, None, :]  # transformers' sdpa mask: causal and padding
    expected = F.scaled_dot_product_attention(q, repeat_kv(k, h // h_kv), repeat_kv(v, h // h_kv), attn_mask=mask,
                                              scale=0.3).transpose(1, 2)
    out = padded_attention(q, k, v, mask, 0.3, None)
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)
    assert not out[~real].any()


def test_training_kernels_stay_out_of_predict(tiny_model_dir, adapter_dir, questions, tmp_path):
    """`kernels: liger` is a training setting: a config that has it predicts with transformers' own modules (here on
    a CPU, where fit refuses it)."""
    rows = predict(tiny_model_dir, adapter_dir, questions, tmp_path / "out.jsonl", "--model.kernels", "liger")
    assert len(rows) == len(QUESTIONS) and all(r["finish"] == "length" for r in rows)
