"""Where a run lives and what it starts from: two runs started together take a run folder each, a run that fails
before it starts leaves none, and `--ckpt_path` is resolved or refused before anything loads."""

from pathlib import Path

import pytest
from jsonargparse import Namespace

from lit_mistral.errors import LitMistralError
from lit_mistral.runs import CkptPath, RunLogger, resolve_ckpt_path


def test_two_runs_started_together_take_a_run_folder_each(tmp_path):
    """Lightning's logger picks version_N by listing the root: two runs that both ask before either has written
    anything both get version_0. The CLI's logger claims the folder as it names it."""
    from lightning.pytorch.loggers import TensorBoardLogger

    listing = [TensorBoardLogger(tmp_path / "lightning") for _ in range(2)]
    assert [logger.version for logger in listing] == [0, 0]  # what happened

    first, second = RunLogger(tmp_path), RunLogger(tmp_path)
    assert (first.log_dir, second.log_dir) == (str(tmp_path / "lightning_logs" / "version_0"),
                                               str(tmp_path / "lightning_logs" / "version_1"))
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    assert RunLogger(tmp_path, version=0).log_dir == first.log_dir  # resuming a run: its own folder, nothing claimed


def test_a_run_that_fails_before_it_starts_leaves_no_run_folder(tmp_path):
    failed, started, kept = RunLogger(tmp_path), RunLogger(tmp_path), RunLogger(tmp_path)
    for logger in (failed, started, kept):
        logger.experiment.add_text("setup", "x")  # what setup does: an events file
        (Path(logger.log_dir) / "config.yaml").write_text("trainer: {}\n")
    started.log_metrics({"train/loss": 1.0}, step=1)
    (Path(kept.log_dir) / "checkpoints").mkdir()
    for logger in (failed, started, kept):
        logger.finalize("failed")
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_1", "version_2"]
    RunLogger(tmp_path, version=1).finalize("failed")  # a resumed run's folder is never removed
    assert (tmp_path / "lightning_logs" / "version_1").is_dir()


def test_ckpt_path_is_resolved_or_refused_before_anything_loads(tmp_path):
    assert resolve_ckpt_path("predict", Namespace(ckpt_path=None)) == CkptPath()
    last = Namespace(ckpt_path="last", trainer=Namespace(default_root_dir=str(tmp_path)))
    with pytest.raises(LitMistralError,
                       match=r"predict --ckpt_path last: no last.ckpt under .*Fix: pass the `adapter`"):
        resolve_ckpt_path("predict", last)
    with pytest.raises(LitMistralError,
                       match=r"fit --ckpt_path: 'nowhere' does not exist. Fix: check the path, or use"):
        resolve_ckpt_path("fit", Namespace(ckpt_path="nowhere"))
    with pytest.raises(LitMistralError, match=r"fit --ckpt_path: .* is a folder. Fix: to resume, pass a .ckpt file"):
        resolve_ckpt_path("fit", Namespace(ckpt_path=str(tmp_path)))
