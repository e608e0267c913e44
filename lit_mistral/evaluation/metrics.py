"""Evaluation metrics: token loss and perplexity per category, and answers scored against their references
(ROUGE-L; exact match and contains-answer in the closed-form categories), accumulated by torchmetrics."""

import contextlib
import math
import unicodedata
import warnings
from collections.abc import Sequence

import torch
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.functional.text.rouge import rouge_score

ALL = "all"  # the group of every example; the others are the examples' categories
# Dolly's categories whose reference is a short, checkable answer; the others are open-ended (ROUGE-L only)
CLOSED_FORM = ("classification", "closed_qa", "information_extraction")


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, English articles dropped, whitespace collapsed (SQuAD's answer
    normalization, with punctuation as a separator so that "red/green" is two words)."""
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def contains_answer(prediction: str, reference: str) -> bool:
    """The normalized reference appears in the normalized prediction as a run of whole words."""
    answer = normalize(reference)
    return bool(answer) and f" {answer} " in f" {normalize(prediction)} "


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure by torchmetrics: its own tokenization (lowercase, alphanumeric runs), no stemmer, so nltk
    is neither needed nor asked to download anything."""
    return float(rouge_score(prediction, reference, rouge_keys=("rougeL",))["rougeL_fmeasure"])


def groups_of(categories: Sequence[str | None]) -> list[str]:
    """`all`, then the categories present, sorted."""
    return [ALL] + sorted({c for c in categories if c})


@contextlib.contextmanager
def _quiet_when_empty():
    """Silence torchmetrics' warning on computing a metric never updated: a process that saw no example of a
    category has an empty share of it (the synced result is right)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The ``compute`` method of metric")
        yield


class SplitMetrics:
    """One model's metrics over the validation split, overall (`all`) and per category, accumulated by torchmetrics.

    Loss means are token-weighted and synced across processes in `compute` (each process sees its own batches);
    generation metrics are not synced, because every process scores the full, gathered list of answers.

    Args:
        loss_categories: The category (or None) of every validation example.
        generation_categories: The category (or None) of every example that will be answered.
        device: Where the loss accumulators live (the model's device).
    """

    def __init__(self, loss_categories: Sequence[str | None], generation_categories: Sequence[str | None],
                 device: torch.device | str = "cpu") -> None:
        self.loss = {g: MeanMetric().to(device) for g in groups_of(loss_categories)}
        self.examples = {g: SumMetric().to(device) for g in self.loss}  # how many examples each loss is over
        generated = groups_of(generation_categories) if generation_categories else []
        closed = [g for g in generated if g in CLOSED_FORM]
        closed = ([ALL] + closed) if closed else []
        self.generation = {"rougeL": {g: MeanMetric(sync_on_compute=False) for g in generated},
                           "exact_match": {g: MeanMetric(sync_on_compute=False) for g in closed},
                           "contains": {g: MeanMetric(sync_on_compute=False) for g in closed}}

    def update_loss(self, sums: torch.Tensor, counts: torch.Tensor,
                    categories: Sequence[str | None] | None = None) -> None:
        """`sums` (E,): summed token losses of E examples; `counts` (E,): their labelled tokens; `categories`: theirs
        (None: unknown, counted in `all` only)."""
        if categories is None:
            categories = [None] * len(sums)
        for group in self.loss:
            picked = [i for i, c in enumerate(categories) if group == ALL or c == group]
            if not picked:
                continue
            total, n = sums[picked].sum(), counts[picked].sum()
            if n > 0:
                self.loss[group].update(total / n, weight=n)
                self.examples[group].update(int((counts[picked] > 0).sum()))

    def score(self, records: list[dict]) -> None:
        """Score answer records (`response`, `reference`, `category`) in place and accumulate the scores."""
        for record in records:
            prediction, reference, category = record["response"], record["reference"], record["category"]
            if prediction is None:  # skipped: the prompt leaves no room for an answer in the context window
                continue
            record["rougeL"] = rouge_l(prediction, reference)
            if category in CLOSED_FORM:
                record["exact_match"] = float(exact_match(prediction, reference))
                record["contains"] = float(contains_answer(prediction, reference))
            for metric, means in self.generation.items():
                for group in (ALL, category):
                    if metric in record and group in means:
                        means[group].update(record[metric])

    def compute(self) -> dict[str, float]:
        """Flat results: `loss`, `ppl`, `rougeL`, `exact_match`, `contains` overall, and `<category>/<metric>`;
        groups without data are left out."""
        out = {}
        with _quiet_when_empty():
            losses = {group: float(mean.compute()) for group, mean in self.loss.items()}
        for group, loss in losses.items():
            if not math.isnan(loss):
                # perplexity = exp(mean token loss): torchmetrics' Perplexity computes the same from full (B, T, V)
                # logits, which the chunked loss never materializes
                out.update({metric_key(group, "loss"): loss, metric_key(group, "ppl"): math.exp(loss)})
        for metric, means in self.generation.items():
            for group, mean in means.items():
                if mean.update_count:
                    out[metric_key(group, metric)] = float(mean.compute())
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """Group -> {"loss": examples in the loss, "generation": examples answered}."""
        out = {}
        with _quiet_when_empty():
            totals = {group: int(total.compute()) for group, total in self.examples.items()}
        for group, n in totals.items():
            if n:
                out.setdefault(group, {})["loss"] = n
        for group, mean in self.generation["rougeL"].items():
            if mean.update_count:
                out.setdefault(group, {})["generation"] = mean.update_count
        return out

    def reset(self) -> None:
        for metric in [*self.loss.values(), *self.examples.values(),
                       *(m for means in self.generation.values() for m in means.values())]:
            metric.reset()


def metric_key(group: str, metric: str) -> str:
    return metric if group == ALL else f"{group}/{metric}"
