"""Held-out evaluation: token loss and perplexity per category, greedy answers to a bounded set of validation
examples scored against their references (ROUGE-L; exact match and contains-answer in the closed-form categories),
and the report that puts the base model and the fine-tuned one side by side."""

import contextlib
import json
import math
import os
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.functional.text.rouge import rouge_score

from lit_mistral.data import collate_prompts, encode_prompts, predict_batches
from lit_mistral.files import write_text
from lit_mistral.prompts import Example, PromptStyle

ALL = "all"  # the group of every example; the others are the examples' categories
# Dolly's categories whose reference is a short, checkable answer; the others are open-ended (ROUGE-L only)
CLOSED_FORM = ("classification", "closed_qa", "information_extraction")
REPORT_JSON, REPORT_MD = "evaluation.json", "evaluation.md"
# the prefix of each column's metrics in the logs: "model" is the model as loaded (with its adapter), "base" the
# same model with the adapter switched off
COLUMNS = {"base": "val_base/", "model": "val/"}


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
                out.update({_key(group, "loss"): loss, _key(group, "ppl"): math.exp(loss)})
        for metric, means in self.generation.items():
            for group, mean in means.items():
                if mean.update_count:
                    out[_key(group, metric)] = float(mean.compute())
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


def _key(group: str, metric: str) -> str:
    return metric if group == ALL else f"{group}/{metric}"


@torch.no_grad()
def answer(model, tokenizer, style: PromptStyle, examples: Sequence[Example], batch_size: int,
           device: torch.device, generation: dict, context: int | None = None) -> list[dict]:
    """Answer `examples` with `lit_mistral.predict.generate`, `batch_size` prompts at a time; records in input order,
    each with the example's `reference` and `category` added. A prompt with no room for the answer in the model's
    `context` window gets no answer (response None, finish "skipped") and no score."""
    from lit_mistral.predict import generate

    prompts = encode_prompts(examples, style, tokenizer)
    # batched as predict batches: by length, so each batch is left-padded to a prompt close to its own
    records = {}
    for rows in predict_batches([len(p) for p in prompts], range(len(prompts)), batch_size):
        items = [{"input_ids": prompts[i], "index": i, "example": examples[i]} for i in rows]
        batch = collate_prompts(items, tokenizer.pad_token_id)
        batch.update(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        for record in generate(model, tokenizer, batch, context=context, **generation):
            records[record["index"]] = record
    return [dict(records[i], reference=e.response, category=e.category) for i, e in enumerate(examples)]


# --------------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------------

METRIC_NAMES = {"loss": "loss (response tokens)", "ppl": "perplexity", "rougeL": "ROUGE-L F",
                "exact_match": "exact match", "contains": "contains answer"}
LOWER_IS_BETTER = ("loss", "ppl")


def build_report(results: dict[str, dict[str, float]], records: dict[str, list[dict]], info: dict,
                 n_examples: int) -> tuple[dict, str]:
    """The JSON document and the Markdown text of an evaluation.

    Args:
        results: Column (`base`, `model`) -> `SplitMetrics.compute()` output.
        records: Column -> scored answer records, in example order (empty when generation was off).
        info: What was evaluated and how (model, adapter, settings, counts), copied into the report.
        n_examples: How many answers to show side by side in the Markdown.
    """
    columns = [c for c in ("base", "model") if c in results]
    # a validation without an adapter evaluates the base through zero-effect fresh adapters
    label = {"base": "base", "model": "fine-tuned" if info.get("adapter") else "model"}
    names = [label[c] for c in columns]
    document = dict(info, metrics={label[c]: results[c] for c in columns},
                    examples=_merged(records, columns, label))

    lines = [f"# Evaluation of {info['model']}" + (f" with the adapter {info['adapter']}" if info.get("adapter") else ""),
             "", _describe(info), ""]
    if info.get("date"):
        step = f" at step {info['global_step']}" if info.get("global_step") else ""  # unknown for an adapter folder
        lines += [f"Measured {info['date']}{step}, with "
                  + ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items()) + ".", ""]
    groups = [ALL] + sorted({k.split("/")[0] for c in columns for k in results[c] if "/" in k})
    header = ["category", "n", "metric", *names] + (["change"] if len(columns) == 2 else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        counts = info["counts"].get(group, {})
        for metric in METRIC_NAMES:
            values = [results[c].get(_key(group, metric)) for c in columns]
            if all(v is None for v in values):
                continue
            n = counts.get("generation" if metric not in LOWER_IS_BETTER else "loss", "")
            row = [group, str(n), METRIC_NAMES[metric], *(_fmt(v) for v in values)]
            if len(columns) == 2:
                row.append(_change(metric, *values))
            lines.append("| " + " | ".join(row) + " |")
    shown = document["examples"][:n_examples]
    if shown:
        lines += ["", f"## Example answers (the first {len(shown)} of {len(document['examples'])})"]
    for i, example in enumerate(shown, 1):
        context = f"\n\nContext: {_clip(example['context'])}" if example["context"] else ""
        lines += ["", f"### {i}. {example['category'] or ''}".rstrip(), "",
                  f"Instruction: {_clip(example['instruction'])}{context}", "",
                  f"Reference: {_clip(example['reference'])}"]
        for name in names:
            answer = example[name]
            scored = f"ROUGE-L {answer['rougeL']:.3f}" if "rougeL" in answer else answer["finish"]
            lines += ["", f"{name} ({scored}): {_clip(answer['response'] or '')}"]
    return document, "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers, for the report."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "lightning", "torchmetrics"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _describe(info: dict) -> str:
    counts = info["counts"][ALL]
    left_out = info.get("val_examples", counts["loss"]) - counts["loss"]
    text = (f"{counts['loss']} validation examples for loss and perplexity (mean token cross-entropy on the "
            f"response tokens, perplexity = exp(loss))"
            + (f"; {left_out} more, whose prompt alone is longer than data.max_length, have no response tokens to "
               "score." if left_out > 0 else "."))
    if counts.get("generation"):
        text += (f" The first {counts['generation']} answered greedily (at most {info['max_new_tokens']} new tokens) "
                 "and scored against their references: ROUGE-L F-measure, and in the closed-form categories "
                 f"({', '.join(CLOSED_FORM)}) exact match and contains-answer after normalization (lowercase, no "
                 "punctuation or articles).")
    return text


def _merged(records: dict[str, list[dict]], columns: list[str], label: dict[str, str]) -> list[dict]:
    """One entry per answered example: the example, then each column's answer and scores."""
    merged = []
    for rows in zip(*(records.get(c, []) for c in columns)):
        first = rows[0]
        entry = {k: first[k] for k in ("index", "instruction", "context", "reference", "category")}
        for column, row in zip(columns, rows):
            entry[label[column]] = {k: row[k] for k in ("response", "finish", "response_tokens", "rougeL",
                                                             "exact_match", "contains") if k in row}
        merged.append(entry)
    return merged


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def _change(metric: str, base: float | None, tuned: float | None) -> str:
    if base is None or tuned is None:
        return ""
    if metric == "ppl":
        return f"{(tuned / base - 1) * 100:+.1f}%"
    return f"{tuned - base:+.4f}"


def _clip(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())  # one line: Markdown paragraphs and tables stay intact
    return text if len(text) <= limit else text[:limit] + " ..."


def write_report(folder: str | os.PathLike, document: dict, markdown: str) -> tuple[Path, Path]:
    """Write `evaluation.json` and `evaluation.md` into `folder`, each whole or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return (write_text(folder / REPORT_JSON, json.dumps(document, indent=2, ensure_ascii=False) + "\n"),
            write_text(folder / REPORT_MD, markdown))
