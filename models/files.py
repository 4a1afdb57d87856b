"""Files tsmon writes and reads by name: written whole or not at all, read only when they are what they claim.

Owns :func:`replace_atomically` (written in a temporary folder beside the target, flushed to disk, renamed over it:
a full disk or a kill left a truncated scores CSV or PNG in place of the good one, which still parsed), :func:`locked_dir` (one
writer of a directory at a time: two trainings to one ``--out`` swapped each other's files) and
:func:`read_limited` (``/dev/zero`` given as a config file was read until memory ran out).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from models.errors import DataError, TsmonError, describe

TMP_PREFIX = ".tsmon-tmp-"  # the temporary folder of a write in progress, beside its target


def replace_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Have ``write`` fill a file of the same name in a temporary folder beside ``path`` (so a suffix that picks a
    format, a compression or a zip's entry name does as before), flush it to disk, give it the mode of the file it
    replaces and rename it over that file; on any failure the temporary folder goes and ``path`` is as it was. A
    symlink is written through (the file it names is replaced, not the link); a target that is not a regular file
    (``/dev/stdout``, a FIFO) is written directly."""
    given = Path(path)
    target = Path(os.path.realpath(given))
    if target.exists() and not target.is_file():
        try:
            write(target)
        except OSError as exc:  # /dev/full: "OSError: [Errno 28] No space left on device", no path
            raise DataError(f"cannot write {given}: {exc.strerror or describe(exc)}") from None
        return given
    folder = target.parent / f"{TMP_PREFIX}{secrets.token_hex(4)}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir()
    except OSError as exc:  # a folder the permission bits allow but the file system refuses (/proc): raw OSError
        raise DataError(f"cannot write {given}: {describe(exc)}") from None
    tmp = folder / target.name
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if target.exists():
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))  # a 0600 output stays 0600
        os.replace(tmp, target)
        _fsync_dir(target.parent)  # the rename itself survives a power loss
    except OSError as exc:  # a full disk: the temporary file's path, or none, was named
        raise DataError(f"cannot write {given}: {exc.strerror or describe(exc)}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return given


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot: the rename is done all the same
    finally:
        os.close(fd)


def leftovers(folder: Path) -> list[Path]:
    """Temporary folders of writes killed before their rename (a full weights file or CSV each)."""
    return [p for p in folder.glob(f"{TMP_PREFIX}*") if p.is_dir()]


def write_bytes_atomically(path: str | Path, data: bytes) -> Path:
    return replace_atomically(path, lambda tmp: tmp.write_bytes(data))


@contextlib.contextmanager
def locked_dir(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the directory ``path`` (advisory, on the directory itself: nothing is added to it).
    Held by another process, it is waited for, and that is said first: a save behind a stopped one (Ctrl-Z) waited
    without a word."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            structlog.get_logger("tsmon.files").warning(
                "waiting_for_another_save", folder=str(path), hint="another tsmon process is saving to this folder")
            with contextlib.suppress(OSError):  # as below
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks (some NFS): saves do not take turns there, but still happen
        yield
    finally:
        os.close(fd)  # releases the lock


def read_limited(path: str | Path, what: str, max_bytes: int, error: type[TsmonError] = DataError) -> bytes:
    """The bytes of ``path`` — a file, a pipe (``<(...)``, ``/dev/stdin``) — if there are at most ``max_bytes``; else
    ``error`` naming ``what`` and why (``/dev/zero`` as a config file was read until memory ran out)."""
    p = Path(path)
    try:
        if p.is_dir():
            raise error(f"{what} {p} is a directory, not a file")
        if p.is_file() and p.stat().st_size > max_bytes:
            raise error(f"{what} {p} is {p.stat().st_size} bytes, over the {max_bytes} this reads")
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise error(f"{what} {p} not found") from None
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise error(f"{what} {p} holds more than the {max_bytes} bytes this reads")
    return data


def check_writable(path: str | Path, what: str, directory: bool = False) -> None:
    """Before the work, not after it: ``path`` can be written as a ``what`` — a file (not an existing directory) or,
    with ``directory``, a directory (not an existing file) — in a folder this process may write to. Training
    found an unwritable --out only once its minutes of work were done."""
    p = Path(os.path.realpath(path))  # a symlink is written through: its target's folder counts (one not there yet too)
    if os.path.islink(path):
        try:  # but a loop passed this check, and the save after training failed
            os.path.realpath(path, strict=True)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise DataError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    if p.exists() and not p.is_dir() and not p.is_file():
        return  # /dev/stdout, a FIFO: written in place
    if p.exists() and p.is_dir() != directory:
        raise DataError(f"{what} {p} is {'a file' if directory else 'a directory'}, not {'a directory' if directory else 'a file'}")
    folder = p if directory and p.is_dir() else p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the first one that exists: the rest would be created
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"cannot write {what} {p}: {folder} is not a folder this process may write to")
    try:  # access() says yes for root anywhere, and for /proc or /sys, which refuse a new entry all the same
        os.rmdir(tempfile.mkdtemp(prefix=".tsmon-probe-", dir=folder))
    except OSError as exc:
        raise DataError(f"cannot write {what} {p}: {folder} refuses a new entry ({exc.strerror or exc})") from None
