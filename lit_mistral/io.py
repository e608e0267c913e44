"""Writing outputs whole or not at all: a reader never sees a half-written adapter, export, checkpoint, report or
cache entry."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def publish(tmp: str | os.PathLike, target: str | os.PathLike, folder: bool = False) -> None:
    """Give `tmp` (made private by mkstemp/mkdtemp) the permissions of an ordinary output, then rename it to
    `target` in one step (an existing file is replaced; folders: see `writing_folder`)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if folder else 0o666) & ~umask)
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
