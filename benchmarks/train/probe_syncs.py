"""Where a training step makes the CPU wait for the GPU, taken inside the CLI a user runs:

    SYNCS_OUT=syncs.json python -m lit_mistral fit --config configs/qlora-fast.yaml ... \\
        --trainer.callbacks+=benchmarks.train.probe_syncs.SyncProbe

(run from the repository root, or with it on PYTHONPATH). From the start of batch SYNCS_START (default 3) to the end
of the run, torch's sync debug mode warns at each call that waits for the GPU (`.item()`, `bool()` of a GPU tensor,
a blocking copy, ...); each is recorded with the innermost frames of its Python stack, and SYNCS_OUT gets them
counted per step by stack. An empty list: nothing in those steps waits (explicit `synchronize()` calls of streams or
events are not counted by torch's mode)."""

import json
import os
import traceback
import warnings
from collections import Counter

import lightning as L
import torch


class SyncProbe(L.Callback):
    def __init__(self) -> None:
        self.start = int(os.environ.get("SYNCS_START", "3"))
        self.found: Counter = Counter()
        self.steps = 0
        self._shown = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.start and self._shown is None:
            self._shown = warnings.showwarning
            warnings.simplefilter("always")
            warnings.showwarning = self._record
            torch.cuda.set_sync_debug_mode("warn")
        if self._shown is not None:
            self.steps += 1

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return self._shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename]
        where = " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames[-6:][::-1])
        self.found[where] += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if self._shown is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._shown
        result = {"steps": self.steps, "waits_per_step": round(sum(self.found.values()) / max(self.steps, 1), 2),
                  "by_stack": [[n, where] for where, n in self.found.most_common(20)]}
        print(json.dumps(result), flush=True)
        out = os.environ.get("SYNCS_OUT")
        if out:
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
