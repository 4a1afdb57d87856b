"""Files tsmon writes and reads by name: written whole or not at all, read only when they are what they claim.

Owns :func:`replace_atomically` (a temporary sibling, flushed to disk, renamed over the target: a full disk or a
kill left a truncated scores CSV or PNG in place of the good one, which still parsed), :func:`locked_dir` (one
writer of a directory at a time: two trainings to one ``--out`` swapped each other's files) and
:func:`regular_file` (a FIFO given as a config file blocked for ever, ``/dev/zero`` read until memory ran out).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from models.errors import DataError, TsmonError


def replace_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Have ``write`` fill a temporary file beside ``path`` (same name after a prefix, so suffixes that choose a
    format or a compression still do), flush it to disk and rename it over ``path``; on any failure the
    temporary file is removed and ``path`` is as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{secrets.token_hex(4)}-{target.name}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_bytes_atomically(path: str | Path, data: bytes) -> Path:
    return replace_atomically(path, lambda tmp: tmp.write_bytes(data))


@contextlib.contextmanager
def locked_dir(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the directory ``path`` (advisory, on the directory itself: nothing is added to it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def regular_file(path: str | Path, what: str, max_bytes: int, error: type[TsmonError] = DataError) -> Path:
    """``path`` if it is a regular file of at most ``max_bytes``; else ``error`` naming ``what`` and why (opened
    first, a FIFO blocked the command for ever and ``/dev/zero`` was read until memory ran out)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise error(f"{what} {p} not found") from None
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {p} is not a regular file")
    if st.st_size > max_bytes:
        raise error(f"{what} {p} is {st.st_size} bytes, over the {max_bytes} this reads")
    return p


def check_writable(path: str | Path, what: str, directory: bool = False) -> None:
    """Before the work, not after it: ``path`` can be written as a ``what`` — a file (not an existing directory) or,
    with ``directory``, a directory (not an existing file) — in a folder this process may write to. Training
    found an unwritable --out only once its minutes of work were done."""
    p = Path(path)
    if p.exists() and p.is_dir() != directory:
        raise DataError(f"{what} {p} is {'a file' if directory else 'a directory'}, not {'a directory' if directory else 'a file'}")
    folder = p if directory and p.is_dir() else p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the first one that exists: the rest would be created
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"cannot write {what} {p}: {folder} is not a folder this process may write to")
