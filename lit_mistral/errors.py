"""The one exception type users see: what is wrong, where (file, line or key), and how to fix it."""

import os
import re
from collections.abc import Sequence

SIGTERM_EXIT_STATUS = 128 + 15  # what a shell reports for a process ended by SIGTERM: schedulers see "not finished"
SIGINT_EXIT_STATUS = 128 + 2  # and by Ctrl+C


class LitMistralError(Exception):
    """A bad input or setting. The CLI prints the message alone (no traceback) and exits with status 2."""


def raise_problems(problems: Sequence[str], fix: str, limit: int = 20) -> None:
    """Raise one `LitMistralError` listing every problem found (the first `limit` of them), then the fix."""
    if not problems:
        return
    shown = "\n".join(f"  {p}" for p in problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    noun = "problem" if len(problems) == 1 else "problems"
    raise LitMistralError(f"{len(problems)} {noun} found:\n{shown}{more}\n{fix}")


def failure_message(err: BaseException, subcommand: str | None = None, last_checkpoint: str | None = None,
                    plan: str | None = None) -> tuple[str, int] | None:
    """What to tell the user about a `subcommand` run that failed midway without bad input, and the exit status;
    None for anything else (it keeps its traceback). `last_checkpoint`: the newest checkpoint fit wrote, if any;
    `plan`: the memory plan's log line, if fit made one."""
    import torch
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(err, SIGTERMException):
        return (("stopped by SIGTERM. " + {
            "fit": "A fit run saved last.ckpt on the way out (see the line above): run the same command with "
                   "--ckpt_path last to continue.",
            "predict": "Predict stopped after the batch it was generating; the finished rows are kept (see the line "
                       "above): run the same command with --predictions.resume true to generate the rest.",
            "validate": "Validation stopped before its end and wrote nothing: run the same command again.",
        }.get(subcommand, "")).strip(), SIGTERM_EXIT_STATUS)
    # Ctrl+C: Lightning catches it in fit, validate and predict, cleans up and exits with status 1
    interrupted = isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit)
                                                         and isinstance(err.__context__, KeyboardInterrupt))
    if interrupted:
        return (("interrupted (Ctrl+C). " + {
            "fit": "The checkpoints written so far are intact (see the line above): run the same command with "
                   "--ckpt_path last to continue from the newest. (SIGTERM instead finishes the running step and "
                   "checkpoints it first.)",
            "predict": "Any finished rows are kept (see the line above): run the same command with "
                       "--predictions.resume true to generate the rest.",
        }.get(subcommand, "")).strip(), SIGINT_EXIT_STATUS)
    if isinstance(err, torch.OutOfMemoryError):
        first = str(err).strip().splitlines()[0] if str(err).strip() else "torch.OutOfMemoryError"
        resume = (f"Checkpoints written so far are intact: add --ckpt_path last ({last_checkpoint}) to continue."
                  if last_checkpoint else "No checkpoint was written yet.")
        made = f"The run's {plan[0].lower()}{plan[1:]} " if plan else ""
        return (f"error: out of GPU memory ({first[:200]}). {made}Fix: leave the memory settings to the plan, which "
                "chooses what fits at the start of fit (model.compute.gradient_checkpointing, checkpoint_layers, "
                "offload_layers, offload_inputs, micro_batch_tokens, keep_dequantized and dropout_masks all auto, "
                "the default), or "
                "set some of them by hand: --model.compute.keep_dequantized false (the 16-bit weights kept for "
                "backward), --model.compute.checkpoint_layers higher (null: every layer recomputes), "
                "--model.compute.offload_layers N (activations in CPU memory), --model.compute.offload_inputs true "
                "(the recomputing layers' inputs in CPU memory), --model.compute.micro_batch_tokens N "
                "(the same batches in parts); set --model.compute.memory_budget_gib below the GPU's memory (other "
                "processes on it, fragmentation: the plan keeps that much free of everything else); lower "
                "--data.max_tokens (or --data.batch_size) and raise --trainer.accumulate_grad_batches to keep the "
                f"examples per step, or lower --data.max_length. {resume}", 1)
    return None


def unreadable(path: str | os.PathLike, err: Exception) -> LitMistralError:
    """The error for a weights file that `torch.load(weights_only=True)` refused or could not read."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    if found:
        return LitMistralError(
            f"{path}: holds pickled Python objects ({found.group(1)}), not just tensors; lit_mistral does not load "
            "them, because unpickling can run any code. Fix: use a checkpoint written by a lit_mistral fit run, or "
            "an adapter folder (safetensors).")
    reason = f"{type(err).__name__}: {str(err).split('. ')[0][:200]}"
    return LitMistralError(f"{path}: not a complete checkpoint ({reason}). Fix: pass another one; a run's "
                           "checkpoints/ folder keeps the last complete ones.")
