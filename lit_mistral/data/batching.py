"""Batching for training and validation: dynamic padding, padding-free packing with per-example attention, and the
batch plan (fixed size or token budget, length grouping, shuffled per epoch, split across processes, resumable
mid-epoch, its epoch length checked against the trainer's `val_check_interval` before the model loads)."""

import itertools
from collections.abc import Callable, Iterator, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Sampler

from lit_mistral.data.tokenize import IGNORE_INDEX, Filler
from lit_mistral.distributed import in_step
from lit_mistral.errors import LitMistralError


def _loss_spans(item: dict, mask_prompt: bool) -> list[tuple[int, int]]:
    """Where an item carries loss: its spans (responses, assistant turns), or, without `mask_prompt`, every token
    after the first (a filler, with no spans, carries none either way)."""
    return item["spans"] if mask_prompt or not item["spans"] else [(1, len(item["input_ids"]))]


def labelled(labels: torch.Tensor) -> dict:
    """Where a (B, T) batch's labels are, worked out on the CPU while collating: `labelled`, the flat positions
    b * T + t whose next token t + 1 carries a label (row-major, as a boolean mask of them selects), and their count
    `num_labels`. The loss gathers with these instead of a boolean mask on the GPU, which would make the CPU wait for
    the GPU in the middle of each step (a nonzero) and let the GPU run dry while the CPU catches up."""
    width = labels.shape[1]
    positions = (labels[:, 1:] != IGNORE_INDEX).nonzero()  # (n, 2): row, t
    flat = positions[:, 0] * width + positions[:, 1]
    return {"labelled": flat, "num_labels": int(flat.numel())}


def collate_padded(items: list[dict], pad_id: int, mask_prompt: bool = True) -> dict:
    """Right-pad to the longest example. Labels are the tokens inside each item's loss spans (response and EOS, or
    assistant turns), -100 elsewhere: prompt, padding; all but the first token without `mask_prompt`."""
    longest = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    for row, it in enumerate(items):
        ids = torch.tensor(it["input_ids"], dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        for start, end in _loss_spans(it, mask_prompt):
            labels[row, start:end] = ids[start:end]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "num_tokens": int(attention_mask.sum()), "index": [it.get("index") for it in items], **labelled(labels)}


def collate_packed(items: list[dict], mask_prompt: bool = True) -> dict:
    """All examples of the batch in one row (1, N), no padding. `position_ids` restart at 0 for each example and
    `cu_seq_lens` holds the example boundaries, so attention never crosses them; the first token of each example
    carries no label, so no target crosses them either."""
    ids = torch.tensor([t for it in items for t in it["input_ids"]], dtype=torch.long)
    lengths = torch.tensor([len(it["input_ids"]) for it in items], dtype=torch.int32)
    labels = torch.full_like(ids, IGNORE_INDEX)
    offset = 0
    for it in items:
        for start, end in _loss_spans(it, mask_prompt):
            labels[offset + start : offset + end] = ids[offset + start : offset + end]
        offset += len(it["input_ids"])
    cu_seq_lens = torch.zeros(len(items) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.cumsum(lengths, 0)
    position_ids = torch.cat([torch.arange(int(n)) for n in lengths])
    return {"input_ids": ids[None], "position_ids": position_ids[None], "labels": labels[None],
            "cu_seq_lens": cu_seq_lens, "max_length": int(lengths.max()), "num_tokens": int(lengths.sum()),
            "index": [it.get("index") for it in items], **labelled(labels[None])}


def budget_groups(sizes: Sequence[int], budget: int, packed: bool) -> list[tuple[int, int]]:
    """`sizes` (example lengths, in order) cut greedily into consecutive runs [start, stop) that each lay out at most
    `budget` tokens (packed: the sum of lengths; padded: count x longest); a size above the budget is a run alone.
    Batches under a token budget (`BatchPlan`) and the parts of a batch (`split_batch`) are both cut so."""
    groups, start, total, longest = [], 0, 0, 0
    for i, n in enumerate(sizes):
        cost = total + n if packed else (i - start + 1) * max(longest, n)
        if i > start and cost > budget:
            groups.append((start, i))
            start, total, longest = i, 0, 0
        total, longest = total + n, max(longest, n)
    if sizes:
        groups.append((start, len(sizes)))
    return groups


def split_batch(batch: dict, max_tokens: int) -> list[dict]:
    """A collated training batch cut into parts of at most `max_tokens` laid-out tokens each, whole examples in
    order (an example longer than that is a part alone), for `compute.micro_batch_tokens`: packed rows at example
    boundaries (each part's `cu_seq_lens` rebased), padded batches by rows (a part's cost: rows x its longest row).
    Labels are untouched: the first token of every example carries none, so no target crosses a cut, and the parts'
    labelled positions are the batch's. One part (the batch itself) when it fits."""
    packed = "cu_seq_lens" in batch
    if (batch["num_tokens"] if packed else batch["input_ids"].numel()) <= max_tokens:
        return [batch]
    if packed:
        bounds = batch["cu_seq_lens"].tolist()  # example i spans bounds[i]:bounds[i + 1]
        lengths = [b - a for a, b in itertools.pairwise(bounds)]
        parts = []
        for first, last in budget_groups(lengths, max_tokens, packed=True):
            a, b = bounds[first], bounds[last]
            parts.append({"input_ids": batch["input_ids"][:, a:b], "position_ids": batch["position_ids"][:, a:b],
                          "labels": batch["labels"][:, a:b],
                          "cu_seq_lens": batch["cu_seq_lens"][first : last + 1] - a,
                          "max_length": max(lengths[first:last]), "num_tokens": b - a,
                          "index": batch["index"][first:last]})
        return parts
    widths = batch["attention_mask"].sum(dim=1).tolist()  # real tokens per row (right-padded)
    parts = []
    for a, b in budget_groups(widths, max_tokens, packed=False):
        width = max(widths[a:b])  # the part's own longest row: its padding cut away
        parts.append({"input_ids": batch["input_ids"][a:b, :width],
                      "attention_mask": batch["attention_mask"][a:b, :width], "labels": batch["labels"][a:b, :width],
                      "num_tokens": int(sum(widths[a:b])), "index": batch["index"][a:b]})
    return parts


class BatchPlan(Sampler[list[int]]):
    """Which examples form each batch, epoch by epoch: deterministic from (seed, epoch), split across ranks, and
    able to skip the batches already trained on when a run resumes mid-epoch.

    - fixed size: `batch_size` examples per batch;
    - token budget (`max_tokens`): as many examples as fit in `max_tokens` tokens, counted as the batch will be
      laid out (packed: the sum of lengths; padded: examples x longest);
    - `length_grouped`: examples of similar length share batches (less padding), batch order still shuffled.

    With several ranks, training (`equal_steps`) deals out whole batches and drops those that do not divide evenly,
    since every rank must take the same number of optimizer steps; validation deals out the examples instead and
    keeps them all, so that its metrics cover every example whatever the number of GPUs; ranks with fewer batches
    then run filler batches (one short example that counts for nothing, `Filler`) up to the most any rank has,
    since under FSDP every forward pass is a collective that all ranks must join.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, max_tokens: int | None = None, packed: bool = False,
                 shuffle: bool = True, length_grouped: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, equal_steps: bool = True) -> None:
        self.lengths = list(lengths)
        self.batch_size, self.max_tokens, self.packed = batch_size, max_tokens, packed
        self.shuffle, self.length_grouped, self.seed = shuffle, length_grouped, seed
        self.rank, self.world_size, self.equal_steps = rank, world_size, equal_steps
        self.epoch = 0
        self.skip = 0  # batches of the current epoch already done (set when resuming); used once
        self.sampler = self  # Lightning calls `batch_sampler.sampler.set_epoch(epoch)` at each epoch start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, processed: int, saved_world_size: int) -> None:
        """Skip what an interrupted run trained on of this epoch: the checkpoint's loop state says how many batches
        (`processed`) each of its `saved_world_size` processes took; every process takes the same number of the
        epoch's batches in turn, so with W processes then and W' now, W * processed of the epoch's batches are done
        and each process skips W * processed // W' of its own."""
        done = processed * saved_world_size
        if done % self.world_size:
            rank_zero_warn(f"Resuming on {self.world_size} processes a run saved on {saved_world_size}: up to "
                           f"{self.world_size - 1} batches of this epoch are trained on twice.")
        if done // self.world_size < len(self):
            self.skip = done // self.world_size

    def _order(self) -> list[int]:
        n = len(self.lengths)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist()
        if self.length_grouped:
            # sort within windows of 64 batches: similar lengths meet, yet each epoch mixes differently
            window = self.batch_size * 64
            order = [i for s in range(0, n, window)
                     for i in sorted(order[s : s + window], key=lambda i: -self.lengths[i])]
        return order

    def _batches(self) -> list[list[int]]:
        if self.equal_steps or self.world_size == 1 or not self.lengths:
            return self._rank_batches(self.rank)
        plans = [self._rank_batches(rank) for rank in range(self.world_size)]
        shortest = min(range(len(self.lengths)), key=self.lengths.__getitem__)
        return in_step(plans, self.rank, [Filler(shortest)])

    def _rank_batches(self, rank: int) -> list[list[int]]:
        order = self._order()
        if not self.equal_steps:
            order = order[rank :: self.world_size]
        if self.max_tokens is None:
            batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        else:
            groups = budget_groups([self.lengths[i] for i in order], self.max_tokens, self.packed)
            batches = [order[a:b] for a, b in groups]
        if self.shuffle and (self.length_grouped or self.max_tokens is not None):
            g = torch.Generator().manual_seed(self.seed + self.epoch + 1_000_003)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if not self.equal_steps:
            return batches
        # every rank must take the same number of steps: drop the tail that does not divide evenly
        per_rank = len(batches) // self.world_size if self.world_size > 1 else len(batches)
        return batches[rank : per_rank * self.world_size : self.world_size]

    def __len__(self) -> int:
        return len(self._batches())

    def largest(self) -> list[int]:
        """The batch of this rank's plan for the epoch that lays out the most tokens (packed: the sum of lengths;
        padded: examples x longest), for a memory probe; the resume state is left alone."""
        def laid_out(batch: list[int]) -> int:
            sizes = [self.lengths[i] for i in batch]
            return sum(sizes) if self.packed else len(sizes) * max(sizes)

        return max(self._batches(), key=laid_out)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        skip, self.skip = self.skip, 0
        yield from batches[skip:]


def check_val_check_interval(trainer, train_plan: Callable[[], BatchPlan], examples: int) -> None:
    """Lightning refuses an integer `val_check_interval` above the training batches of an epoch, but only once
    the model is loaded; the batches are known before (`train_plan`, made only when the check applies), counted as
    Lightning counts them: per process, within `limit_train_batches`."""
    interval = getattr(trainer, "val_check_interval", None)
    if not isinstance(interval, int) or trainer.check_val_every_n_epoch is None or not trainer.limit_val_batches:
        return
    batches, limit = len(train_plan()), trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    if interval > batches:
        raise LitMistralError(
            f"trainer.val_check_interval={interval} is more than the {batches} training batches of an epoch "
            f"({examples} examples). Fix: --trainer.val_check_interval {batches} or less, "
            "--trainer.check_val_every_n_epoch null to count batches across epochs, or more training records.")
