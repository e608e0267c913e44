"""Predict's callbacks: a JSONL writer that streams each row to `<path>.partial` as its batch finishes and writes
the output whole, in input order, at the end; what resuming an interrupted run reads back and checks; and the CLI's
progress bar (rows/s and generated tokens/s in predict; the epoch's total kept on a fit resumed mid-epoch).

Apart from `callbacks.py` (telemetry and the adapter written after fit) because these concern one file and its
rows: which file may be replaced, which rows belong to the current inputs and settings, and what is left behind
when a run stops."""

import json
import os
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from lit_mistral.data.records import input_key
from lit_mistral.errors import LitMistralError
from lit_mistral.io import OutputLock, check_output_file, write_text

ROW_KEYS = {"index", "instruction"}  # what every row of a predictions file has (and names it)


def is_predictions(path: Path) -> bool:
    """Whether the file `path` is empty or holds predictions (its first line a row), so that
    `--predictions.overwrite` may replace it: never the inputs, a checkpoint, or any other file."""
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    if not first.strip():
        return True
    try:
        row = json.loads(first)
    except ValueError:  # not JSON, not UTF-8
        return False
    return isinstance(row, dict) and ROW_KEYS <= row.keys()


def settings_differ(made_with: dict, ours: dict) -> list[str]:
    """How the generation settings a row was made with (its `generation`) differ from this run's `ours` (how it
    samples only where both sample: else `do_sample` differs, or neither samples)."""
    return [f"model.generation.{k}: the rows have {made_with[k]!r}, this run {v!r}"
            for k, v in ours.items() if k in made_with and made_with[k] != v]


def read_done(path: Path, instructions: list[str], made_with: dict | None = None) -> dict[int, str]:
    """Rows of an earlier, interrupted run of the same inputs: {index: JSON line}. The last line, cut short by the
    interruption, is dropped; any other line that is not a row, or a row that does not match the inputs
    (`instructions`: what identifies each, see `data.records.example_key`), stops the run (the file is not an
    interrupted run's: resuming would replace it), and so does a row made with other generation settings than
    `made_with` (one file would mix answers of two kinds; rows of versions that did not record them pass)."""
    done = {}
    fix = "Fix: resume with the same --data.predict_path from predictions lit_mistral wrote, or write elsewhere."
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise LitMistralError(f"{path}: not UTF-8 text, so not predictions. {fix}") from None
    # split on "\n" only: str.splitlines also splits on U+2028 and friends, which JSON strings may hold raw
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            row = json.loads(line)
            index = row["index"] if ROW_KEYS <= row.keys() else None
        except (json.JSONDecodeError, AttributeError):
            index = None
        if index is None and number == len(lines):
            continue  # the last line of a killed run may be half-written (a whole line ends with a newline)
        if index is None:
            raise LitMistralError(f"{path}:{number}: not a row of predictions. {fix}")
        key = input_key(row.get("instruction"), row.get("messages"))
        if not (isinstance(index, int) and 0 <= index < len(instructions)) or key != instructions[index]:
            raise LitMistralError(f"{path}:{number}: this row does not belong to the current inputs (index "
                                  f"{index!r}). Fix: resume with the same --data.predict_path, or write elsewhere.")
        theirs = row.get("generation")
        if made_with is not None and isinstance(theirs, dict) and settings_differ(theirs, made_with):
            raise LitMistralError(
                f"{path}:{number}: this row was generated with other settings than this run's:\n"
                + "".join(f"  {d}\n" for d in settings_differ(theirs, made_with))
                + "Fix: resume with the settings the rows were made with, or start over with "
                  "--predictions.overwrite true (or write elsewhere).")
        done[index] = line
    return done


class GenerationRate:
    """Rows and generated tokens since `start()`, and their rates: what the writer reports and the bar shows."""

    def start(self) -> None:
        self.rows, self.tokens, self._started = 0, 0, time.perf_counter()

    def add(self, records: list[dict]) -> None:
        self.rows += len(records)
        self.tokens += sum(r["response_tokens"] for r in records)

    def per_second(self) -> tuple[float, float]:
        seconds = max(time.perf_counter() - self._started, 1e-9)
        return self.rows / seconds, self.tokens / seconds

    def __str__(self) -> str:
        rows, tokens = self.per_second()
        return f"{rows:.2f} rows/s, {tokens:.1f} new tokens/s"


def partial_path(target: Path) -> Path:
    """Where a run writing `target` puts each row as its batch finishes: an interrupted run leaves its finished rows
    there (what `--predictions.resume` reads), while `target` is only ever written whole."""
    return target.with_name(target.name + ".partial")


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes predictions to a JSONL file: each row as soon as its batch finishes, to `<path>.partial` (nothing
    finished is lost if the run is interrupted), then, at the end, all rows in input order to `path`, which replaces
    an earlier output only then.

    Args:
        path: Output file. Default: `predictions.jsonl` in the run's folder (`trainer.log_dir`).
        overwrite: Replace an existing output file (once the new one is complete).
        resume: Keep the rows of an interrupted run on the same inputs (`<path>.partial`, or an older `path`) and
            generate only the missing ones.
    """

    def __init__(self, path: str | None = None, overwrite: bool = False, resume: bool = False) -> None:
        super().__init__(write_interval="batch")
        if overwrite and resume:
            raise LitMistralError("predictions.overwrite and predictions.resume exclude each other. Fix: choose one.")
        self.path, self.overwrite, self.resume = path, overwrite, resume
        self._file = None
        self._lock: OutputLock | None = None
        self.target: Path | None = None
        self.rate = GenerationRate()

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Before any generation: check the output can be written, and find the rows already done."""
        if stage != "predict":
            return
        run_folder = Path(trainer.log_dir or trainer.default_root_dir)
        self.target = Path(self.path) if self.path else run_folder / "predictions.jsonl"
        if not self.path:
            self.target.parent.mkdir(parents=True, exist_ok=True)  # the run folder
        check_output_file(self.target, "predictions.path", "predictions.jsonl")
        if trainer.is_global_zero:  # the process that writes; before it looks at what is there
            self._lock = OutputLock(self.target, "predictions.path")
        self.partial = partial_path(self.target)
        self.made_with = pl_module.generation.answers_made_with()
        if self.overwrite and self.target.exists() and not is_predictions(self.target):
            raise LitMistralError(f"predictions.overwrite: {str(self.target)!r} is not an earlier predictions output "
                                  "(its first line is not a row with an index and an instruction), and "
                                  "--predictions.overwrite replaces only those. Fix: choose another "
                                  "--predictions.path.")
        done = {}
        if not (self.overwrite or self.resume) and self.target.exists():
            raise LitMistralError(f"predictions.path: {str(self.target)!r} exists. Fix: pass "
                                  "--predictions.resume true to finish an interrupted run, "
                                  "--predictions.overwrite true to replace it, or choose another path.")
        if not (self.overwrite or self.resume) and self.partial.exists():
            raise LitMistralError(f"predictions.path: {str(self.partial)!r} holds the rows of an interrupted run. "
                                  "Fix: pass --predictions.resume true to finish it, --predictions.overwrite true to "
                                  "start over, or choose another path.")
        # the rows of the interrupted run: where it was writing them, or (earlier versions) in the output itself
        source = self.partial if self.partial.exists() else self.target
        if self.resume and source.exists():
            done = read_done(source, trainer.datamodule.predict_instructions(), self.made_with)
            trainer.datamodule.predict_done = set(done)
            rank_zero_info(f"Resuming {source}: {len(done)} of {len(trainer.datamodule.predict_instructions())}"
                           " rows are done.")
        self._done_lines = done

    def on_predict_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        # start from the complete rows only (drops a half-written last line), then append as batches finish; an
        # earlier output stays as it is until the new one is complete
        write_text(self.partial, "".join(line + "\n" for line in self._done_lines.values()))
        self._file = open(self.partial, "a", encoding="utf-8")
        self._rows = dict(self._done_lines)  # what the output will hold: the rows kept and those this run writes
        self._skipped: list[dict] = []
        self.rate.start()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if self._file is None:
            return
        for record in prediction:
            line = json.dumps({**record, "generation": self.made_with}, ensure_ascii=False)
            self._file.write(line + "\n")
            self._rows[record["index"]] = line
            if record["finish"] == "skipped":
                self._skipped.append(record)
        self.rate.add(prediction)
        self._file.flush()
        os.fsync(self._file.fileno())

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        # the rows this run holds, in input order (whatever order batches finished in), not what the partial file
        # holds: nothing another process put there is claimed
        lines = [self._rows[i] for i in sorted(self._rows)]
        write_text(self.target, "".join(line + "\n" for line in lines))  # replaces an earlier output in one step
        self.partial.unlink()
        self._release()
        peak = (f", peak {torch.cuda.max_memory_allocated(pl_module.device) / 2**30:.1f} GiB"
                if pl_module.device.type == "cuda" else "")
        kept = f", {len(self._done_lines)} kept from the interrupted run" if self._done_lines else ""
        rank_zero_info(f"Wrote {len(lines)} predictions to {self.target} ({self.rate.rows} generated now: "
                       f"{self.rate}{peak}{kept}).")
        if self._skipped:
            rank_zero_info(f"{len(self._skipped)} of the {self.rate.rows} rows generated now were skipped, without "
                           f"an answer (finish 'skipped', their 'error' says why), e.g. row {self._skipped[0]['index']}"
                           f": {self._skipped[0].get('error')}")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            rows = len(self._rows)
            kept = f"; {self.target} is as it was" if self.target.exists() else ""
            if isinstance(exception, LitMistralError):  # the same command fails the same way: say so
                rank_zero_info(f"Predictions stopped: the {rows} finished rows are in {self.partial}{kept}. Once the "
                               "error below is fixed, --predictions.resume true keeps them and generates the rest.")
            elif rows:
                rank_zero_info(f"Predictions stopped: the {rows} finished rows are in {self.partial}{kept}. The same "
                               "command with --predictions.resume true generates the rest.")
            if not rows:  # nothing to resume: no file claims an interrupted run
                self.partial.unlink(missing_ok=True)
        self._release()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar as the CLI sets it up: with the epoch's total and time left on a run resumed
    mid-epoch, and with rows/s and generated tokens/s while predicting, counting rows written (a batch holds up to
    `max_rows` of them, and the continuous engine finishes rows of earlier batches)."""

    rows: int | None = None  # rows finished so far; None: the loader does not say how many it holds (batches counted)

    def on_train_start(self, trainer, pl_module) -> None:
        """On a mid-epoch resume Lightning skips `on_train_epoch_start` for the resumed epoch, where its bar takes the
        epoch's total and name, so the bar would count batches against no total and show no time left (Lightning
        issue 20603). Set them here as the uninterrupted run's bar had them, starting at the batches the interrupted
        run took, so that its rate and time left count only the batches this run trains on."""
        super().on_train_start(trainer, pl_module)
        loop = trainer.fit_loop
        if not loop.restarted_mid_epoch or self.total_train_batches == float("inf"):  # inf: a loader of unknown length
            return
        done = loop.epoch_loop.batch_progress.current.processed
        bar = self.train_progress_bar
        # Lightning's total at an epoch's start: its batches, or fewer if max_steps comes first (then counted from now)
        bar.total = min(trainer.num_training_batches, done + self.total_train_batches)
        bar.initial = bar.n = bar.last_print_n = done
        bar.set_description(f"Epoch {trainer.current_epoch}")  # and redraws

    def on_train_epoch_start(self, trainer, *args) -> None:
        if self.train_progress_bar is not None:  # Lightning's reset redraws the bar before it sets `initial` to 0
            self.train_progress_bar.initial = 0
        super().on_train_epoch_start(trainer, *args)

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self.rate = GenerationRate()
        self.rate.start()

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        if batch_idx == 0:
            loaders = trainer.predict_dataloaders
            loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
            batches = getattr(getattr(loader, "batch_sampler", None), "batches", None)  # the planned batches
            self.rows = None if batches is None else 0
            if batches is not None:
                self.predict_progress_bar.total = sum(map(len, batches))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.rows is None:
            super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        elif not self.predict_progress_bar.disable:
            self.rows += len(outputs)
            self.predict_progress_bar.n = self.rows
            self.predict_progress_bar.refresh()
        self.rate.add(outputs)
        rows, tokens = self.rate.per_second()
        self.predict_progress_bar.set_postfix(rows_per_s=f"{rows:.2f}", tokens_per_s=f"{tokens:.1f}")
