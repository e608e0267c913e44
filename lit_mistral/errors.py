"""The one exception type users see: what is wrong, where (file, line or key), and how to fix it."""

from collections.abc import Sequence


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


def failure_message(err: BaseException) -> tuple[str, int] | None:
    """What to tell the user about a run that failed midway without bad input, and the exit status; None for
    anything else (it keeps its traceback)."""
    import torch
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lit_mistral.checkpoint import SIGTERM_EXIT_STATUS

    if isinstance(err, SIGTERMException):
        return ("stopped by SIGTERM. A fit run saved last.ckpt on the way out (see the line above): run the same "
                "command with --ckpt_path last to continue.", SIGTERM_EXIT_STATUS)
    if isinstance(err, torch.OutOfMemoryError):
        first = str(err).strip().splitlines()[0] if str(err).strip() else "torch.OutOfMemoryError"
        return (f"error: out of GPU memory ({first[:200]}). Fix: lower --data.batch_size (or --data.max_tokens "
                "with packing) and raise --trainer.accumulate_grad_batches to keep the examples per step; lower "
                "--data.max_length; set --model.gradient_checkpointing true (with --model.checkpoint_layers higher, "
                "or null for all layers); configs/qlora-24gb.yaml fits a 24 GB GPU. Checkpoints written so far are "
                "intact: add --ckpt_path last to continue.", 1)
    return None
