"""`InstructionDataModule`: Dolly-style instruction data for Lightning. Each hook does one job: `prepare_data`
downloads, `setup` reads, checks, splits and tokenizes (every problem found before the model loads), the loaders
batch (training: shuffled, split across processes, resumable mid-epoch; validation: every example; predict: prompts
batched for generation)."""

from functools import partial
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lit_mistral.data.batching import BatchPlan, collate_packed, collate_padded
from lit_mistral.data.prompts import check_prompt_style, prompt_style
from lit_mistral.data.records import Example, Fields, hub_rows, is_hub_id, read_examples
from lit_mistral.data.tokenize import TokenizedDataset, encode_examples, encode_prompts, fit_to_length
from lit_mistral.errors import LitMistralError, raise_problems
from lit_mistral.generation.batches import PresetBatches, collate_prompts, predict_batches
from lit_mistral.sources import load_tokenizer


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
        fields: Fields = Fields(),
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
        if num_workers < 0:
            problems.append(f"data.num_workers={num_workers}: expected >= 0 (0 loads batches in the main process)")
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
        self.fields = fields
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
            if source and is_hub_id(source):
                hub_rows(source)
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
            encoded = encode_examples(train, self.style, self.tokenizer, self.max_length)
            items = fit_to_length(encoded, self.max_length, self.overlong, "data.path")
            self.train_set = TokenizedDataset(items)
            rank_zero_info(f"Training on {len(items)} examples ({sum(self.train_set.lengths)} tokens).")
            self._check_val_check_interval()
        if val:
            # validation keeps every example (truncation only where needed) so that metrics see the same set
            # each item carries its position in val_examples (fit_to_length still drops an example whose prompt alone
            # is longer than max_length), so metrics find the category and reference of every example in a batch
            self.val_examples = val
            encoded = [(ids, n_prompt, i) for i, (ids, n_prompt)
                       in enumerate(encode_examples(val, self.style, self.tokenizer, self.max_length))]
            self.val_set = TokenizedDataset(fit_to_length(encoded, self.max_length, "truncate", "data.val_path"))
            world = self.trainer.world_size if self.trainer is not None else 1
            if len(self.val_set) < world:  # a process without validation batches would leave the others waiting
                raise LitMistralError(f"data: {len(self.val_set)} validation example(s) for {world} processes. Fix: "
                                      "validate on at least one example per process (data.val_records, "
                                      "data.val_fraction or data.val_path), or on fewer devices.")
        elif stage == "validate":
            raise LitMistralError("validate: there is no validation data. Fix: set --data.val_path, "
                                  "--data.val_records or --data.val_fraction.")

    def _check_val_check_interval(self) -> None:
        """Lightning refuses an integer `val_check_interval` above the training batches of an epoch, but only once
        the model is loaded; the batches are known here (as Lightning counts them: per process, within
        `limit_train_batches`)."""
        trainer = self.trainer
        interval = getattr(trainer, "val_check_interval", None)
        if not isinstance(interval, int) or trainer.check_val_every_n_epoch is None or not trainer.limit_val_batches:
            return
        batches, limit = len(self._plan(self.train_set, training=True)), trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        if interval > batches:
            raise LitMistralError(
                f"trainer.val_check_interval={interval} is more than the {batches} training batches of an epoch "
                f"({len(self.train_set)} examples). Fix: --trainer.val_check_interval {batches} or less, "
                "--trainer.check_val_every_n_epoch null to count batches across epochs, or more training records.")

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

    def prompt_items(self, examples: list[Example]) -> list[dict]:
        """Prompt items for generation (`input_ids`, `index`: position in `examples`, `example`), formatted and
        tokenized as training formats prompts."""
        prompts = encode_prompts(examples, self.style, self.tokenizer)
        return [{"input_ids": ids, "index": i, "example": e} for i, (e, ids) in enumerate(zip(examples, prompts))]

    def predict_instructions(self) -> list[str]:
        """The instruction of every predict input, in input order (reads and checks the file once)."""
        self.setup("predict")
        return [item["example"].instruction for item in self.predict_set]

    def _predict_set(self) -> list[dict]:
        if self.predict_path is None:
            raise LitMistralError("predict: no instructions to answer. Fix: set --data.predict_path to a .txt file "
                                  "(one instruction per line) or a .jsonl file with 'instruction' (and 'context').")
        examples = read_examples(self.predict_path, self.fields, "data.predict_path", need_response=False,
                                 skip_invalid=self.skip_invalid)
        return self.prompt_items(examples)

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
