"""Files written whole or not at all, and read only when they are regular files of a sane size."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from models.errors import ConfigError, DataError
from models.files import regular_file, replace_atomically


def test_a_failed_write_leaves_the_good_file_and_no_temporary(tmp_path: Path) -> None:
    """A full disk while `tsmon score` wrote its CSV left a 64 KiB file cut mid-number in place of the good one —
    and its last row still parsed."""
    out = tmp_path / "scores.csv.gz"
    out.write_text("good\n")

    def half(tmp: Path) -> None:
        assert tmp.parent == out.parent and tmp.name.endswith(".csv.gz")  # suffixes kept: pandas picks gzip by them
        tmp.write_text("half a ro")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        replace_atomically(out, half)
    assert out.read_text() == "good\n" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv.gz"]
    replace_atomically(out, lambda tmp: tmp.write_text("new\n"))
    assert out.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv.gz"]


def test_only_a_regular_file_of_a_sane_size_is_read(tmp_path: Path) -> None:
    """A FIFO given as --config blocked the command for ever; /dev/zero was read until memory ran out."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * 2000)
    with pytest.raises(ConfigError, match="is not a regular file"):
        regular_file(fifo, "config file", 1000, ConfigError)
    with pytest.raises(DataError, match="is not a regular file"):
        regular_file("/dev/zero", "windows file", 1000)
    with pytest.raises(DataError, match="2000 bytes, over the 1000"):
        regular_file(big, "windows file", 1000)
    with pytest.raises(DataError, match="not found"):
        regular_file(tmp_path / "absent", "windows file", 1000)
    assert regular_file(big, "windows file", 2000) == big
