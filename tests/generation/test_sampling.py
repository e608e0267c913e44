"""Sampling by the Gumbel-max trick with hashed noise: it draws from the filtered softmax, and a row's token depends
on the seed, the row's key and its step only, never on the rows that share its batch."""

import torch

from lit_mistral.generation.sampling import _mix32, sample


def test_the_hash_is_32_bit_and_fixed():
    assert _mix32(torch.tensor([0, 1, 2, 12345, 2**32 + 1])).tolist() == [0, 4293290225, 4291678691, 3870921022,
                                                                        4293290225]


def test_sample_draws_from_the_filtered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).repeat(20000, 1)
    rows, steps = torch.arange(20000), torch.zeros(20000, dtype=torch.long)
    freq = torch.bincount(sample(logits, 0, rows, steps, temperature=0.7), minlength=5) / 20000
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.7, -1), atol=0.012, rtol=0)
    assert set(sample(logits, 0, rows, steps, top_k=2).tolist()) == {0, 1}
    # softmax [0.53, 0.20, 0.12, ...]: top_p 0.6 keeps the two tokens needed to reach it
    assert set(sample(logits, 0, rows, steps, top_p=0.6).tolist()) == {0, 1}
    assert not torch.equal(sample(logits, 0, rows, steps), sample(logits, 1, rows, steps))


def test_a_rows_token_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 40)
    rows, steps = torch.tensor([10, 11, 12, 13, 14, 15]), torch.tensor([0, 3, 5, 7, 0, 0])
    batched = sample(logits, 7, rows, steps, temperature=0.8, top_k=20, top_p=0.9)
    alone = [sample(logits[i:i + 1], 7, rows[i:i + 1], steps[i:i + 1], temperature=0.8, top_k=20, top_p=0.9).item()
             for i in range(6)]
    assert batched.tolist() == alone
    assert sample(logits[[3, 0]], 7, rows[[3, 0]], steps[[3, 0]], temperature=0.8, top_k=20,
                  top_p=0.9).tolist() == [alone[3], alone[0]]  # reordered: each keeps its own


def test_the_key_and_the_step_change_the_noise():
    logits = torch.zeros(1000, 50)  # uniform: the noise alone decides
    keys, steps = torch.arange(1000), torch.zeros(1000, dtype=torch.long)
    by_key = sample(logits, 0, keys, steps)
    assert len(set(by_key.tolist())) == 50  # every token drawn
    same_key = sample(logits, 0, torch.zeros(1000, dtype=torch.long), torch.arange(1000))
    assert len(set(same_key.tolist())) == 50  # one prompt, its steps: different draws
    assert sample(logits, 0, keys, steps).tolist() == by_key.tolist()  # reproducible


def test_a_single_candidate_is_always_drawn():
    torch.manual_seed(1)
    logits = torch.randn(64, 30)
    rows, steps = torch.arange(64), torch.arange(64)
    argmax = logits.argmax(-1)
    for seed in (0, 1, 2):
        assert torch.equal(sample(logits, seed, rows, steps, top_k=1), argmax)
        assert torch.equal(sample(logits, seed, rows, steps, top_p=1e-6), argmax)  # the first token always stays
        assert torch.equal(sample(logits, seed, rows, steps, temperature=1e-4), argmax)
