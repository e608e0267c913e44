"""Checkpoint files: written whole or not at all (a crash or a full disk mid-write leaves the previous one), and
never loaded by unpickling arbitrary objects."""

import errno
import os
import resource
import signal

import pytest
import torch

from lit_mistral.checkpointing import AtomicCheckpointIO
from lit_mistral.errors import LitMistralError


def state(value: float, n: int = 256 * 1024) -> dict:
    return {"state_dict": {"w": torch.full((n,), value)}, "global_step": int(value)}  # 1 MiB of weights


def temp_files(folder) -> list:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


class Opener:
    """Pickles into a call of `open(path, "w")`: unpickling it creates the file, which shows that it ran."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def file_size_limit():
    """Set a real file-size limit (RLIMIT_FSIZE): a write past it fails with EFBIG midway, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error instead of being killed

    def limit(n: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, file_size_limit):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint(state(1.0), path)
    size = path.stat().st_size
    file_size_limit(size // 2)  # the new file is cut off halfway through
    with pytest.raises(LitMistralError) as err:
        io_.save_checkpoint(state(2.0), path)
    file_size_limit(resource.RLIM_INFINITY)
    assert f"could not write the checkpoint {path}: File too large. The previous last.ckpt is intact." in str(err.value)
    assert "--ckpt_path last" in str(err.value)
    assert path.stat().st_size == size and temp_files(tmp_path) == []
    assert io_.load_checkpoint(path)["global_step"] == 1
    io_.save_checkpoint(state(3.0), path)  # and the next write goes through
    assert io_.load_checkpoint(path)["global_step"] == 3


def test_disk_full_names_the_fix(tmp_path, monkeypatch):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint(state(1.0), path)

    def full_disk(fd, data):
        with os.fdopen(fd, "wb") as f:
            f.write(data[: len(data) // 3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("lit_mistral.checkpointing._write_durably", full_disk)
    with pytest.raises(LitMistralError, match=r"No space left on device\. The previous last\.ckpt is intact\. Fix: "
                                              r"free space there, or set --trainer\.default_root_dir to a disk with "
                                              r"room \(a checkpoint takes 1\.0 MiB\); then continue with "
                                              r"--ckpt_path last"):
        io_.save_checkpoint(state(2.0), path)
    assert temp_files(tmp_path) == []
    assert io_.load_checkpoint(path)["global_step"] == 1


def test_leftover_of_a_killed_write_is_cleaned_up(tmp_path):
    (tmp_path / ".last.ckpt.x1y2.tmp").write_bytes(b"PK\x03\x04 cut off")  # a process died mid-write
    AtomicCheckpointIO().save_checkpoint(state(1.0), tmp_path / "last.ckpt")
    assert temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_pickled_objects_are_refused_even_when_asked_to_unpickle(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Opener(marker)}, path)
    for weights_only in (None, False):  # Lightning passes None; nothing may turn the check off
        with pytest.raises(LitMistralError, match=r"evil.ckpt: holds pickled Python objects \(io.open\), not just "
                                                  r"tensors; lit_mistral does not load them"):
            AtomicCheckpointIO().load_checkpoint(path, weights_only=weights_only)
    assert not marker.exists()


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save(state(1.0), path)
    path.write_bytes(path.read_bytes()[:5000])  # e.g. written by a tool without atomic writes, then killed
    with pytest.raises(LitMistralError, match=r"old.ckpt: not a complete checkpoint \(.*\)\. Fix: pass another "
                                              r"one; a run's checkpoints/ folder keeps the last complete ones"):
        AtomicCheckpointIO().load_checkpoint(path)


def damaged(kind: str, path, marker):
    """A .ckpt file as users end up with: empty, random bytes, cut short, holding pickled objects, or written by
    another tool."""
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random-bytes":
        path.write_bytes(bytes(range(256)) * 12)
    elif kind == "truncated":
        torch.save({**state(1.0), "lit_mistral": {}}, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "pickle":
        torch.save({"state_dict": {}, "lit_mistral": {}, "payload": Opener(marker)}, path)
    else:  # a plain torch checkpoint of another program
        torch.save(state(1.0), path)
    return path


@pytest.mark.parametrize("kind,message", [
    ("empty", r"x.ckpt is empty, so not a checkpoint\. Fix: pass a \.ckpt file of a lit_mistral fit run"),
    ("random-bytes", r"x.ckpt is not a whole zip archive, as torch.save writes \(cut short, or another kind of "
                     r"file\), so not a checkpoint\. Fix:"),
    ("truncated", r"x.ckpt is not a whole zip archive"),
    ("pickle", r"x.ckpt: holds pickled Python objects \(io.open\), not just tensors; lit_mistral does not load them"),
    ("foreign", r"x.ckpt was not written by lit_mistral \(no adapter record\)\. Fix:"),
])
def test_a_checkpoint_is_checked_before_anything_reads_it(tmp_path, kind, message):
    from lit_mistral.checkpointing import check_checkpoint_file

    marker = tmp_path / "code-ran"
    path = damaged(kind, tmp_path / "x.ckpt", marker)
    with pytest.raises(LitMistralError, match=message) as err:
        check_checkpoint_file(path, "predict --ckpt_path")
    assert "weights_only" not in str(err.value) and not marker.exists()  # no advice to turn the safe load off
