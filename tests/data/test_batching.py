"""Batching: padded and packed collation with loss masking, and the batch plan (token budgets, length grouping,
ranks, resuming mid-epoch, validation kept in step across processes)."""

import pytest

from lit_mistral.data.batching import BatchPlan, collate_packed, collate_padded
from lit_mistral.data.tokenize import Filler, TokenizedDataset


def test_collate_padded_masks_prompt_and_padding():
    items = [{"input_ids": [1, 5, 6, 7, 2], "spans": [(3, 5)]}, {"input_ids": [1, 8, 2], "spans": [(2, 3)]}]
    batch = collate_padded(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 2], [-100, -100, 2, -100, -100]]
    assert batch["num_tokens"] == 8
    unmasked = collate_padded(items, pad_id=0, mask_prompt=False)
    assert unmasked["labels"].tolist() == [[-100, 5, 6, 7, 2], [-100, 8, 2, -100, -100]]


def test_collate_packed_keeps_examples_apart():
    items = [{"input_ids": [1, 5, 6, 7, 2], "spans": [(3, 5)]}, {"input_ids": [1, 8, 2], "spans": [(2, 3)]}]
    batch = collate_packed(items)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 1, 8, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 2, -100, -100, 2]]
    assert batch["cu_seq_lens"].tolist() == [0, 5, 8] and batch["max_length"] == 5
    # without prompt masking the first token of each example still carries no label: no target crosses a boundary
    assert collate_packed(items, mask_prompt=False)["labels"].tolist() == [[-100, 5, 6, 7, 2, -100, 8, 2]]


def test_collates_find_the_labelled_positions():
    """`labelled`: the flat positions b * T + t whose next token carries a label, in the order a boolean mask of
    them gives; `num_labels` their count (what the loss gathers at, without a wait for the GPU)."""
    items = [{"input_ids": [1, 5, 6, 7, 2], "spans": [(3, 5)]}, {"input_ids": [1, 8, 2], "spans": [(2, 3)]}]
    padded, packed = collate_padded(items, pad_id=0), collate_packed(items)
    assert padded["labelled"].tolist() == [2, 3, 6] and padded["num_labels"] == 3  # rows of 5: (0, 2), (0, 3), (1, 1)
    assert packed["labelled"].tolist() == [2, 3, 6] and packed["num_labels"] == 3
    for batch in (padded, packed):
        labels = batch["labels"]
        mask = labels[:, 1:] != -100
        width = labels.shape[1]
        rows, cols = mask.nonzero().unbind(1)
        assert batch["labelled"].tolist() == (rows * width + cols).tolist()
        assert labels.reshape(-1)[batch["labelled"] + 1].tolist() == labels[:, 1:][mask].tolist()


def test_batch_plan_token_budget_and_ranks():
    lengths = [100, 300, 50, 400, 250, 120, 80, 500, 60, 90]
    plan = BatchPlan(lengths, batch_size=4, max_tokens=600, packed=True, seed=1)
    batches = list(plan)
    assert sorted(i for b in batches for i in b) == list(range(10))  # each example once per epoch
    assert all(sum(lengths[i] for i in b) <= 600 for b in batches)
    assert list(plan) == batches  # deterministic within an epoch
    plan.set_epoch(1)
    assert list(plan) != batches  # reshuffled the next epoch
    plan.set_epoch(0)
    ranks = [list(BatchPlan(lengths, 4, 600, True, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(batches) // 2  # same step count on every process
    seen = [i for rank in ranks for b in rank for i in b]
    assert len(seen) == len(set(seen))  # no example twice in an epoch
    dropped = [i for b in batches[2 * (len(batches) // 2):] for i in b]  # only the uneven tail batch
    assert sorted(seen + dropped) == list(range(10))


def test_batch_plan_padded_budget_and_length_grouping():
    lengths = list(range(10, 330, 10))  # 32 examples
    plan = BatchPlan(lengths, batch_size=4, max_tokens=800, length_grouped=True, seed=0)
    batches = list(plan)
    assert all(len(b) * max(lengths[i] for i in b) <= 800 for b in batches)
    fixed = list(BatchPlan(lengths, batch_size=4, length_grouped=True, seed=0))
    padding = sum(4 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in fixed)
    shuffled = list(BatchPlan(lengths, batch_size=4, seed=0))
    padding_shuffled = sum(4 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in shuffled)
    assert padding < padding_shuffled / 3


def test_batch_plan_skips_batches_done_before_a_resume():
    plan = BatchPlan(list(range(1, 21)), batch_size=2, seed=3)
    full = list(plan)
    plan.skip = 4
    assert list(plan) == full[4:]
    assert list(plan) == full  # the skip applies once


def test_resume_skips_what_the_saved_processes_took_whatever_their_number():
    """4 batches done by each of 2 processes then: 8 of the epoch's batches; alone now, skip 8 of its own; on 3
    processes, 8 // 3 each (and a warning: up to 2 batches are trained on twice)."""
    lengths = list(range(1, 41))
    alone = BatchPlan(lengths, batch_size=2, seed=3)
    full = list(alone)
    alone.resume(4, saved_world_size=2)
    assert list(alone) == full[8:]
    three = BatchPlan(lengths, batch_size=2, seed=3, rank=1, world_size=3)
    with pytest.warns(UserWarning, match="Resuming on 3 processes a run saved on 2: up to 2 batches"):
        three.resume(4, saved_world_size=2)
    assert three.skip == 2
    past_the_end = BatchPlan(lengths, batch_size=2, seed=3)
    past_the_end.resume(30, saved_world_size=1)
    assert past_the_end.skip == 0


def test_validation_plan_covers_every_example_on_any_number_of_ranks():
    """Training drops the batches that would give ranks unequal step counts; validation deals out the examples and
    keeps them all (one packed batch's worth of examples on 2 ranks: both get some), and evens out the batch counts
    with filler batches that count for nothing (under FSDP a rank that stops early leaves the others hanging)."""
    lengths = [50 + 7 * i for i in range(9)]
    for world in (1, 2, 3, 12):
        for batch_size, max_tokens in ((4, 10_000), (2, None), (4, 130)):
            ranks = [list(BatchPlan(lengths, batch_size, max_tokens, True, shuffle=False, rank=r, world_size=world,
                                    equal_steps=False)) for r in range(world)]
            real = [i for batches in ranks for batch in batches for i in batch if not isinstance(i, Filler)]
            assert sorted(real) == list(range(9)) and all(ranks)
            assert len({len(batches) for batches in ranks}) == 1, (world, batch_size, [len(b) for b in ranks])
            fillers = [batch for batches in ranks for batch in batches if isinstance(batch[0], Filler)]
            assert all(batch == [0] for batch in fillers)  # the shortest example, alone
            if (world, batch_size) == (2, 2):  # 5 examples (3 batches) and 4 (2 batches)
                assert len(fillers) == 1 and isinstance(ranks[1][-1][0], Filler)
            if world == 12 and max_tokens == 10_000:  # 9 ranks with one batch, 3 with nothing else
                assert len(fillers) == 3
            if world == 1:
                assert not fillers
    # a filler is run (the same shapes as any batch) with no labels and no example index
    dataset = TokenizedDataset([([1, 5, 6, 2], [(2, 4)], 0), ([1, 7, 2], [(1, 3)], 1)])
    filler = collate_packed([dataset[Filler(1)]])
    assert filler["input_ids"].tolist() == [[1, 7, 2]] and (filler["labels"] == -100).all()
    assert filler["index"] == [None] and collate_packed([dataset[1]])["labels"].tolist() == [[-100, 7, 2]]
    # a single batch on 2 ranks in training: neither rank can take it alone
    assert [list(BatchPlan(lengths, 9, None, False, shuffle=True, rank=r, world_size=2)) for r in range(2)] == [[], []]


def test_several_loss_spans_per_item_padded_and_packed():
    """A conversation carries loss on each assistant turn: every span is labelled, nothing between them."""
    items = [{"input_ids": [1, 5, 6, 7, 8, 9, 2], "spans": [(2, 3), (5, 7)]}, {"input_ids": [1, 4, 2], "spans": []}]
    assert collate_padded(items, pad_id=0)["labels"].tolist() == [[-100, -100, 6, -100, -100, 9, 2],
                                                                  [-100] * 7]
    assert collate_packed(items)["labels"].tolist() == [[-100, -100, 6, -100, -100, 9, 2, -100, -100, -100]]
