"""Files written whole or not at all, and read only up to a size."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from models.errors import ConfigError, DataError
from models.files import check_writable, leftovers, locked_dir, read_limited, replace_atomically


def test_a_failed_write_leaves_the_good_file_and_no_temporary(tmp_path: Path) -> None:
    """A full disk while `tsmon score` wrote its CSV left a 64 KiB file cut mid-number in place of the good one —
    and its last row still parsed."""
    out = tmp_path / "scores.csv.gz"
    out.write_text("good\n")

    def half(tmp: Path) -> None:
        assert tmp.parent.parent == out.parent and tmp.name == out.name  # suffixes kept: pandas picks gzip by them
        tmp.write_text("half a ro")
        raise OSError(errno.ENOSPC, "No space left on device")

    # one line naming the file asked for (an OSError of the temporary file, or of none, was the message)
    with pytest.raises(DataError, match=f"^cannot write {out}: No space left on device$"):
        replace_atomically(out, half)
    assert out.read_text() == "good\n" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv.gz"]
    replace_atomically(out, lambda tmp: tmp.write_text("new\n"))
    assert out.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv.gz"]
    assert leftovers(tmp_path) == []


def test_a_full_device_written_in_place_is_a_one_line_error_naming_it() -> None:
    """`tsmon score --output /dev/full` ended in "OSError: [Errno 28] No space left on device", no path said."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    with pytest.raises(DataError, match="^cannot write /dev/full: No space left on device$"):
        replace_atomically("/dev/full", lambda tmp: pd.DataFrame({"a": range(10_000)}).to_csv(tmp, index=False))


def test_a_folder_the_file_system_refuses_is_a_one_line_error() -> None:
    """/proc passes the permission check (as root) and refuses the temporary folder: a raw OSError ended
    `tsmon score --output /proc/x.csv`, not the "cannot write" line."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    with pytest.raises(DataError, match="^cannot write /proc/tsmon-test.csv: "):
        replace_atomically("/proc/tsmon-test.csv", lambda tmp: tmp.write_text("x\n"))


def test_training_checks_that_its_out_folder_takes_a_new_entry_before_it_trains(tmp_path: Path) -> None:
    """/proc passes the access check (as root): `tsmon train --out /proc/x` trained first and then ended in a raw
    OSError. The check makes (and removes) a probe folder: nothing of it stays behind where it succeeds."""
    if not Path("/proc/self").is_dir() or os.geteuid() != 0:
        pytest.skip("needs Linux's /proc and root (for others access() already says no)")
    with pytest.raises(DataError, match=r"^cannot write artifact directory /proc/tsmon-x: /proc refuses a new entry"):
        check_writable("/proc/tsmon-x", "artifact directory", directory=True)
    check_writable(tmp_path / "art", "artifact directory", directory=True)
    assert list(tmp_path.iterdir()) == []


def test_a_save_behind_another_says_it_waits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A save into a folder another process holds (a training stopped with Ctrl-Z mid-save) waited without a word."""
    held = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # the other process (another open file: flock conflicts within one process too)
    inside = threading.Event()

    def save() -> None:
        with locked_dir(tmp_path):
            inside.set()

    saver = threading.Thread(target=save, daemon=True)
    saver.start()
    try:
        assert not inside.wait(0.5)  # it waits
        logged = capsys.readouterr()
        assert "waiting_for_another_save" in logged.out + logged.err and str(tmp_path) in logged.out + logged.err
    finally:
        os.close(held)  # released: the save goes on
    assert inside.wait(10)
    saver.join(10)
    with locked_dir(tmp_path):  # free: nothing said
        pass
    assert "waiting_for_another_save" not in "".join(capsys.readouterr())


def test_a_replaced_file_keeps_its_mode_its_links_and_its_archive_entry(tmp_path: Path) -> None:
    """Review: the link of `latest.csv -> v1.csv` was replaced by a file (v1 left stale), a 0600 output came back
    0644, and a zip held `.tmp-2049c8a4-scores.csv` instead of `scores.csv`; /dev/stdout would have been replaced."""
    real = tmp_path / "v1.csv"
    real.write_text("old\n")
    real.chmod(0o600)
    link = tmp_path / "latest.csv"
    link.symlink_to(real)
    replace_atomically(link, lambda tmp: tmp.write_text("new\n"))
    assert link.is_symlink() and real.read_text() == "new\n" and real.stat().st_mode & 0o777 == 0o600
    zipped = tmp_path / "scores.csv.zip"
    replace_atomically(zipped, lambda tmp: pd.DataFrame({"a": [1]}).to_csv(tmp, index=False))
    assert zipfile.ZipFile(zipped).namelist() == ["scores.csv"]
    replace_atomically("/dev/null", lambda tmp: tmp.write_text("gone\n"))  # not a regular file: written in place
    assert Path("/dev/null").is_char_device()


def test_only_so_many_bytes_are_read(tmp_path: Path) -> None:
    """/dev/zero as --config or --windows was read until memory ran out; a pipe (`<(...)`) is read as before."""
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * 2000)
    with pytest.raises(ConfigError, match="holds more than the 1000 bytes"):
        read_limited("/dev/zero", "config file", 1000, ConfigError)
    with pytest.raises(DataError, match="2000 bytes, over the 1000"):
        read_limited(big, "windows file", 1000)
    with pytest.raises(DataError, match="not found"):
        read_limited(tmp_path / "absent", "windows file", 1000)
    with pytest.raises(DataError, match="is a directory"):
        read_limited(tmp_path, "windows file", 1000)
    assert read_limited(big, "windows file", 2000) == b"#" * 2000
    r, w = os.pipe()
    os.write(w, b"[a]\n")
    os.close(w)
    assert read_limited(f"/dev/fd/{r}", "config file", 1000) == b"[a]\n"
    os.close(r)
