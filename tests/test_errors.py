"""The one exception users see: problems collected into one message, what a run that failed midway tells the user
(and its exit status), and the message for a checkpoint that cannot be read."""

import argparse

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_mistral.errors import (
    SIGINT_EXIT_STATUS,
    SIGTERM_EXIT_STATUS,
    LitMistralError,
    failure_message,
    raise_problems,
    unreadable,
)


def test_raise_problems_lists_each_then_the_fix_and_counts_the_rest():
    raise_problems([], "Fix: nothing.")  # no problems: no error
    with pytest.raises(LitMistralError) as one:
        raise_problems(["a.jsonl:2: field 'response' is missing"], "Fix: correct it.")
    assert str(one.value) == "1 problem found:\n  a.jsonl:2: field 'response' is missing\nFix: correct it."
    with pytest.raises(LitMistralError) as many:
        raise_problems([f"line {i}" for i in range(23)], "Fix: correct them.", limit=2)
    assert str(many.value) == "23 problems found:\n  line 0\n  line 1\n  ... and 21 more\nFix: correct them."


def test_exit_statuses_are_the_shells():
    assert (SIGTERM_EXIT_STATUS, SIGINT_EXIT_STATUS) == (143, 130)


@pytest.mark.parametrize("subcommand,advice", [
    ("fit", "A fit run saved last.ckpt on the way out (see the line above): run the same command with --ckpt_path "
            "last to continue."),
    ("predict", "run the same command with --predictions.resume true to generate the rest."),
    ("validate", "Validation stopped before its end and wrote nothing: run the same command again."),
])
def test_sigterm_names_what_to_run_next(subcommand, advice):
    message, status = failure_message(SIGTERMException(), subcommand)
    assert message.startswith("stopped by SIGTERM. ") and message.endswith(advice)
    assert status == 143
    assert failure_message(SIGTERMException(), "export") == ("stopped by SIGTERM.", 143)  # nothing to resume


def test_ctrl_c_as_python_raises_it_and_as_lightning_reraises_it():
    fit, status = failure_message(KeyboardInterrupt(), "fit")
    assert status == 130 and fit.startswith("interrupted (Ctrl+C). The checkpoints written so far are intact")
    try:  # Lightning catches KeyboardInterrupt and exits: a SystemExit whose context is the interrupt
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemExit(1) from None
    except SystemExit as exit_:
        lightning = exit_
    predict, status = failure_message(lightning, "predict")
    assert status == 130 and "--predictions.resume true" in predict
    assert failure_message(SystemExit(2), "fit") is None  # a plain exit (a usage error) is not an interrupt
    assert failure_message(KeyboardInterrupt(), None) == ("interrupted (Ctrl+C).", 130)


def test_out_of_memory_quotes_the_first_line_and_lists_the_settings_that_lower_it():
    message, status = failure_message(torch.OutOfMemoryError("CUDA out of memory. " + "x" * 300 + "\nsecond line"))
    assert status == 1
    first = f"CUDA out of memory. {'x' * 180}"  # the first line, cut at 200 characters
    assert message.startswith(f"error: out of GPU memory ({first}). Fix: leave the memory settings to the plan")
    for lever in ("keep_dequantized false", "checkpoint_layers", "offload_layers", "micro_batch_tokens",
                  "memory_budget_gib", "--data.max_tokens", "--data.max_length"):
        assert lever in message, lever
    assert "second line" not in message and message.endswith("No checkpoint was written yet.")
    empty, _ = failure_message(torch.OutOfMemoryError(""))
    assert empty.startswith("error: out of GPU memory (torch.OutOfMemoryError). Fix:")


def test_other_failures_keep_their_traceback():
    assert failure_message(ValueError("a bug"), "fit") is None
    assert failure_message(LitMistralError("bad input"), "fit") is None  # the CLI prints those itself


def test_unreadable_checkpoints_say_why_and_what_to_pass(tmp_path):
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"hparams": argparse.Namespace(lr=1.0)}, pickled)
    with pytest.raises(Exception) as refused:
        torch.load(pickled, weights_only=True)
    assert str(unreadable(pickled, refused.value)) == (
        f"{pickled}: holds pickled Python objects (argparse.Namespace), not just tensors; lit_mistral does not load "
        "them, because unpickling can run any code. Fix: use a checkpoint written by a lit_mistral fit run, or an "
        "adapter folder (safetensors).")
    cut = tmp_path / "cut.ckpt"
    torch.save({"w": torch.zeros(4)}, tmp_path / "whole.ckpt")
    cut.write_bytes((tmp_path / "whole.ckpt").read_bytes()[:100])
    with pytest.raises(Exception) as truncated:
        torch.load(cut, weights_only=True)
    message = str(unreadable(cut, truncated.value))
    reason = f"{type(truncated.value).__name__}: {str(truncated.value).split('. ')[0][:200]}"
    assert message == (f"{cut}: not a complete checkpoint ({reason}). Fix: pass another one; a run's checkpoints/ "
                       "folder keeps the last complete ones.")
    assert str(unreadable("x.ckpt", EOFError("Ran out of input. Later words."))) == (
        "x.ckpt: not a complete checkpoint (EOFError: Ran out of input). Fix: pass another one; a run's checkpoints/ "
        "folder keeps the last complete ones.")
