"""Answering a file of instructions: batched generation, a JSONL writer that streams rows as batches finish and can
resume an interrupted run, and a progress bar that shows rows/s and generated tokens/s."""

import json
import os
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from lit_mistral.errors import LitMistralError
from lit_mistral.files import write_text


def _record(index, example, prompt_tokens: int, response: str | None, response_tokens: int, finish: str,
            error: str | None = None) -> dict:
    record = {"index": index, "instruction": example.instruction, "context": example.context, "response": response,
              "prompt_tokens": prompt_tokens, "response_tokens": response_tokens, "finish": finish}
    if error:
        record["error"] = error
    return record


@torch.no_grad()
def generate(model, tokenizer, batch: dict, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
             top_k: int, context: int | None = None, cache: str = "dynamic", synced_gpus: bool = False) -> list[dict]:
    """Generate answers for one left-padded batch of prompts; one record per prompt, in batch order.

    A prompt that leaves no room for `max_new_tokens` in the model's `context` window gets a record saying so
    (finish "skipped") instead of an answer. `synced_gpus` (a model sharded over processes, each calling this with
    its own batch): every process runs the same number of decoding steps, a batch of skipped prompts included."""
    lengths = batch["attention_mask"].sum(1).tolist()
    fits = [context is None or n + max_new_tokens <= context for n in lengths]
    answers: dict[int, tuple[str, int, str]] = {}
    rows = [i for i, ok in enumerate(fits) if ok]
    if rows or synced_gpus:
        # drop the left padding only skipped prompts needed; all skipped (synced_gpus): the last token of the first
        # prompt steps for the other processes, and its output is not read (no rows)
        width = max(lengths[i] for i in rows) if rows else 1
        input_ids, attention_mask = (batch[k][rows or [0], -width:] for k in ("input_ids", "attention_mask"))
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
        if cache == "static":
            sampling["cache_implementation"] = "static"
        if synced_gpus:
            sampling["synced_gpus"] = True
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                             max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
        for row, ids in zip(rows, out[:, width:].tolist()):  # new tokens start at the same column for every row
            finish = "length"
            if tokenizer.eos_token_id in ids:
                ids, finish = ids[: ids.index(tokenizer.eos_token_id)], "eos"
            answers[row] = (tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids), finish)
    records = []
    for row, (index, example) in enumerate(zip(batch["index"], batch["example"])):
        if row in answers:
            records.append(_record(index, example, lengths[row], *answers[row]))
        else:
            records.append(_record(index, example, lengths[row], None, 0, "skipped", error=(
                f"the prompt has {lengths[row]} tokens; with max_new_tokens={max_new_tokens} it does not fit the "
                f"model's context of {context} tokens. Fix: shorten it or lower --model.max_new_tokens.")))
    return records


def read_done(path: Path, instructions: list[str]) -> dict[int, str]:
    """Rows of an earlier, interrupted run of the same inputs: {index: JSON line}. A line cut short by the
    interruption is dropped; a row that does not match the inputs stops the run."""
    done = {}
    # split on "\n" only: str.splitlines also splits on U+2028 and friends, which JSON strings may hold raw
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line:
            continue
        try:
            row = json.loads(line)
            index = row["index"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # the last line of a killed run may be half-written
        if not (isinstance(index, int) and 0 <= index < len(instructions)) or row.get("instruction") != instructions[index]:
            raise LitMistralError(f"{path}:{number}: this row does not belong to the current inputs (index "
                                  f"{index!r}). Fix: resume with the same --data.predict_path, or write elsewhere.")
        done[index] = line
    return done


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes predictions to a JSONL file: each row as soon as its batch finishes (nothing finished is lost if the
    run is interrupted), then, at the end, all rows in input order.

    Args:
        path: Output file. Default: `predictions.jsonl` in the run's folder (`trainer.log_dir`).
        overwrite: Replace an existing output file.
        resume: Keep the rows of an existing output file (an interrupted run on the same inputs) and generate only
            the missing ones.
    """

    def __init__(self, path: str | None = None, overwrite: bool = False, resume: bool = False) -> None:
        super().__init__(write_interval="batch")
        if overwrite and resume:
            raise LitMistralError("predictions.overwrite and predictions.resume exclude each other. Fix: choose one.")
        self.path, self.overwrite, self.resume = path, overwrite, resume
        self._file = None
        self.target: Path | None = None
        self.rows = self.tokens = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Before any generation: check the output can be written, and find the rows already done."""
        if stage != "predict":
            return
        self.target = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        folder = self.target.parent
        if self.path and not folder.is_dir():
            raise LitMistralError(f"predictions.path: the folder {str(folder)!r} does not exist. "
                                  "Fix: create it or choose another path.")
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise LitMistralError(f"predictions.path: the folder {str(folder)!r} is not writable. "
                                  "Fix: choose another path.")
        done = {}
        if self.target.exists():
            if not (self.overwrite or self.resume):
                raise LitMistralError(f"predictions.path: {str(self.target)!r} exists. Fix: pass "
                                      "--predictions.resume true to finish an interrupted run, "
                                      "--predictions.overwrite true to replace it, or choose another path.")
            if self.resume:
                datamodule = trainer.datamodule
                datamodule.setup("predict")
                done = read_done(self.target, [it["example"].instruction for it in datamodule.predict_set])
                datamodule.predict_done = set(done)
                rank_zero_info(f"Resuming {self.target}: {len(done)} of {len(datamodule.predict_set)} rows are done.")
        self._done_lines = done

    def on_predict_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        # start from the complete rows only (drops a half-written last line), then append as batches finish
        write_text(self.target, "".join(line + "\n" for line in self._done_lines.values()))
        self._file = open(self.target, "a", encoding="utf-8")
        self.rows = self.tokens = 0
        self._started = time.perf_counter()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if self._file is None:
            return
        for record in prediction:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.tokens += record["response_tokens"]
        self.rows += len(prediction)
        self._file.flush()
        os.fsync(self._file.fileno())

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        seconds = time.perf_counter() - self._started
        lines = [line for line in self.target.read_text(encoding="utf-8").split("\n") if line]
        lines.sort(key=lambda line: json.loads(line)["index"])  # input order, whatever order batches finished in
        write_text(self.target, "".join(line + "\n" for line in lines))
        rank_zero_info(f"Wrote {len(lines)} predictions to {self.target} ({self.rows} generated now: "
                       f"{self.rows / seconds:.2f} rows/s, {self.tokens / seconds:.1f} new tokens/s).")


class PredictionProgressBar(TQDMProgressBar):
    """Lightning's progress bar, with rows/s and generated tokens/s while predicting."""

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self._predict_clock, self._predict_rows, self._predict_tokens = time.perf_counter(), 0, 0
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._predict_rows += len(outputs)
        self._predict_tokens += sum(r["response_tokens"] for r in outputs)
        seconds = max(time.perf_counter() - self._predict_clock, 1e-9)
        self.predict_progress_bar.set_postfix(rows_per_s=f"{self._predict_rows / seconds:.2f}",
                                              tokens_per_s=f"{self._predict_tokens / seconds:.1f}")
