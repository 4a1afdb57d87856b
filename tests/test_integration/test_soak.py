"""The soak benchmark runs end to end (briefly) and reports its keys; the real 10-minute run is a benchmark."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from monitor.soak import bench_soak, rss_mb, tree_rss_mb

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def test_rss_helpers() -> None:
    assert rss_mb(os.getpid()) > 10 and rss_mb(2**22 + 7) == 0.0
    assert tree_rss_mb(os.getpid(), set()) >= rss_mb(os.getpid())
    assert tree_rss_mb(os.getpid(), {os.getpid()}) == 0.0


def test_a_short_soak_reports_memory(stream_model: Path) -> None:
    r = bench_soak(str(stream_model), seconds=8, streams=2, rate=400, chunk=40, warmup_s=2)
    assert {"rss_start_mb", "rss_end_mb", "rss_max_mb", "seconds"} <= set(r)
    assert r["samples_scored"] > 0 and r["samples_sent"] >= r["samples_scored"]
    assert 0 < r["rss_start_mb"] <= r["rss_max_mb"] and r["rss_end_mb"] > 0 and r["seconds"] >= 8
