"""The head's cross-entropy in chunks: the loss and gradients of full logits, without storing them."""

import math

import pytest
import torch
import torch.nn.functional as F

from lit_mistral.modeling import loss
from lit_mistral.modeling.loss import linear_cross_entropy


def test_uniform_logits_give_log_vocab_per_position():
    head = torch.nn.Linear(8, 11, bias=False)
    torch.nn.init.zeros_(head.weight)
    hidden, targets = torch.randn(7, 8), torch.randint(0, 11, (7,))
    assert linear_cross_entropy(hidden, head, targets, chunk_size=3).item() == pytest.approx(7 * math.log(11),
                                                                                            rel=1e-6)
    assert linear_cross_entropy(hidden, head, targets, chunk_size=3, reduction="none").tolist() == pytest.approx(
        [math.log(11)] * 7, rel=1e-6)


@pytest.mark.parametrize("n,chunk", [(10, 16), (10, 4), (12, 4)])  # one chunk; a short last chunk; even chunks
def test_chunks_give_the_loss_and_gradients_of_full_logits(n, chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(n, 16, requires_grad=True)
    targets = torch.randint(0, 50, (n,))
    expected = F.cross_entropy(head(hidden), targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected, [hidden, head.weight])
    got = linear_cross_entropy(hidden, head, targets, chunk_size=chunk)
    grads = torch.autograd.grad(got, [hidden, head.weight])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    per_position = linear_cross_entropy(hidden, head, targets, chunk_size=chunk, reduction="none")
    assert per_position.shape == (n,)
    torch.testing.assert_close(per_position, F.cross_entropy(head(hidden), targets, reduction="none"))


def test_16bit_inputs_give_an_fp32_loss():
    head = torch.nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    hidden = torch.randn(9, 16, dtype=torch.bfloat16)
    targets = torch.randint(0, 50, (9,))
    for chunk in (16, 4):
        total = linear_cross_entropy(hidden, head, targets, chunk_size=chunk)
        assert total.dtype == torch.float32 and total.shape == ()
        torch.testing.assert_close(total, F.cross_entropy(head(hidden).float(), targets, reduction="sum"))


def test_chunk_logits_are_recomputed_in_backward_not_stored(monkeypatch):
    """Above one chunk, each chunk's head runs once forward and once again in backward (activation checkpointing)."""
    calls = []
    chunk_loss = loss._chunk_loss
    monkeypatch.setattr(loss, "_chunk_loss", lambda h, *a: (calls.append(h.shape[0]), chunk_loss(h, *a))[1])
    head = torch.nn.Linear(4, 6, bias=False)
    hidden = torch.randn(10, 4, requires_grad=True)
    linear_cross_entropy(hidden, head, torch.randint(0, 6, (10,)), chunk_size=4).backward()
    assert calls == [4, 4, 2, 2, 4, 4]  # forward in order, backward from the last chunk
