"""Writing outputs whole or not at all: a reader never sees a half-written adapter, export, checkpoint, report or
cache entry. Checking, before anything runs, that an output path can be written: of the right kind, in a folder
that exists and takes new files. And reading a file of tensors that `torch.save` wrote without unpickling objects."""

import fcntl
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lit_mistral.errors import LitMistralError, unreadable


def unwritable(folder: str | os.PathLike) -> str | None:
    """Why no file can be created in the existing folder `folder`, or None. Found by creating (and removing) one:
    permission bits do not tell (root ignores them; a read-only filesystem does not show in them)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".lit_mistral-probe-", dir=folder)
    except OSError as err:
        return err.strerror or str(err)
    os.close(fd)
    os.unlink(probe)
    return None


def claim_numbered_folder(parent: str | os.PathLike, prefix: str) -> int:
    """Create `parent/<prefix>N` for the next free N (one past the highest there) and return N. Creating it is the
    claim: of several processes that try the same N at once, `os.mkdir` succeeds for one, and the others take the
    next number."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    numbers = [p.name[len(prefix):] for p in parent.iterdir() if p.name.startswith(prefix)]
    n = max((int(s) for s in numbers if s.isdigit()), default=-1) + 1
    while True:
        try:
            (parent / f"{prefix}{n}").mkdir()
            return n
        except FileExistsError:
            n += 1


class OutputLock:
    """An exclusive claim on writing `path`, held until `release()`: an `flock` on `<path>.lock`, taken without
    waiting, so that a second run writing the same output is refused before it does anything, instead of the two
    interleaving their rows and removing each other's files. The lock is the kernel's: it ends with the process,
    killed included, so a lock file left behind claims nothing. `key` names the option in the error."""

    def __init__(self, path: str | os.PathLike, key: str) -> None:
        self.path = Path(f"{path}.lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise LitMistralError(
                    f"{key}: another run is writing {str(path)!r} (process {holder or '?'} holds "
                    f"{str(self.path)!r}). Fix: wait for it to finish, or choose another --{key}.") from None
            try:  # the run that held it may have removed the file meanwhile (`release`): lock the one that is there
                current = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd: int | None = fd

    def release(self) -> None:
        """Remove the lock file and end the claim (a second call does nothing)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still held: no other run locks a file about to vanish
        os.close(self.fd)
        self.fd = None


def check_output_file(path: str | os.PathLike, key: str, example: str) -> Path:
    """`path` as a file that can be written (created, or replaced by renaming a new one onto it), or one clear
    error naming `key`: it is a folder (`example`: a file name to suggest in it), or its folder is missing, not a
    folder, or takes no new files."""
    path = Path(path)
    if path.is_dir():
        raise LitMistralError(f"{key}: {str(path)!r} is a folder. Fix: give the path of a file, e.g. "
                              f"{str(path / example)!r}.")
    folder = path.parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise LitMistralError(f"{key}: the folder {str(folder)!r} {what}. Fix: create it or choose another path.")
    why = unwritable(folder)
    if why is not None:
        raise LitMistralError(f"{key}: the folder {str(folder)!r} is not writable ({why}). Fix: choose another path.")
    return path


def check_output_folder(path: str | os.PathLike, key: str) -> Path:
    """`path` as a folder that can be written into (made with its parents where missing), or one clear error naming
    `key`: it, or the nearest of its parents that exists, is a file or takes no new files."""
    path = existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f" (its parent {str(existing)!r} is a file)"
        raise LitMistralError(f"{key}: {str(path)!r} cannot be a folder{where}: a file is in the way. Fix: choose "
                              "another folder.")
    why = unwritable(existing)
    if why is not None:
        raise LitMistralError(f"{key}: {str(existing)!r} is not writable ({why}). Fix: choose another folder.")
    return path


def publish(tmp: str | os.PathLike, target: str | os.PathLike, folder: bool = False) -> None:
    """Give `tmp` (made private by mkstemp/mkdtemp) the permissions of an ordinary output, then rename it to
    `target` in one step (an existing file is replaced; folders: see `writing_folder`). A folder's contents get them
    too: safetensors writes its files private (0600), so the weights of an adapter or an export would be the one
    file of the folder that the rest of a team cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if folder else 0o666) & ~umask)
    if folder:
        for parent, folders, files in os.walk(tmp):
            for name in folders:
                os.chmod(os.path.join(parent, name), 0o777 & ~umask)
            for name in files:
                path = os.path.join(parent, name)
                if not os.path.islink(path):
                    os.chmod(path, (0o777 if os.stat(path).st_mode & 0o100 else 0o666) & ~umask)
    os.replace(tmp, target)


@contextmanager
def writing_folder(target: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`. When the block succeeds it becomes `target` (replacing an
    earlier one, which is kept until the rename is done); when the block fails, `target` is left as it was.
    `keep_existing`: a `target` that appeared meanwhile wins and the new folder is dropped (a cache entry that
    several processes may build at once: none swaps out the one another is already reading)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        yield tmp
        if keep_existing and target.exists():
            return
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        publish(tmp, target, folder=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def writing_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Yield an open temporary file next to `path`; when the block succeeds it is flushed to disk and becomes `path`
    (replacing an earlier one); when it fails, `path` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` under a temporary name first: `path` holds the old text or the new, never a part."""
    with writing_file(path) as f:
        f.write(text)
    return Path(path)


def check_torch_file(path: str | os.PathLike, key: str, fix: str):
    """`path` (a file of tensors that `torch.save` wrote) as lit_mistral loads such files, weights-only, its tensors
    mapped rather than read; or one clear error naming `key`, the file and `fix`: not a whole zip archive (empty,
    cut short, another kind of file), or holding pickled objects (never unpickled)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        what = "is empty" if path.stat().st_size == 0 else (
            "is not a whole zip archive, as torch.save writes (cut short, or another kind of file)")
        raise LitMistralError(f"{key}: {path} {what}, so not a checkpoint. {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickled objects, a damaged archive: torch raises many kinds
        raise unreadable(path, err) from None
