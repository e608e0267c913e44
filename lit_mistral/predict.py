"""Answering a file of instructions: batched generation, and a writer that streams JSONL in input order."""

import json
import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lit_mistral.errors import LitMistralError


@torch.no_grad()
def generate(model, tokenizer, batch: dict, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
             top_k: int) -> list[dict]:
    """Generate answers for one left-padded batch of prompts; one record per prompt."""
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True,
                         max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **sampling)
    new = out[:, batch["input_ids"].shape[1]:].tolist()  # (B, new): prompts end at the same column (left padding)
    records = []
    for index, example, prompt_mask, ids in zip(batch["index"], batch["example"], batch["attention_mask"], new):
        finish = "length"
        if tokenizer.eos_token_id in ids:
            ids, finish = ids[: ids.index(tokenizer.eos_token_id)], "eos"
        records.append({"index": index, "instruction": example.instruction, "context": example.context,
                        "response": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                        "prompt_tokens": int(prompt_mask.sum()), "response_tokens": len(ids), "finish": finish})
    return records


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes predictions to a JSONL file as batches finish: one line per input, in input order.

    Args:
        path: Output file. Default: `predictions.jsonl` in the run's folder (`trainer.log_dir`).
        overwrite: Replace an existing output file instead of stopping with an error.
    """

    def __init__(self, path: str | None = None, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.path, self.overwrite = path, overwrite
        self._file = None
        self._pending: dict[int, dict] = {}
        self._next = 0

    def _target(self, trainer) -> Path:
        return Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"

    def on_predict_start(self, trainer, pl_module) -> None:
        target = self._target(trainer)
        if target.exists() and not self.overwrite:
            raise LitMistralError(f"predictions.path: {str(target)!r} exists. Fix: choose another path, or pass "
                                  "--predictions.overwrite true to replace it.")
        if not target.parent.is_dir():
            raise LitMistralError(f"predictions.path: the folder {str(target.parent)!r} does not exist. "
                                  "Fix: create it or choose another path.")
        if trainer.is_global_zero:
            self._file = open(target, "w", encoding="utf-8")
        self._pending, self._next = {}, 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if self._file is None:
            return
        for record in prediction:
            self._pending[record["index"]] = record
        while self._next in self._pending:  # keep input order even if batches finish out of order
            self._file.write(json.dumps(self._pending.pop(self._next), ensure_ascii=False) + "\n")
            self._next += 1
        self._file.flush()
        os.fsync(self._file.fileno())

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._file is not None:
            for index in sorted(self._pending):
                self._file.write(json.dumps(self._pending[index], ensure_ascii=False) + "\n")
            self._file.close()
            rank_zero_info(f"Wrote {self._next + len(self._pending)} predictions to {self._file.name}")
            self._file = None
