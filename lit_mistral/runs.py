"""Where a run lives and what it starts from: the run folder (`lightning_logs/version_N`), claimed atomically by
the logger, and `--ckpt_path` resolved before anything loads (`last` to the newest last.ckpt and the run folder to
continue in, a .ckpt file checked, an adapter folder made the model's adapter).

Apart from `cli.py`, which wires the settings, subcommands and errors together, so that which folder a run writes
and which checkpoint it reads are decided in one place."""

import os
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lit_mistral.checkpointing import check_checkpoint_file, find_last_checkpoint
from lit_mistral.errors import LitMistralError
from lit_mistral.io import claim_numbered_folder
from lit_mistral.modeling.adapters import check_adapter_folder


class RunLogger(TensorBoardLogger):
    """Lightning's default logger (TensorBoard, `lightning_logs/version_N`), with the run folder claimed atomically:
    Lightning picks N by listing the folder, so two runs started together in one root both took `version_0` (one
    config.yaml overwritten, both curves in one folder); here the folder is created exclusively (`io.py`) and a run
    that finds N taken takes the next. Claimed when Lightning first asks for it, as the run sets up; a run that fails
    before it has logged or written anything but what setup writes (bad data, a failed load) removes it again, so a
    failed run leaves no empty `version_N`. With a `version` given (resuming a run, SLURM's job id) nothing is claimed
    or removed."""

    SETUP_FILES = ("config.yaml", "hparams.yaml", "events.out.tfevents.*")

    def __init__(self, save_dir, version: int | str | None = None, **kwargs) -> None:
        super().__init__(save_dir, version=version, **kwargs)
        self.given_version, self.claimed, self.logged = version, None, False

    @property
    def version(self) -> int | str:
        if self.given_version is not None or rank_zero_only.rank != 0:  # other processes get process 0's folder
            return super().version
        if self.claimed is None:
            self.claimed = claim_numbered_folder(self.root_dir, "version_")
        return self.claimed

    def log_metrics(self, metrics, step=None) -> None:
        self.logged = True
        super().log_metrics(metrics, step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status != "failed" or self.claimed is None or self.logged:
            return
        folder = Path(self.log_dir)
        if folder.is_dir() and all(any(fnmatch(p.name, name) for name in self.SETUP_FILES) for p in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class CkptPath:
    """What `--ckpt_path` turned out to be; all None without one."""

    run: Path | None = None  # the run folder of the checkpoint `last` found: fit continues in it
    record: dict | None = None  # what the .ckpt file says it was trained with
    adapter_key: str | None = None  # "<subcommand> --ckpt_path" when it gave an adapter folder


def resolve_ckpt_path(subcommand: str, config) -> CkptPath:
    """`--ckpt_path`: `last` becomes the newest last.ckpt under `--trainer.default_root_dir` (or one clear error:
    a subcommand never runs without the adapter it was asked for); a file is checked before Lightning or torch
    read it; an adapter folder becomes the model's adapter (validate, predict)."""
    found, ckpt = CkptPath(), config.get("ckpt_path")
    if ckpt is None:
        return found
    if ckpt == "last":
        root = config.trainer.get("default_root_dir") or os.getcwd()
        last = find_last_checkpoint(root)
        if last is None:
            fix = ("start without --ckpt_path, or set --trainer.default_root_dir to the earlier run's" if subcommand
                   == "fit" else "pass the `adapter` folder or a .ckpt file of a fit run, or set "
                   "--trainer.default_root_dir to the folder that fit ran in")
            raise LitMistralError(f"{subcommand} --ckpt_path last: no last.ckpt under "
                                  f"{Path(root) / 'lightning_logs'}/. Fix: {fix}.")
        config.ckpt_path = ckpt = str(last)
        found.run = last.parent.parent  # fit continues in that run's folder
    path = Path(ckpt)
    if not path.exists():
        raise LitMistralError(f"{subcommand} --ckpt_path: {ckpt!r} does not exist. Fix: check the path"
                              + (", or use 'last'." if subcommand == "fit" else "."))
    if path.is_dir() and subcommand == "fit":
        raise LitMistralError(f"fit --ckpt_path: {ckpt!r} is a folder. Fix: to resume, pass a .ckpt file or "
                              "'last'; to start from a saved adapter, pass --model.adapter_path instead.")
    if path.is_dir() and subcommand in ("validate", "predict", "serve", "chat"):
        # a peft adapter folder: loaded onto the base as the model's adapter, not as a Lightning checkpoint; its
        # errors name the option it was given as
        found.adapter_key = f"{subcommand} --ckpt_path"
        check_adapter_folder(path, found.adapter_key)
        config.model.adapter_path, config.ckpt_path = ckpt, None
    elif path.is_file():
        found.record = check_checkpoint_file(path, f"{subcommand} --ckpt_path")
    return found
