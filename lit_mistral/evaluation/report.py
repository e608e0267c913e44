"""The evaluation report: the base model and the fine-tuned one side by side, per category and metric, with example
answers; as JSON (every number and answer) and Markdown (the table, a few answers)."""

import json
import os
from pathlib import Path

from lit_mistral.evaluation.metrics import ALL, CLOSED_FORM, metric_key
from lit_mistral.io import write_text

REPORT_JSON, REPORT_MD = "evaluation.json", "evaluation.md"


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

    adapter = f" with the adapter {info['adapter']}" if info.get("adapter") else ""
    lines = [f"# Evaluation of {info['model']}{adapter}", "", _describe(info), ""]
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
            values = [results[c].get(metric_key(group, metric)) for c in columns]
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
