"""Callbacks around the training code, which knows nothing of them: telemetry (tokens/s per optimizer step, time to
first step, memory), the learning rate logged, and the adapter written at the end of fit. Predict's writer and
progress bar are in `predictions.py`."""

import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import LearningRateMonitor as LightningLearningRateMonitor
from lightning.pytorch.utilities import rank_zero_info

from lit_mistral.distributed import reduce_queued
from lit_mistral.lightning_internals import LR_MONITOR_STATS, on_the_cpu
from lit_mistral.modeling.adapters import save_adapter
from lit_mistral.step_scalars import StepScalars, log_at


class Telemetry(Callback):
    """What a run costs, logged from process 0 (tokens summed over processes):

    - `train/tokens_per_s`: non-pad tokens per second over the optimizer steps since the last log, every
      `log_every_n_steps` optimizer steps (so once per step under `accumulate_grad_batches`, not per batch);
    - `train/time_to_first_step_s`: from the start of fit (data set up, model not loaded yet) to the end of the first
      optimizer step: what a user waits before training really starts; the log line at the first step splits it
      (model built and set up; the loop's start: dataloader, memory probes; the first step itself);
    - on a GPU, `train/peak_mem_gib` (the most allocated so far), `train/recent_peak_mem_gib` (the most allocated
      since the last log: the steps alone, without the start's memory probes), `train/recent_peak_reserved_gib`
      (the most the allocator held over that time, its cache included: the gap is fragmentation),
      `train/model_mem_gib` (what the model takes before the first step: a 1/N share of the base under FSDP) and
      `train/load_peak_mem_gib` (the
      most it took while loading: the whole 4-bit base, unless `load_on` cpu under FSDP).

    Lightning's `ThroughputMonitor` counts samples per process and multiplies by the process count, which is wrong
    when processes get batches of different token counts (token budgets); here each process's tokens are summed.
    `last` keeps the latest figures for callers of fit in Python."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._started, self._load_peak, self._window = time.perf_counter(), None, None
            self._step, self._tokens, self._first_done, self._peak = None, 0, False, 0.0
            self._mark, self._windows = None, StepScalars()  # the window's start on the GPU; windows not read yet
            self._phases: dict[str, float] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self._phases["model built and set up"] = time.perf_counter()
        if pl_module.device.type == "cuda":  # the model is loaded and set up (sharded, under FSDP); nothing ran yet
            self._load_peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30

    def on_train_start(self, trainer, pl_module) -> None:
        self._step = trainer.global_step
        if self._load_peak is not None:
            self._log(trainer, {"train/model_mem_gib": torch.cuda.memory_allocated(pl_module.device) / 2**30,
                                "train/load_peak_mem_gib": self._load_peak}, trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._window is None:
            self._window = time.perf_counter()
            self._phases["the loop's start"] = self._window

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._tokens += batch["num_tokens"]
        if trainer.global_step == self._step:  # accumulating: no optimizer step yet
            return
        self._step = trainer.global_step
        if self._first_done and trainer.global_step % trainer.log_every_n_steps:
            return
        device = pl_module.device
        cuda = device.type == "cuda"
        if not self._first_done:
            if cuda:
                torch.cuda.synchronize()  # once: the wall-clock time a user waited
            now = time.perf_counter()
            self._first_done = True
            self._phases["the first step"] = now
            marks, spans = [self._started, *self._phases.values()], []
            for (name, _), before, after in zip(self._phases.items(), marks, marks[1:]):
                spans.append(f"{name} {after - before:.1f}s")
            rank_zero_info(f"Time to the first optimizer step: {now - self._started:.1f}s ({', '.join(spans)}).")
            metrics = {"train/time_to_first_step_s": now - self._started, **self._memory(device)}
            self._log(trainer, metrics, trainer.global_step)
            self._window, self._mark, self._tokens = now, self._event(cuda), 0
            return
        # every process reaches this line at the same step. On a GPU the window is timed by events on its clock and
        # read a step or so later (`StepScalars`): reading it now would make the CPU wait for the GPU
        tokens = torch.tensor(float(self._tokens))
        if trainer.world_size > 1:
            tokens = reduce_queued(tokens.pin_memory().to(device, non_blocking=True) if cuda else tokens, "sum")
        now, end = time.perf_counter(), self._event(cuda)
        meta = {"step": trainer.global_step, "start": (self._window, self._mark), "end": (now, end),
                "memory": self._memory(device)}
        self._windows.push(meta, device, tokens=tokens)
        self._window, self._mark, self._tokens = now, end, 0
        self._settle(trainer, self._windows.ready())

    def on_train_end(self, trainer, pl_module) -> None:
        self._settle(trainer, self._windows.flush())

    def _settle(self, trainer, windows: list) -> None:
        for meta, values in windows:
            (began, start), (ended, end) = meta["start"], meta["end"]
            seconds = start.elapsed_time(end) / 1000 if start is not None else ended - began
            self._log(trainer, {"train/tokens_per_s": values["tokens"] / seconds, **meta["memory"]}, meta["step"])

    @staticmethod
    def _event(cuda: bool) -> torch.cuda.Event | None:
        """A timing mark in the GPU's queue (None on the CPU, where the wall clock is the compute's)."""
        if not cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _memory(self, device: torch.device) -> dict[str, float]:
        """On a GPU, the peaks allocated since the last log and since the start (the allocator's own counts, on the
        CPU: no wait), the former then reset."""
        if device.type != "cuda":
            return {}
        recent = torch.cuda.max_memory_allocated(device) / 2**30
        held = torch.cuda.max_memory_reserved(device) / 2**30  # what the allocator held from the GPU, cache included
        self._peak = max(self._peak, recent)
        torch.cuda.reset_peak_memory_stats(device)
        return {"train/peak_mem_gib": self._peak, "train/recent_peak_mem_gib": recent,
                "train/recent_peak_reserved_gib": held}

    def _log(self, trainer, metrics: dict[str, float], step: int) -> None:
        """Log `metrics` at `step` from process 0 (LightningModule.log would repeat them at every later step)."""
        self.last.update(metrics)
        log_at(trainer, metrics, step)


class LearningRateMonitor(LightningLearningRateMonitor):
    """Lightning's, without a wait for the GPU at every step: it also puts each rate into `trainer.callback_metrics`
    as a tensor made on the training device, a blocking copy that makes the CPU wait for the work queued (found with
    `benchmarks/probe_syncs.py`). Here those tensors are made on the CPU; what is logged is the same."""

    def _extract_stats(self, trainer, interval: str) -> dict[str, float]:
        return getattr(super(), LR_MONITOR_STATS)(on_the_cpu(trainer), interval)


class SaveAdapter(Callback):
    """At the end of fit, writes the adapter in peft's format to `adapter/` in the run folder, from process 0."""

    def on_train_end(self, trainer, pl_module) -> None:
        # trainer.log_dir is a collective call under DDP: every process asks, process 0 writes
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "adapter"
        if trainer.is_global_zero:
            save_adapter(pl_module.model, pl_module.tokenizer, folder, pl_module.spec.base_source(),
                         sharded=pl_module.sharded)
            rank_zero_info(f"Saved the peft adapter to {folder}")
