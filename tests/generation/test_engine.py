"""The continuous-batching engine against transformers' own `generate`, on tiny random models: greedy answers token
for token (rows refilled, rows spanning several blocks, prompts waiting for free blocks), EOS, seeded sampling, a
peft LoRA model, what the engine refuses. GPU tests: CUDA graphs against eager decoding. (The paged attention and
the sampling have their own files.)"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from lit_mistral.errors import LitMistralError
from lit_mistral.generation.engine import Engine
from lit_mistral.generation.session import Answer

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=97, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None,
             eos_token_id=None, pad_token_id=0)


def tiny(family: str = "mistral", seed: int = 0, **overrides):
    """A 2-layer model of the family with random weights (Qwen2: biased q/k/v projections)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                   "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    return cls(config(**{**SIZES, **overrides})).eval()


def workload(n: int = 10, seed: int = 1, longest: int = 30, most_new: int = 40):
    """n prompts of 1 .. longest tokens, each with its own max_new_tokens in 1 .. most_new."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, longest + 1, (n,), generator=g)
    prompts = [torch.randint(1, 97, (int(k),), generator=g).tolist() for k in sizes]
    return prompts, [int(k) for k in torch.randint(1, most_new + 1, (n,), generator=g)]


def hf_greedy(model, prompt, max_new, eos=None) -> list[int]:
    """transformers' greedy generate with a KV cache, for one prompt; the EOS it stops at is dropped."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         use_cache=True, eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
    return out[:out.index(eos)] if eos in out else out


def spy_batches(monkeypatch, engine) -> list[int]:
    """Record the rows of every decoding step."""
    sizes, decode = [], engine._decode
    monkeypatch.setattr(engine, "_decode", lambda rows: sizes.append(len(rows)) or decode(rows))
    return sizes


@pytest.mark.parametrize("family", ["mistral", "llama", "qwen2"])
@pytest.mark.parametrize("max_tokens,pool_bound", [(400, False), (72, True)])
def test_greedy_answers_equal_generate(family, max_tokens, pool_bound, monkeypatch):
    """3 rows for 10 prompts (rows are refilled), blocks of 4 positions (rows span several); with 72 positions
    the pool, not the rows, bounds how many run at once, and prompts wait for blocks."""
    model = tiny(family)
    prompts, new = workload()
    engine = Engine(model, max_rows=3, max_tokens=max_tokens, block_size=4)
    batches = spy_batches(monkeypatch, engine)
    answers = engine.generate(prompts, new)
    assert [a.tokens for a in answers] == [hf_greedy(model, p, n) for p, n in zip(prompts, new)]
    assert [a.finish for a in answers] == ["length"] * len(prompts)
    assert [len(a.tokens) for a in answers] == new
    assert (max(batches) < 3) == pool_bound
    assert sum(batches) == sum(new) - len(prompts)  # every token after the first comes from a decoding step


def test_eos_stops_a_row_and_on_finish_sees_each_answer_once():
    model = tiny("mistral", seed=3)
    prompts, new = workload(n=8, seed=4)
    plain = Engine(model, max_rows=4, max_tokens=400, block_size=4).generate(prompts, new)
    longest = max(plain, key=lambda a: len(a.tokens)).tokens
    eos = longest[len(longest) // 2]  # a token the model does emit, mid-answer
    never = next(t for t in range(97) if all(t not in a.tokens for a in plain))  # a second EOS id, not emitted
    seen = []
    answers = Engine(model, max_rows=4, max_tokens=400, block_size=4).generate(
        prompts, new, eos_token_ids=[never, eos], on_finish=lambda i, a: seen.append((i, a)))
    for a, p, n, full in zip(answers, prompts, new, plain):
        stopped = eos in full.tokens
        assert a == Answer(full.tokens[:full.tokens.index(eos)] if stopped else full.tokens,
                           "eos" if stopped else "length")
        assert a.tokens == hf_greedy(model, p, n, eos=eos)
    assert any(a.finish == "eos" for a in answers) and any(a.finish == "length" for a in answers)
    assert sorted(i for i, _ in seen) == list(range(len(prompts)))
    assert dict(seen) == dict(enumerate(answers))


def test_sampling_is_reproducible_and_follows_the_seed():
    model = tiny("llama", seed=5)
    prompts, new = workload(n=6, seed=6)
    settings = dict(do_sample=True, temperature=0.9, top_k=30, top_p=0.95)

    def run(seed, rows=3):
        return [a.tokens for a in Engine(model, max_rows=rows, max_tokens=400, block_size=4).generate(
            prompts, new, seed=seed, **settings)]

    first = run(0)
    assert run(0) == first
    assert run(0, rows=6) == first  # a prompt's noise depends on the seed, the prompt and its step, not its batch
    assert run(1) != first
    assert first != [hf_greedy(model, p, n) for p, n in zip(prompts, new)]


def lora(family: str, quantize: bool, dtype=torch.float32, tmp_path=None):
    """A tiny model with a random non-zero LoRA adapter on every linear layer; quantize: on a real bitsandbytes NF4
    base (CPU), computing in `dtype`. The LoRA weights are float32 either way."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = tiny(family, seed=7)
    if quantize:
        base.save_pretrained(tmp_path)
        base = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
    torch.manual_seed(8)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])).eval()


@pytest.mark.parametrize("family,quantize", [("mistral", False), ("llama", False), ("mistral", True)])
def test_lora_model_answers_equal_its_generate(family, quantize, tmp_path):
    model = lora(family, quantize, tmp_path=tmp_path)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules()) == quantize
    prompts, new = workload(n=6, seed=9)
    answers = Engine(model, max_rows=2, max_tokens=200, block_size=4).generate(prompts, new)
    expected = [hf_greedy(model, p, n) for p, n in zip(prompts, new)]
    assert [a.tokens for a in answers] == expected
    with model.disable_adapter():
        assert [hf_greedy(model, p, n) for p, n in zip(prompts, new)] != expected  # the adapter does something


def test_nf4_lora_under_bf16_autocast_picks_the_argmax(tmp_path):
    """float32 LoRA weights over a bf16-computing NF4 base, under bf16 autocast (Lightning's bf16-mixed): the cache
    is bf16, and every token is the argmax of the model's own logits for the answer so far (teacher-forced), up to
    bf16 rounding. (Exact sequences are not compared: random tiny models give exact bf16 ties, broken either way.)"""
    model = lora("mistral", True, torch.bfloat16, tmp_path)
    prompts, new = workload(n=6, seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine = Engine(model, max_rows=2, max_tokens=200, block_size=4)
        answers = engine.generate(prompts, new)
        assert engine.dtype == torch.bfloat16 and [len(a.tokens) for a in answers] == new
        for prompt, answer in zip(prompts, answers):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + answer.tokens])).logits[0, len(prompt) - 1:-1].float()
            chosen = logits.gather(1, torch.tensor(answer.tokens)[:, None])[:, 0]
            assert (logits.max(1).values - chosen).max() <= 0.01  # bf16 resolves ~0.002 at these logit sizes


def test_supports_refuses_what_it_cannot_run():
    assert Engine.supports(tiny("mistral")) == (True, "")
    assert Engine.supports(tiny("llama")) == (True, "")
    assert Engine.supports(tiny("qwen2")) == (True, "")
    ok, reason = Engine.supports(tiny("mistral", final_logit_softcapping=30.0))
    assert not ok and "final_logit_softcapping" in reason
    ok, reason = Engine.supports(tiny("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                  "rope_theta": 10000.0}))
    assert not ok and "dynamic" in reason
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(**{**SIZES, "head_dim": 16}))
    ok, reason = Engine.supports(gemma)
    assert not ok and "gemma2" in reason
    with pytest.raises(LitMistralError, match="gemma2"):
        Engine(gemma, max_rows=2, max_tokens=64)


def test_generate_refuses_rows_it_cannot_hold():
    engine = Engine(tiny("mistral", sliding_window=16), max_rows=2, max_tokens=64, block_size=4)
    with pytest.raises(LitMistralError, match="sliding window of 16") as err:
        engine.generate([[1] * 10, [1] * 10, [1] * 60], [7, 8, 10])
    assert "prompt 0" not in str(err.value) and "prompt 1:" in str(err.value)
    assert "do not fit max_tokens=64" in str(err.value)  # prompt 2
    assert list(engine.problems([[1] * 10, [1] * 10, [1] * 60], [7, 8, 10])) == [1, 2]
    with pytest.raises(LitMistralError, match=r"model.eval\(\)"):
        engine.model.train()
        engine.generate([[1] * 10], [7])
    engine.model.eval()
    # 16 positions: inside the window, where the model's windowed attention sees every position
    assert engine.generate([[5] * 10], [7])[0].tokens == hf_greedy(engine.model, [5] * 10, 7)


# ---- GPU ----


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantized", [False, True])
def test_cuda_graphs_give_the_eager_answers(quantized, tmp_path):
    """bf16 (or a 4-bit base with float32 LoRA weights under bf16 autocast, as Lightning's bf16-mixed runs it): the
    same greedy answers with and without CUDA graphs, and every bucket captured (no fallback to eager)."""
    model = tiny("mistral", seed=11).to("cuda", torch.bfloat16)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=quantized)
    if quantized:
        from peft import LoraConfig, get_peft_model
        from transformers import BitsAndBytesConfig

        model.save_pretrained(tmp_path)
        model = MistralForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map={"": "cuda"},
                                                   quantization_config=BitsAndBytesConfig(
                                                       load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16))
        model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear")).eval()
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    prompts, new = workload(n=40, seed=12, longest=50, most_new=60)
    runs = {}
    for graphs in (True, False):
        engine = Engine(model, max_rows=20, max_tokens=4000, block_size=16, cuda_graphs=graphs)
        with autocast:
            runs[graphs] = engine.generate(prompts, new)
        assert engine.cuda_graphs == graphs and (len(engine.graphs) > 3) == graphs
        assert engine.dtype == torch.bfloat16
    assert runs[True] == runs[False]
    assert [len(a.tokens) for a in runs[True]] == new


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_kernels_in_the_engine_answer_as_generate():
    """`compute.kernels: liger` applies on a GPU in generation too: the engine (CUDA graphs on) runs Liger's RMSNorm,
    SwiGLU and RoPE as the model calls them, and its greedy answers (float32; the Triton decode kernel's dot products
    run in TF32, so one row in six may take another branch at a near-tie) equal transformers' generate on the same
    patched model."""
    pytest.importorskip("liger_kernel")
    from lit_mistral.modeling.build import apply_kernels

    model = tiny("mistral", seed=13).to("cuda")
    plain = [hf_greedy(model, p, n) for p, n in zip(*workload(n=6, seed=14))]
    apply_kernels(model)
    assert model.model.norm._get_name() == "LigerRMSNorm"  # Liger patches instances and their names
    prompts, new = workload(n=6, seed=14)
    engine = Engine(model, max_rows=4, max_tokens=2000, block_size=16)
    answers = engine.generate(prompts, new)
    assert engine.cuda_graphs and engine.graphs
    theirs = [hf_greedy(model, p, n) for p, n in zip(prompts, new)]
    assert sum(a.tokens == b for a, b in zip(answers, theirs)) >= len(theirs) - 1, ([a.tokens for a in answers], theirs)
    assert sum(a == b for a, b in zip(theirs, plain)) >= len(plain) - 1  # Liger computes what the modules compute
