"""Checkpoints that survive crashes and pre-emption: written whole or not at all, loaded without unpickling
arbitrary objects, one more written when the scheduler sends SIGTERM (predict and validate stop after the batch
instead), the random streams a resumed run needs to draw what the uninterrupted one would have, and finding a run's
newest checkpoint. Adapter checkpoints hold only what training changes, with the settings it was trained with."""

import errno
import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_mistral.distributed import gather_objects
from lit_mistral.errors import LitMistralError, raise_problems, unreadable
from lit_mistral.io import check_torch_file, publish
from lit_mistral.modeling.adapters import trainable_state
from lit_mistral.modeling.plan import Plan


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with two guarantees: a checkpoint file is either the complete new one or the
    previous one, never a truncated mix; and loading never unpickles anything but tensors and plain containers
    (`torch.load(weights_only=True)`, whatever the caller asks for).

    Written by hand because Lightning's `_atomic_save` goes through fsspec's local transaction, which puts the
    temporary file in the system temp folder and `shutil.move`s it: when that is another filesystem than the run
    folder (a local /tmp and a mounted volume, the usual setup on rented GPUs) the move is a copy into the target,
    and a crash or a full disk mid-copy leaves a truncated last.ckpt; nothing is fsynced either. Here the temporary
    file sits next to the target, is fsynced, and `os.replace` swaps it in."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote stores: fsspec's transaction
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # serialized in memory first, so that a failing torch.save (an unpicklable object) touches no file
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            _write_durably(fd, buffer.getbuffer())
            publish(tmp, path)
            _fsync_dir(path.parent)  # the rename itself survives a power cut
        except OSError as err:
            Path(tmp).unlink(missing_ok=True)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                fix = ("free space there, or set --trainer.default_root_dir to a disk with room (a checkpoint takes "
                       f"{buffer.tell() / 2**20:.1f} MiB)")
            else:
                fix = "check that the folder is writable, or set --trainer.default_root_dir elsewhere"
            previous = f" The previous {path.name} is intact." if path.exists() else ""
            raise LitMistralError(f"could not write the checkpoint {path}: {err.strerror or err}.{previous} "
                                  f"Fix: {fix}; then continue with --ckpt_path last.") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, *args: Any, weights_only: bool | None = None, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, weights_only=True, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as err:  # torch.load fails on a damaged file in many ways: zip errors, KeyError, EOFError
            raise unreadable(path, err) from None


def _write_durably(fd: int, data) -> None:
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SaveOnSigterm(Callback):
    """On SIGTERM (what schedulers and spot instances send before killing), Lightning lets the running step finish
    and raises `SIGTERMException`; this writes `last.ckpt` then, so `fit --ckpt_path last` continues from that very
    step instead of the last periodic checkpoint. (Logged metrics need nothing: Lightning flushes the loggers after
    every write, so a run killed without warning has logged every step up to where it died.)"""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit":
            # Ctrl+C lands anywhere, maybe amid a half-applied update: nothing is saved, the last checkpoint is named
            last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback is not None else ""
            rank_zero_info(f"Interrupted at step {trainer.global_step}: " + (
                f"the newest checkpoint is {last}." if last else "no checkpoint was written yet."))
        # Lightning raises SIGTERMException only between training steps (or validation batches), where the state
        # is consistent; any other exception (a crash, Ctrl+C) can land mid-step, amid a half-applied update
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        callback = trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        else:
            path = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # whole, as ModelCheckpoint's: resume needs all of it
        rank_zero_info(f"Received SIGTERM: saved {path} at step {trainer.global_step}. Continue with the same "
                       "command and --ckpt_path last.")


def stop_if_terminated(trainer) -> None:
    """Raise Lightning's `SIGTERMException` when a SIGTERM has arrived. Lightning checks between training steps and
    validation batches only; predict (before each batch) and validation's answers (between their batches) call this,
    so that a scheduler's SIGTERM stops them after the batch at hand instead of at the end."""
    if trainer.received_sigterm:
        raise SIGTERMException


class StopOnSigterm(Callback):
    """Stops predict after the batch at hand when a SIGTERM arrives (checked before the next one, once every callback
    has handled the last: its rows are written). The CLI then exits with status 143 and says how to resume."""

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        stop_if_terminated(trainer)


class RandomState(Callback):
    """Saves every process's random streams (torch, CUDA, Python) in checkpoints and restores them when `fit` resumes,
    so LoRA dropout draws the masks the uninterrupted run would have. Every process's: they drift apart (each draws
    dropout masks for batches of its own shapes); on another process count the streams of the first processes go on
    (none is then exactly as it would have been)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if pl_module.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(pl_module.device)
        checkpoint["rng"] = gather_objects(state, trainer.world_size)  # every process runs this hook

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = checkpoint.get("rng")
        if not states or trainer.state.fn != "fit":
            return
        state = states[trainer.global_rank % len(states)]
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and pl_module.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], pl_module.device)


def check_checkpoint_file(path: str | os.PathLike, key: str) -> dict:
    """One clear error, before Lightning or torch read `path` (a `--ckpt_path` file), when it is not a checkpoint
    lit_mistral can use: not a whole zip archive as `torch.save` writes (empty, cut short, another kind of file),
    holding pickled objects (never unpickled: `weights_only`), or not written by a lit_mistral fit. Reads the
    archive's index and pickled structure only (`mmap`), not the tensors. Returns the checkpoint's record of the
    settings it was trained with (`record_problems` compares it with a run's)."""
    fix = ("Fix: pass a .ckpt file of a lit_mistral fit run (its checkpoints/ folder keeps the last complete ones), "
           "or its adapter folder.")
    checkpoint = check_torch_file(path, key, fix)
    if not isinstance(checkpoint, dict) or "lit_mistral" not in checkpoint:
        raise LitMistralError(f"{key}: {path} was not written by lit_mistral (no adapter record). {fix}")
    return checkpoint["lit_mistral"]


def find_last_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest `last.ckpt` under `root/lightning_logs/version_*/checkpoints/`."""
    found = sorted(Path(root).glob("lightning_logs/version_*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def restore_adapter(module, path: str | os.PathLike) -> None:
    """Load the adapter weights of a lit_mistral checkpoint into `module` (built already), as Lightning's restore
    does for the model part (`on_load_checkpoint`, then the state dict), for callers without a Trainer loop: export.
    Loops, optimizer and callbacks are not restored."""
    checkpoint = AtomicCheckpointIO().load_checkpoint(path, map_location=module.device)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=False)


# -- the adapter checkpoint: only what training changes, with the settings it was trained with -----------------------


def adapter_record(spec) -> dict:
    """What a checkpoint's adapter must have been trained with to fit a model built from `spec` (`ModelSpec`)."""
    return {"name_or_path": spec.name_or_path, "gguf_file": spec.gguf_file, "quantize": spec.quantization.method,
            "lora": spec.lora.peft_kwargs()}


def record_problems(spec, saved: dict) -> list[str]:
    """How the settings a checkpoint was trained with (its `lit_mistral` record) differ from `spec`'s: known before
    the model is built, so the CLI checks them before loading anything."""
    ours = adapter_record(spec)
    keys = {"name_or_path": "name_or_path", "gguf_file": "gguf_file", "quantize": "quantization.method"}
    diffs = [f"model.{option}: checkpoint has {saved.get(k)!r}, this run has {ours[k]!r}"
             for k, option in keys.items() if saved.get(k) != ours[k]]
    options = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
               "bias": "bias"}
    return diffs + [f"model.lora.{options[k]}: checkpoint has {saved.get('lora', {}).get(k)!r}, this run has "
                    f"{v!r}" for k, v in ours["lora"].items() if saved.get("lora", {}).get(k) != v]


def save_adapter_checkpoint(module, checkpoint: dict) -> None:
    """Keep only `module`'s trainable (adapter) tensors in `checkpoint`, with its record: the settings they were
    trained with, the run's measured memory plan, and the count of skipped batches."""
    trainable = set(trainable_state(module))
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
    checkpoint["lit_mistral"] = adapter_record(module.spec)
    if module.memory_plan is not None and module.memory_plan.peak is not None:  # measured: reused on resume
        checkpoint["lit_mistral"]["memory_plan"] = module.memory_plan.record()
    checkpoint["skipped_batches"] = module.losses.skipped_batches


def load_adapter_checkpoint(module, checkpoint: dict) -> None:
    """Check that `checkpoint` was written for `module` (its settings, its adapter tensors) and take back the run's
    record: the skipped-batch count and the memory plan (not measured again). Lightning loads the tensors next."""
    saved = checkpoint.get("lit_mistral")
    if saved is None:
        raise LitMistralError("ckpt_path: this checkpoint was not written by lit_mistral (no adapter record). "
                              "Fix: pass a checkpoint from a lit_mistral fit run, or its adapter folder.")
    diffs = record_problems(module.spec, saved)
    state, expected = checkpoint["state_dict"], set(trainable_state(module))
    if not diffs and set(state) != expected:
        diffs.append(f"the checkpoint's {len(state)} adapter tensors do not match this model's {len(expected)}")
    if diffs:
        raise_problems(diffs, "Fix: run with the config the checkpoint was trained with (its run folder holds "
                              "config.yaml).")
    module.losses.skipped_batches = checkpoint.get("skipped_batches", 0)
    if saved.get("memory_plan") is not None:
        module.memory_plan = Plan.from_record(saved["memory_plan"])  # the run's choice, not measured again
