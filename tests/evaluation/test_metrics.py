"""Evaluation metrics: answer normalization, ROUGE-L offline, per-category accumulation."""

import socket
import sys

import pytest
import torch

from lit_mistral.evaluation.metrics import SplitMetrics, contains_answer, exact_match, normalize, rouge_l


def test_normalize_exact_match_and_contains():
    assert normalize("  The Eiffel-Tower, in PARIS!  ") == "eiffel tower in paris"
    assert exact_match("Metal.", "metal") and exact_match("the answer: 42", "Answer 42")
    assert not exact_match("It is a metal.", "Metal")
    assert contains_answer("It is a metal.", "Metal")
    assert contains_answer("Trident and Hubba Bubba are gum.", "hubba bubba")
    assert not contains_answer("It is metallic.", "metal")  # whole words only
    assert not contains_answer("anything", "...")  # a reference with no words is never contained


def test_rouge_l_runs_offline_without_nltk(monkeypatch):
    """No nltk (stemming and rougeLsum would need it and its punkt download) and no network."""
    monkeypatch.setitem(sys.modules, "nltk", None)  # `import nltk` now raises ImportError

    def no_network(*args, **kwargs):
        raise AssertionError("ROUGE-L tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    # LCS "the cat sat": precision 3/3, recall 3/6
    assert rouge_l("The cat sat.", "the cat sat on the mat") == pytest.approx(2 * 1.0 * 0.5 / 1.5, abs=1e-6)
    assert rouge_l("", "a reference") == 0.0
    # per-example scores averaged (what SplitMetrics does per category) equal torchmetrics' ROUGEScore
    from torchmetrics.text.rouge import ROUGEScore

    preds, refs = ["red green blue", "one two", "x"], ["green blue red", "one two three", "y"]
    metric = ROUGEScore(rouge_keys=("rougeL",))
    metric.update(preds, refs)
    assert float(metric.compute()["rougeL_fmeasure"]) == pytest.approx(
        sum(rouge_l(p, r) for p, r in zip(preds, refs)) / 3, abs=1e-6)


def test_split_metrics_overall_and_per_category():
    metrics = SplitMetrics(["closed_qa", "open_qa", "closed_qa", None], ["closed_qa", "open_qa"])
    # two batches; losses are summed per example with token counts: means are token-weighted
    metrics.update_loss(torch.tensor([6.0, 2.0]), torch.tensor([3, 1]), ["closed_qa", "open_qa"])
    metrics.update_loss(torch.tensor([1.0, 4.0]), torch.tensor([1, 4]), ["closed_qa", None])
    metrics.score([{"response": "Paris.", "reference": "paris", "category": "closed_qa"},
                   {"response": "a b c d", "reference": "a b", "category": "open_qa"}])
    out = metrics.compute()
    assert out["loss"] == pytest.approx(13 / 9)
    assert out["closed_qa/loss"] == pytest.approx(7 / 4) and out["open_qa/loss"] == pytest.approx(2.0)
    assert out["ppl"] == pytest.approx(torch.tensor(13 / 9).exp().item())
    assert out["closed_qa/rougeL"] == 1.0 and out["open_qa/rougeL"] == pytest.approx(2 * 0.5 / 1.5)
    assert out["rougeL"] == pytest.approx((1.0 + 2 / 3) / 2)
    # exact match and contains-answer only where the reference is a closed-form answer
    assert out["exact_match"] == out["closed_qa/exact_match"] == out["contains"] == 1.0
    assert "open_qa/exact_match" not in out and "open_qa/contains" not in out
    assert metrics.counts() == {"all": {"loss": 4, "generation": 2}, "closed_qa": {"loss": 2, "generation": 1},
                                "open_qa": {"loss": 1, "generation": 1}}

    plain = SplitMetrics([None, None], [])  # data without categories, no generation
    plain.update_loss(torch.tensor([3.0, 3.0]), torch.tensor([2, 1]))
    assert plain.compute() == pytest.approx({"loss": 2.0, "ppl": torch.tensor(2.0).exp().item()})
