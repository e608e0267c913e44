"""Dolly-style instruction data: reading and checking records, prompt formatting, tokenization with loss masking,
batching (dynamic padding, length grouping, padding-free packing) and the `InstructionDataModule`."""

import json
import logging
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from lit_mistral.errors import LitMistralError, raise_problems
from lit_mistral.prompts import Example, PromptStyle, check_prompt_style, prompt_style
from lit_mistral.sources import PKG_SCHEME, load_tokenizer, resolve_location

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding, example boundaries)
TRAIN_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
PREDICT_EXTENSIONS = (".txt", ".jsonl")


# --------------------------------------------------------------------------------------------------------------------
# Reading and checking records
# --------------------------------------------------------------------------------------------------------------------


class Fields:
    """Which keys of a record hold the instruction, context, response and category."""

    def __init__(self, instruction: str = "instruction", context: str | None = "context",
                 response: str = "response", category: str | None = "category") -> None:
        self.instruction, self.context, self.response, self.category = instruction, context, response, category


def _record_to_example(row, where: str, fields: Fields, need_response: bool) -> tuple[Example | None, list[str]]:
    """Check one raw record; return the `Example` or the list of what is wrong with it."""
    if not isinstance(row, dict):
        return None, [f"{where}: expected a JSON object with an {fields.instruction!r} field, got {type(row).__name__}"]
    problems = []

    def text(key: str | None, required: bool, non_empty: bool) -> str | None:
        if key is None:
            return None
        if key not in row or row[key] is None:
            if required:
                problems.append(f"{where}: field {key!r} is missing")
            return None
        value = row[key]
        if not isinstance(value, str):
            problems.append(f"{where}: field {key!r} must be a string, got {type(value).__name__} ({str(value)[:40]!r})")
            return None
        if non_empty and not value.strip():
            problems.append(f"{where}: field {key!r} is empty")
            return None
        return value

    instruction = text(fields.instruction, required=True, non_empty=True)
    context = text(fields.context, required=False, non_empty=False)
    response = text(fields.response, required=need_response, non_empty=need_response)
    category = text(fields.category, required=False, non_empty=False)
    if problems:
        return None, problems
    return Example(instruction, (context or "").strip(), response, category, where), []


def _raw_rows(path: Path) -> tuple[list[tuple[str, object]], list[str]]:
    """(where, row) pairs of a local file, and the lines that could not be parsed at all."""
    suffix = path.suffix.lower()
    rows, problems, blank = [], [], []
    if suffix in (".jsonl", ".txt"):
        for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.append(f"{where}: not valid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})")
                continue
            if not line.strip():
                blank.append(number)
                continue
            if suffix == ".txt":
                rows.append((where, {"instruction": line.strip()}))
                continue
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                problems.append(f"{where}: malformed JSON ({err.msg} at column {err.colno})")
        if blank and rows:
            shown = ", ".join(map(str, blank[:10])) + (" ..." if len(blank) > 10 else "")
            rank_zero_info(f"{path}: skipped {len(blank)} blank line(s) ({shown}); they are not inputs.")
    elif suffix == ".json":
        try:
            document = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise LitMistralError(f"{path}: not valid UTF-8 (byte offset {err.start}). Fix: save the file as UTF-8.") from None
        except json.JSONDecodeError as err:
            raise LitMistralError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno}). "
                                  "Fix: the file must hold one JSON list of records.") from None
        if not isinstance(document, list):
            raise LitMistralError(f"{path}: expected a JSON list of records, got a {type(document).__name__}. "
                                  "Fix: write [ {...}, {...} ] or use .jsonl with one record per line.")
        rows = [(f"{path}[{i}]", row) for i, row in enumerate(document)]
    else:  # .parquet, .csv: columnar formats that `datasets` reads
        import datasets

        try:
            table = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
        except Exception as err:  # pyarrow raises many kinds; all mean the same to the user
            raise LitMistralError(f"{path}: could not read it as {suffix[1:]} ({err}).") from None
        rows = [(f"{path} row {i + 1}", row) for i, row in enumerate(table)]
    return rows, problems


def _hub_rows(name: str) -> list[tuple[str, object]]:
    import datasets

    try:
        table = datasets.load_dataset(name, split="train")
    except Exception as err:  # offline, unknown id, gated: datasets raises many kinds
        raise LitMistralError(
            f"data.path: {name!r} is not a local file and could not be loaded from the Hugging Face hub ({err}). "
            f"Fix: give a local {'/'.join(TRAIN_EXTENSIONS)} file, or a hub dataset id while online."
        ) from None
    return [(f"{name}[{i}]", row) for i, row in enumerate(table)]


def _is_hub_id(source: str) -> bool:
    if source.startswith(PKG_SCHEME):
        return False
    path = Path(source).expanduser()
    return not (path.exists() or path.suffix or source.startswith((".", "/", "~")))


def read_examples(source: str, fields: Fields, key: str, need_response: bool = True,
                  skip_invalid: bool = False) -> list[Example]:
    """Read and check every record of `source` (a local file or a hub dataset id).

    All problems are collected and raised as one error naming file and line, unless `skip_invalid`, in which case
    bad records are left out and counted in the log."""
    extensions = TRAIN_EXTENSIONS if need_response else PREDICT_EXTENSIONS
    source = resolve_location(source, key)
    path = Path(source).expanduser()
    # a hub dataset id looks like "owner/name"; anything with an extension or a path prefix is a file
    if not _is_hub_id(source) or not need_response:
        if not path.is_file():
            raise LitMistralError(f"{key}: file {str(path)!r} does not exist. Fix: check the path.")
        if path.suffix.lower() not in extensions:
            raise LitMistralError(
                f"{key}: {str(path)!r} has an unsupported extension {path.suffix!r}. "
                f"Fix: use one of {', '.join(extensions)}."
            )
        rows, problems = _raw_rows(path)
    else:
        rows, problems = _hub_rows(source), []
    examples, n_bad = [], len(problems)  # so far: lines that did not parse, one problem each
    for where, row in rows:
        example, bad = _record_to_example(row, where, fields, need_response)
        problems += bad
        if example is not None:
            examples.append(example)
        else:
            n_bad += 1
    if problems and not skip_invalid:
        raise_problems(problems, "Fix: correct these records, or set --data.skip_invalid true to leave them out.")
    if problems:
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        rank_zero_warn(f"{key}: skipped {n_bad} invalid record(s) of {n_bad + len(examples)} in {source} "
                       f"(data.skip_invalid=true): {shown}")
    if not examples:
        raise LitMistralError(f"{key}: {source!r} holds no usable records. Fix: point it at a non-empty dataset.")
    return examples


# --------------------------------------------------------------------------------------------------------------------
# Tokenization with loss masking
# --------------------------------------------------------------------------------------------------------------------


def encode_examples(examples: Sequence[Example], style: PromptStyle, tokenizer) -> list[tuple[list[int], int]]:
    """Token ids of each example (prompt, response, EOS) and the number of prompt tokens.

    The prompt ids are exactly what predict feeds the model, and the rest are exactly what it must generate
    after them: the full text is tokenized once (so the response is tokenized in context), and when the tokenizer
    merges across the prompt/response boundary, the response is tokenized on its own after the prompt ids."""
    texts = [style.apply(e) for e in examples]
    special = style.add_special_tokens
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=special)["input_ids"]
    fulls = tokenizer([p + r for p, r in texts], add_special_tokens=special)["input_ids"]
    out = []
    for (prompt, response), p_ids, ids, example in zip(texts, prompts, fulls, examples):
        if ids[: len(p_ids)] != p_ids:
            ids = p_ids + tokenizer(response, add_special_tokens=False)["input_ids"]
        if len(ids) == len(p_ids) and response.strip():
            raise LitMistralError(f"{example.where}: the response tokenizes to nothing. Fix: check the record.")
        out.append((ids + [tokenizer.eos_token_id], len(p_ids)))
    return out


def encode_prompts(examples: Sequence[Example], style: PromptStyle, tokenizer) -> list[list[int]]:
    """Prompt token ids for generation: the same ids `encode_examples` puts before each response."""
    prompts = [style.apply(e)[0] for e in examples]
    return tokenizer(prompts, add_special_tokens=style.add_special_tokens)["input_ids"]


class Filler(int):
    """A batch-plan index whose example is run but counts for nothing (all its tokens prompt, no labels, no index):
    what keeps every rank's validation batch count equal."""


class TokenizedDataset(Dataset):
    """Tokenized examples: `input_ids` (prompt + response + EOS), `n_prompt` (how many carry no loss) and `index`:
    the example's position in the list it was made from (an item's optional third field), else its own."""

    def __init__(self, items: list[tuple]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        ids, n_prompt, *index = self.items[i]
        if isinstance(i, Filler):
            return {"input_ids": ids, "n_prompt": len(ids), "index": None}
        return {"input_ids": ids, "n_prompt": n_prompt, "index": index[0] if index else i}

    @property
    def lengths(self) -> list[int]:
        return [len(item[0]) for item in self.items]


def fit_to_length(items: list[tuple], max_length: int, overlong: str, key: str) -> list[tuple]:
    """Apply `max_length` to (ids, n_prompt, ...) items: drop long examples, or cut them (losing their EOS), and say
    how many. Fields after n_prompt are kept as they are."""
    kept, dropped, cut = [], 0, 0
    for ids, n_prompt, *rest in items:
        if len(ids) <= max_length:
            kept.append((ids, n_prompt, *rest))
        elif overlong == "truncate" and n_prompt < max_length:
            kept.append((ids[:max_length], n_prompt, *rest))
            cut += 1
        else:
            dropped += 1
    if dropped:
        rank_zero_warn(f"{key}: dropped {dropped} of {len(items)} examples longer than data.max_length={max_length} "
                       f"tokens (data.overlong={overlong}).")
    if cut:
        rank_zero_warn(f"{key}: truncated {cut} of {len(items)} examples to data.max_length={max_length} tokens; "
                       "they lose their EOS, so the model does not learn to stop on them (data.overlong=truncate).")
    if not kept:
        raise LitMistralError(f"{key}: every example is longer than data.max_length={max_length} tokens. "
                              "Fix: raise --data.max_length.")
    return kept


# --------------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------------


def collate_padded(items: list[dict], pad_id: int, mask_prompt: bool = True) -> dict:
    """Right-pad to the longest example. Labels are -100 on padding (and on the prompt when `mask_prompt`)."""
    longest = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    for row, it in enumerate(items):
        ids = torch.tensor(it["input_ids"], dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        start = it["n_prompt"] if mask_prompt else 1
        labels[row, start : len(ids)] = ids[start:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "num_tokens": int(attention_mask.sum()), "index": [it.get("index") for it in items]}


def collate_packed(items: list[dict], mask_prompt: bool = True) -> dict:
    """All examples of the batch in one row (1, N), no padding. `position_ids` restart at 0 for each example and
    `cu_seq_lens` holds the example boundaries, so attention never crosses them; the first token of each example
    carries no label, so no target crosses them either."""
    ids = torch.tensor([t for it in items for t in it["input_ids"]], dtype=torch.long)
    lengths = torch.tensor([len(it["input_ids"]) for it in items], dtype=torch.int32)
    labels = ids.clone()
    offset = 0
    for it in items:
        n = len(it["input_ids"])
        labels[offset : offset + (it["n_prompt"] if mask_prompt else 1)] = IGNORE_INDEX
        offset += n
    cu_seq_lens = torch.zeros(len(items) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.cumsum(lengths, 0)
    position_ids = torch.cat([torch.arange(int(n)) for n in lengths])
    return {"input_ids": ids[None], "position_ids": position_ids[None], "labels": labels[None],
            "cu_seq_lens": cu_seq_lens, "max_length": int(lengths.max()), "num_tokens": int(lengths.sum()),
            "index": [it.get("index") for it in items]}


def collate_prompts(items: list[dict], pad_id: int) -> dict:
    """Left-pad prompts for batched generation (new tokens then line up at the right end)."""
    longest = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        if n:
            input_ids[row, longest - n :] = torch.tensor(it["input_ids"])
            attention_mask[row, longest - n :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "index": [it["index"] for it in items],
            "example": [it["example"] for it in items], "skip": [it.get("skip") for it in items]}


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
        batches, most = plans[self.rank], max(len(plan) for plan in plans)
        shortest = min(range(len(self.lengths)), key=self.lengths.__getitem__)
        return batches + [[Filler(shortest)] for _ in range(most - len(batches))]

    def _rank_batches(self, rank: int) -> list[list[int]]:
        order = self._order()
        if not self.equal_steps:
            order = order[rank :: self.world_size]
        if self.max_tokens is None:
            batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        else:
            batches, current, longest = [], [], 0
            for i in order:
                n = self.lengths[i]
                cost = (sum(self.lengths[j] for j in current) + n) if self.packed else (len(current) + 1) * max(longest, n)
                if current and cost > self.max_tokens:
                    batches.append(current)
                    current, longest = [], 0
                current.append(i)
                longest = max(longest, n)
            if current:
                batches.append(current)
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

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        skip, self.skip = self.skip, 0
        yield from batches[skip:]


def predict_batches(lengths: Sequence[int], todo: Sequence[int], max_rows: int, max_tokens: int | None = None,
                    new_tokens: int = 0) -> list[list[int]]:
    """Batches of the prompts `todo` (indices into `lengths`), longest first: consecutive prompts share a batch while
    it has at most `max_rows` rows and, with `max_tokens`, rows x (its longest prompt + `new_tokens`) stays within
    `max_tokens` (the key/value cache the batch fills). A prompt over the budget alone gets a batch of its own."""
    order = sorted(todo, key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        width = lengths[batch[0]] + new_tokens if batch else 0  # the first prompt of a batch is its longest
        if batch and len(batch) < max_rows and (max_tokens is None or (len(batch) + 1) * width <= max_tokens):
            batch.append(i)
        else:
            batches.append([i])
    return batches


class PresetBatches(Sampler[list[int]]):
    """Batches decided in advance (predict: prompts grouped by length, finished rows left out)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches


# --------------------------------------------------------------------------------------------------------------------
# The DataModule
# --------------------------------------------------------------------------------------------------------------------


class InstructionDataModule(LightningDataModule):
    """Dolly-style instruction data (`instruction`, `context`, `response`, optional `category`).

    Args:
        path: Training data: a Hugging Face hub dataset id, or a local .jsonl/.json/.parquet/.csv file (also as
            `pkg://package/file` inside an installed Python package, as the demo data is).
        val_path: Optional separate validation file (same formats). Without it, validation comes from `path`
            through `val_records` or `val_fraction`.
        predict_path: Instructions to answer with `predict`: .txt (one instruction per line) or .jsonl with
            `instruction` and optional `context`.
        train_records: Optional [start, stop) record range of `path` to train on (the seed recipe: [0, 800]).
        val_records: Optional [start, stop) record range for validation: of `val_path` if given, else of `path`
            (the seed recipe: [800, 1000]).
        val_fraction: Without `val_path` and `val_records`: fraction of the training records held out for
            validation by a seeded shuffle (0 = no validation).
        seed: Seed of the validation split and of the batch order.
        prompt_style: How records become prompts: mistral, alpaca or chat_template (the tokenizer's own).
        mask_prompt: Train on response tokens only (labels -100 on the prompt). False trains on the whole text, as
            the seed recipe did. Validation loss is always on response tokens, so runs stay comparable.
        max_length: Longest example in tokens (prompt + response + EOS).
        overlong: What to do with longer examples: drop them, or truncate them (they lose their EOS). Either way the
            count is logged.
        batch_size: Examples per training/validation batch (unless `max_tokens` sets a token budget).
        predict_batch_size: Prompts generated together in predict (None: `batch_size`). Prompts are batched by
            length, so padding stays small; a GPU generates 100s at once about as fast as a few.
        predict_max_tokens: Also bound each predict batch by the key/value cache it fills: rows x (longest prompt +
            max_new_tokens) token positions. Short prompts then share large batches while the few long ones go in
            small batches of their own (None: `predict_batch_size` rows whatever their length).
        max_new_tokens: Linked to `model.max_new_tokens` by the CLI, for `predict_max_tokens`.
        packing: Put all examples of a batch in one row without padding, attention kept within each example:
            the same batches and loss as padding, without computing on pad tokens.
        max_tokens: Token budget per batch instead of a fixed `batch_size`. With `packing`, the sum of example
            lengths; without, examples x longest. Larger batches for the GPU, fewer optimizer steps per epoch.
        length_grouped: Batch examples of similar length together (less padding), order still shuffled.
        instruction_field: Record key of the instruction.
        context_field: Record key of the optional context (null: the data has none).
        response_field: Record key of the response.
        category_field: Record key of the optional category (null: none), used for per-category metrics.
        skip_invalid: Leave out invalid records (counted in the log) instead of stopping with an error.
        num_workers: DataLoader worker processes.
        tokenizer: Tokenizer source; linked to `model.name_or_path` by the CLI.
        gguf_file: Linked to `model.gguf_file` by the CLI.
        trust_remote_code: Linked to `model.trust_remote_code` by the CLI.
    """

    def __init__(
        self,
        path: str = "databricks/databricks-dolly-15k",
        val_path: str | None = None,
        predict_path: str | None = None,
        train_records: tuple[int, int] | None = None,
        val_records: tuple[int, int] | None = None,
        val_fraction: float = 0.0,
        seed: int = 42,
        prompt_style: str = "mistral",
        mask_prompt: bool = True,
        max_length: int = 2048,
        overlong: Literal["drop", "truncate"] = "drop",
        batch_size: int = 4,
        predict_batch_size: int | None = None,
        predict_max_tokens: int | None = None,
        max_new_tokens: int = 0,
        packing: bool = False,
        max_tokens: int | None = None,
        length_grouped: bool = False,
        instruction_field: str = "instruction",
        context_field: str | None = "context",
        response_field: str = "response",
        category_field: str | None = "category",
        skip_invalid: bool = False,
        num_workers: int = 0,
        tokenizer: str = "mistralai/Mistral-7B-v0.1",
        gguf_file: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        check_prompt_style(prompt_style)
        problems = []
        for key, rng in (("train_records", train_records), ("val_records", val_records)):
            if rng is not None and not (0 <= rng[0] < rng[1]):
                problems.append(f"data.{key}={list(rng)}: expected [start, stop] with 0 <= start < stop")
        if (train_records and val_records and val_path is None
                and max(train_records[0], val_records[0]) < min(train_records[1], val_records[1])):
            problems.append(f"data.train_records={list(train_records)} and data.val_records={list(val_records)} "
                            "overlap: validation would measure memorization")
        if not 0.0 <= val_fraction < 1.0:
            problems.append(f"data.val_fraction={val_fraction}: expected 0 <= val_fraction < 1")
        if max_length < 8:
            problems.append(f"data.max_length={max_length}: too short for any prompt")
        if batch_size < 1 or (predict_batch_size is not None and predict_batch_size < 1):
            problems.append(f"data.batch_size={batch_size}, data.predict_batch_size={predict_batch_size}: "
                            "expected >= 1")
        if predict_max_tokens is not None and predict_max_tokens < 1:
            problems.append(f"data.predict_max_tokens={predict_max_tokens}: expected >= 1 (or null: no budget)")
        if max_tokens is not None and max_tokens < max_length:
            problems.append(f"data.max_tokens={max_tokens} is below data.max_length={max_length}: the longest "
                            "examples would not fit in a batch")
        raise_problems(problems, "Fix: correct these data settings.")
        self.path, self.val_path, self.predict_path = path, val_path, predict_path
        self.train_records, self.val_records, self.val_fraction, self.seed = train_records, val_records, val_fraction, seed
        self.prompt_style, self.mask_prompt = prompt_style, mask_prompt
        self.max_length, self.overlong = max_length, overlong
        self.batch_size, self.packing, self.max_tokens, self.length_grouped = batch_size, packing, max_tokens, length_grouped
        self.predict_batch_size = predict_batch_size or batch_size
        self.predict_max_tokens, self.max_new_tokens = predict_max_tokens, max_new_tokens
        self.predict_done: set[int] = set()  # rows an interrupted predict run already wrote (set by the writer)
        self.fields = Fields(instruction_field, context_field, response_field, category_field)
        self.skip_invalid, self.num_workers = skip_invalid, num_workers
        self.tokenizer_source, self.gguf_file, self.trust_remote_code = tokenizer, gguf_file, trust_remote_code
        self.tokenizer = None
        self.train_set = self.val_set = self.predict_set = None
        self.val_examples: list[Example] = []
        self._train_plan: BatchPlan | None = None

    # -- hooks -------------------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download (hub datasets and the tokenizer) into their caches; keeps no state."""
        predicting = self.trainer is not None and self.trainer.state.fn == "predict"
        for source in () if predicting else (self.path, self.val_path):
            if source and _is_hub_id(source):
                _hub_rows(source)
        load_tokenizer(self.tokenizer_source, self.gguf_file, self.trust_remote_code)

    def setup(self, stage: str) -> None:
        """Read, check, split and tokenize. Every problem is found here, before the model loads."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_source, self.gguf_file, self.trust_remote_code)
        self.style = prompt_style(self.prompt_style, self.tokenizer)
        if stage == "predict":
            if self.predict_set is None:
                self.predict_set = self._predict_set()
            return
        if self.val_set is not None and (stage != "fit" or self.train_set is not None):
            return
        train, val = self._split()
        if stage == "fit":
            items = fit_to_length(encode_examples(train, self.style, self.tokenizer), self.max_length,
                                  self.overlong, "data.path")
            self.train_set = TokenizedDataset(items)
            rank_zero_info(f"Training on {len(items)} examples ({sum(self.train_set.lengths)} tokens).")
        if val:
            # validation keeps every example (truncation only where needed) so that metrics see the same set
            # each item carries its position in val_examples (fit_to_length still drops an example whose prompt alone
            # is longer than max_length), so metrics find the category and reference of every example in a batch
            self.val_examples = val
            encoded = [(ids, n_prompt, i) for i, (ids, n_prompt)
                       in enumerate(encode_examples(val, self.style, self.tokenizer))]
            self.val_set = TokenizedDataset(fit_to_length(encoded, self.max_length, "truncate", "data.val_path"))
            world = self.trainer.world_size if self.trainer is not None else 1
            if len(self.val_set) < world:  # a process without validation batches would leave the others waiting
                raise LitMistralError(f"data: {len(self.val_set)} validation example(s) for {world} processes. Fix: "
                                      "validate on at least one example per process (data.val_records, "
                                      "data.val_fraction or data.val_path), or on fewer devices.")
        elif stage == "validate":
            raise LitMistralError("validate: there is no validation data. Fix: set --data.val_path, "
                                  "--data.val_records or --data.val_fraction.")

    def _split(self) -> tuple[list[Example], list[Example]]:
        examples = read_examples(self.path, self.fields, "data.path", skip_invalid=self.skip_invalid)
        train = self._slice(examples, self.train_records, "data.train_records", self.path)
        if self.val_path is not None:
            val = read_examples(self.val_path, self.fields, "data.val_path", skip_invalid=self.skip_invalid)
            val = self._slice(val, self.val_records, "data.val_records", self.val_path)
        elif self.val_records is not None:
            val = self._slice(examples, self.val_records, "data.val_records", self.path)
        elif self.val_fraction > 0:
            g = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(len(train), generator=g).tolist()
            n_val = max(1, round(len(train) * self.val_fraction))
            if n_val >= len(train):
                raise LitMistralError(f"data.val_fraction={self.val_fraction} leaves no training records out of "
                                      f"{len(train)}. Fix: lower it.")
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
        else:
            val = []
        return train, val

    @staticmethod
    def _slice(examples: list[Example], rng: tuple[int, int] | None, key: str, source: str) -> list[Example]:
        if rng is None:
            return examples
        start, stop = rng
        if start >= len(examples):
            raise LitMistralError(f"{key}={list(rng)} selects nothing: {source} has {len(examples)} records. "
                                  f"Fix: choose a range below {len(examples)}.")
        if stop > len(examples):
            rank_zero_warn(f"{key}={list(rng)}: {source} has only {len(examples)} records; using [{start}, {len(examples)}].")
        return examples[start:stop]

    def _predict_set(self) -> list[dict]:
        if self.predict_path is None:
            raise LitMistralError("predict: no instructions to answer. Fix: set --data.predict_path to a .txt file "
                                  "(one instruction per line) or a .jsonl file with 'instruction' (and 'context').")
        examples = read_examples(self.predict_path, self.fields, "data.predict_path", need_response=False,
                                 skip_invalid=self.skip_invalid)
        prompts = encode_prompts(examples, self.style, self.tokenizer)
        return [{"input_ids": ids, "index": i, "example": e} for i, (e, ids) in enumerate(zip(examples, prompts))]

    # -- loaders -----------------------------------------------------------------------------------------------------

    def _plan(self, dataset: TokenizedDataset, training: bool) -> BatchPlan:
        """Training: shuffled, the same number of batches on every rank. Validation: in order, every example."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return BatchPlan(dataset.lengths, self.batch_size, self.max_tokens, self.packing, shuffle=training,
                         length_grouped=self.length_grouped, seed=self.seed, rank=rank, world_size=world,
                         equal_steps=training)

    def _collate(self, mask_prompt: bool):
        if self.packing:
            return partial(collate_packed, mask_prompt=mask_prompt)
        return partial(collate_padded, pad_id=self.tokenizer.pad_token_id, mask_prompt=mask_prompt)

    def state_dict(self) -> dict:
        """Saved in checkpoints: how many processes shared the batches (resuming may use another count)."""
        return {"world_size": self.trainer.world_size if self.trainer is not None else 1}

    def load_state_dict(self, state: dict) -> None:
        self._saved_world_size = state.get("world_size", 1)

    def train_dataloader(self) -> DataLoader:
        plan = self._train_plan = self._plan(self.train_set, training=True)
        if self.trainer is not None:
            plan.set_epoch(self.trainer.current_epoch)
            # resuming mid-epoch: the checkpoint's loop state says how many batches each process trained on this
            # epoch; every process takes the same number of the epoch's batches in turn, so with W processes then
            # and W' now, W * done of the epoch's batches are done and each process skips W * done // W' of its own
            progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
            if self.trainer.fit_loop.restarting and progress.processed > 0:
                done = progress.processed * getattr(self, "_saved_world_size", plan.world_size)
                if done % plan.world_size:
                    rank_zero_warn(f"Resuming on {plan.world_size} processes a run saved on "
                                   f"{self._saved_world_size}: up to {plan.world_size - 1} batches of this epoch "
                                   "are trained on twice.")
                if done // plan.world_size < len(plan):
                    plan.skip = done // plan.world_size
        # its own generator: creating the iterator draws a worker seed, which must not move the global RNG that
        # LoRA dropout uses (a resumed run creates its iterator at another point than the uninterrupted one; and
        # it skips the validation that ran after the checkpoint it resumes from: so the other loaders too)
        return DataLoader(self.train_set, batch_sampler=plan, num_workers=self.num_workers,
                          collate_fn=self._collate(self.mask_prompt), generator=self._own_generator())

    def _own_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_sampler=self._plan(self.val_set, training=False),
                          num_workers=self.num_workers, collate_fn=self._collate(True), generator=self._own_generator())

    def predict_dataloader(self) -> DataLoader:
        # longest prompts first (little padding per batch; the memory peak comes at once), done rows left out;
        # the writer puts the rows back in input order
        lengths = [len(item["input_ids"]) for item in self.predict_set]
        todo = [i for i in range(len(lengths)) if i not in self.predict_done]
        batches = predict_batches(lengths, todo, self.predict_batch_size, self.predict_max_tokens, self.max_new_tokens)
        return DataLoader(self.predict_set, batch_sampler=PresetBatches(batches), num_workers=self.num_workers,
                          collate_fn=partial(collate_prompts, pad_id=self.tokenizer.pad_token_id),
                          generator=self._own_generator())
