"""`InstructionDataModule`: Dolly-style instruction data for Lightning. Each hook does one job: `prepare_data`
downloads, `setup` reads, checks, splits and tokenizes (every problem found before the model loads), the loaders
batch (training: shuffled, split across processes, resumable mid-epoch; validation: every example; predict: prompts
batched for generation)."""

from functools import partial
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lit_mistral.data import splits
from lit_mistral.data.batching import BatchPlan, check_val_check_interval, collate_packed, collate_padded
from lit_mistral.data.prompt_batches import PresetBatches, collate_prompts
from lit_mistral.data.prompts import check_prompt_style
from lit_mistral.data.records import Fields, example_key, hub_rows, is_hub_id, read_inputs
from lit_mistral.data.tokenize import Formatter, TokenizedDataset
from lit_mistral.errors import LitMistralError, raise_problems
from lit_mistral.sources import context_length, load_tokenizer


def settings_problems(val_path, train_records, val_records, val_fraction, chat_template, max_length, batch_size,
                      predict_batch_size, predict_max_tokens, max_tokens, num_workers) -> list[str]:
    """What is wrong with the DataModule's settings, each alone or together (checked when it is made)."""
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
    if chat_template is not None and not Path(chat_template).is_file():
        problems.append(f"data.chat_template={chat_template!r}: no such file (a Jinja chat template)")
    if num_workers < 0:
        problems.append(f"data.num_workers={num_workers}: expected >= 0 (0 loads batches in the main process)")
    if max_tokens is not None and max_tokens < max_length:
        problems.append(f"data.max_tokens={max_tokens} is below data.max_length={max_length}: the longest "
                        "examples would not fit in a batch")
    return problems


class ResumableLoader(DataLoader):
    """The training loader, resumable as Lightning asks (`state_dict`/`load_state_dict`; without them Lightning warns
    that a mid-epoch resume gives "unreliable results"). Its position needs no state of its own: the checkpoint's
    loop progress says how many batches of the epoch were taken, and `train_dataloader` makes the batch plan skip
    them (whatever the number of processes then and now), so a resumed run trains on what the uninterrupted one
    would have."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class InstructionDataModule(LightningDataModule):
    """Instruction data (Dolly-style records: `instruction`, `context`, `response`, optional `category`) or
    conversations (`messages` as OpenAI's API takes them, or ShareGPT's `conversations`).

    Args:
        path: Training data: a Hugging Face hub dataset id, or a local .jsonl/.json/.parquet/.csv file (also as
            `pkg://package/file` inside an installed Python package, as the demo data is).
        val_path: Optional separate validation file (same formats). Without it, validation comes from `path`
            through `val_records` or `val_fraction`.
        predict_path: Inputs to answer with `predict`: .txt (one instruction per line), or .jsonl with `instruction`
            (and `context`) or `messages` ending with a user turn.
        format: What the files hold: `instruction` records, conversations as `messages` or `sharegpt`, or `auto`:
            conversations when rows have a `messages` or `conversations` field.
        train_records: Optional [start, stop) record range of `path` to train on (the seed recipe: [0, 800]).
        val_records: Optional [start, stop) record range for validation: of `val_path` if given, else of `path`
            (the seed recipe: [800, 1000]).
        val_fraction: Without `val_path` and `val_records`: fraction of the training records held out for
            validation by a seeded shuffle (0 = no validation).
        seed: Seed of the validation split and of the batch order.
        prompt_style: How records and conversations become token ids: mistral (`[INST] ... [/INST]`), alpaca (records
            only) or chat_template (the tokenizer's own, or `chat_template`'s).
        chat_template: A Jinja chat template file to use instead of the tokenizer's (prompt_style chat_template).
        mask_prompt: Train on response tokens only (each assistant turn, for conversations); False: on the whole text.
            Validation loss is always on response tokens.
        max_length: Longest example in tokens (prompt + response + EOS).
        overlong: What to do with longer examples: drop them, or truncate them (records lose their EOS;
            conversations are cut after the last assistant turn that fits). Either way the count is logged.
        batch_size: Examples per training/validation batch (unless `max_tokens` sets a token budget).
        predict_batch_size: Prompts per predict batch, longest (prompt + answer limit) first (None: `batch_size`).
            Linked to `model.generation.max_rows` by the CLI.
        predict_max_tokens: Also bound each predict batch by the key/value cache it fills: rows x (longest prompt +
            max_new_tokens) token positions (None: no bound). Linked to `model.generation.max_cache_tokens`.
        max_new_tokens: Linked to `model.generation.max_new_tokens` by the CLI: the most new tokens of an answer
            (an input's own `max_new_tokens` may only lower it).
        packing: Put all examples of a batch in one row without padding, attention kept within each example:
            the same batches and loss as padding, without computing on pad tokens.
        max_tokens: Token budget per batch instead of a fixed `batch_size`. With `packing`, the sum of example
            lengths; without, examples x longest. Larger batches for the GPU, fewer optimizer steps per epoch.
        length_grouped: Batch examples of similar length together (less padding), order still shuffled.
        fields: Which record keys hold the instruction, context, response and category.
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
        format: Literal["auto", "instruction", "messages", "sharegpt"] = "auto",
        train_records: tuple[int, int] | None = None,
        val_records: tuple[int, int] | None = None,
        val_fraction: float = 0.0,
        seed: int = 42,
        prompt_style: str = "mistral",
        chat_template: str | None = None,
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
        fields: Fields = Fields(),
        skip_invalid: bool = False,
        num_workers: int = 0,
        tokenizer: str = "mistralai/Mistral-7B-v0.1",
        gguf_file: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        check_prompt_style(prompt_style)
        raise_problems(settings_problems(val_path, train_records, val_records, val_fraction, chat_template, max_length,
                                         batch_size, predict_batch_size, predict_max_tokens, max_tokens, num_workers),
                       "Fix: correct these data settings.")
        self.path, self.val_path, self.predict_path = path, val_path, predict_path
        self.train_records, self.val_records = train_records, val_records
        self.val_fraction, self.seed = val_fraction, seed
        self.format, self.prompt_style, self.chat_template = format, prompt_style, chat_template
        self.mask_prompt = mask_prompt
        self.max_length, self.overlong = max_length, overlong
        self.batch_size, self.packing = batch_size, packing
        self.max_tokens, self.length_grouped = max_tokens, length_grouped
        self.predict_batch_size = predict_batch_size or batch_size
        self.predict_max_tokens, self.max_new_tokens = predict_max_tokens, max_new_tokens
        self.predict_done: set[int] = set()  # rows an interrupted predict run already wrote (set by the writer)
        self.fields = fields
        self.skip_invalid, self.num_workers = skip_invalid, num_workers
        self.tokenizer_source, self.gguf_file, self.trust_remote_code = tokenizer, gguf_file, trust_remote_code
        self.tokenizer = None
        self.context: int | None = None  # the model's context window, in tokens (None: its config does not say)
        self.train_set = self.val_set = self.predict_set = None
        self.val_examples: list = []  # Examples or Conversations
        self.formatter: Formatter | None = None  # set by the first file read: what it holds decides
        self._train_plan: BatchPlan | None = None

    # -- hooks -------------------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download (hub datasets and the tokenizer) into their caches; keeps no state."""
        predicting = self.trainer is not None and self.trainer.state.fn == "predict"
        for source in () if predicting else (self.path, self.val_path):
            if source and is_hub_id(source):
                hub_rows(source)
        load_tokenizer(self.tokenizer_source, self.gguf_file, self.trust_remote_code)

    def setup(self, stage: str) -> None:
        """Read, check, split and tokenize. Every problem is found here, before the model loads."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_source, self.gguf_file, self.trust_remote_code)
            # no longer prompt is answered: inputs are cut past it before tokenizing (bounded work whatever their size)
            self.context = context_length(self.tokenizer_source, self.gguf_file, self.trust_remote_code)
        if stage == "predict":
            if self.predict_set is None:
                self.predict_set = self._predict_set()
            return
        if self.val_set is not None and (stage != "fit" or self.train_set is not None):
            return
        train, val = self._split()
        if stage == "fit":
            items = self.formatter.encode(train, self.max_length, self.overlong, "data.path", self.skip_invalid)
            self.train_set = TokenizedDataset(items)
            rank_zero_info(f"Training on {len(items)} {self.formatter.kind} examples "
                           f"({sum(self.train_set.lengths)} tokens).")
            check_val_check_interval(self.trainer, lambda: self._plan(self.train_set, training=True),
                                     len(self.train_set))
        if val:
            # validation keeps every example (truncation only where needed) so that metrics see the same set
            # each item carries its position in val_examples (an example whose prompt alone is longer than max_length
            # is still dropped), so metrics find the category and reference of every example in a batch
            self.val_examples = val
            self.val_set = TokenizedDataset(self.formatter.encode(val, self.max_length, "truncate", "data.val_path",
                                                                  self.skip_invalid))
            world = self.trainer.world_size if self.trainer is not None else 1
            if len(self.val_set) < world:  # a process without validation batches would leave the others waiting
                raise LitMistralError(f"data: {len(self.val_set)} validation example(s) for {world} processes. Fix: "
                                      "validate on at least one example per process (data.val_records, "
                                      "data.val_fraction or data.val_path), or on fewer devices.")
        elif stage == "validate":
            raise LitMistralError("validate: there is no validation data. Fix: set --data.val_path, "
                                  "--data.val_records or --data.val_fraction.")

    def _read(self, source: str, key: str, need_response: bool = True) -> list:
        """The checked inputs of `source`; the first source read sets the kind (instruction records or
        conversations) and the formatter, which every other must match."""
        kind, items = read_inputs(source, self.fields, key, need_response, self.skip_invalid, self.format)
        if self.formatter is None:
            if kind != "instruction":
                rank_zero_info(f"{key}: {source} holds conversations ({kind} shape).")
            template = Path(self.chat_template).read_text(encoding="utf-8") if self.chat_template else None
            self.formatter = Formatter(kind, self.prompt_style, self.tokenizer, template,
                                       f"data.chat_template {self.chat_template}" if self.chat_template else None)
        elif (kind == "instruction") != (self.formatter.kind == "instruction"):
            raise LitMistralError(f"{key}: {source} holds {kind} data where the data read before holds "
                                  f"{self.formatter.kind} data. Fix: give files of one kind (instruction records or "
                                  "conversations).")
        return items

    def _split(self) -> tuple[list, list]:
        examples = self._read(self.path, "data.path")
        train = splits.select(examples, self.train_records, "data.train_records", self.path)
        if self.val_path is not None:
            val = self._read(self.val_path, "data.val_path")
            return train, splits.select(val, self.val_records, "data.val_records", self.val_path)
        if self.val_records is not None:
            return train, splits.select(examples, self.val_records, "data.val_records", self.path)
        return splits.hold_out(train, self.val_fraction, self.seed)

    def prompt_items(self, examples: list) -> list[dict]:
        """Prompt items for generation (`input_ids`, `index`: position in `examples`, `example`), formatted and
        tokenized as training formats prompts (a conversation: up to its last user turn)."""
        return splits.prompt_items(self.formatter, examples, self.context)

    def predict_instructions(self) -> list[str]:
        """What identifies each predict input (its instruction; a conversation's messages as JSON), in input order
        (reads and checks the file once)."""
        self.setup("predict")
        return [example_key(item["example"]) for item in self.predict_set]

    def _predict_set(self) -> list[dict]:
        if self.predict_path is None:
            raise LitMistralError("predict: no instructions to answer. Fix: set --data.predict_path to a .txt file "
                                  "(one instruction per line) or a .jsonl file with 'instruction' (and 'context'), "
                                  "or with 'messages' ending with a user turn.")
        items = self.prompt_items(self._read(self.predict_path, "data.predict_path", need_response=False))
        splits.check_cache(items, self.predict_max_tokens, self.max_new_tokens, self.context)
        return items

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
            progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
            if self.trainer.fit_loop.restarting and progress.processed > 0:
                plan.resume(progress.processed, getattr(self, "_saved_world_size", plan.world_size))
        # its own generator: creating the iterator draws a worker seed, which must not move the global RNG that
        # LoRA dropout uses (a resumed run creates its iterator at another point than the uninterrupted one; and
        # it skips the validation that ran after the checkpoint it resumes from: so the other loaders too)
        return ResumableLoader(self.train_set, batch_sampler=plan, num_workers=self.num_workers,
                               collate_fn=self._collate(self.mask_prompt), generator=self._own_generator(),
                               pin_memory=self._to_gpu())

    def _own_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def _to_gpu(self) -> bool:
        """Whether batches go to a CUDA device: then they are collated into pinned memory, so that their copy to the
        GPU is queued behind the running step (from pageable memory CUDA waits for the step to finish first, and the
        GPU idles before the copies)."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_sampler=self._plan(self.val_set, training=False),
                          num_workers=self.num_workers, collate_fn=self._collate(True), generator=self._own_generator(),
                          pin_memory=self._to_gpu())

    def predict_dataloader(self) -> DataLoader:
        # done rows left out; the writer puts the rows back in input order
        batches = splits.predict_plan(self.predict_set, self.predict_done, self.predict_batch_size,
                                      self.predict_max_tokens, self.max_new_tokens)
        return DataLoader(self.predict_set, batch_sampler=PresetBatches(batches), num_workers=self.num_workers,
                          collate_fn=partial(collate_prompts, pad_id=self.tokenizer.pad_token_id),
                          generator=self._own_generator())
