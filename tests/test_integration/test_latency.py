"""The latency benchmark runs end to end (briefly) on the real broker and reports what it claims to measure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from monitor.latency import _percentiles, bench_latency

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def test_percentiles_of_known_latencies() -> None:
    r = _percentiles(np.arange(1, 101, dtype=float))
    assert (r["p50_ms"], r["p99_ms"], r["max_ms"]) == (50.5, 99.01, 100.0)
    assert np.isnan(_percentiles(np.zeros(0))["p99_ms"])


def test_a_short_latency_run_measures_both_policies_and_the_overload(stream_model: Path) -> None:
    r = bench_latency(str(stream_model), streams=4, rate=200.0, seconds=4.0, max_batch=64, max_delay_ms=50.0,
                      target_ms=40.0, warmup_s=1.0, overload_s=2.0)
    assert {"p50_ms", "p95_ms", "p99_ms", "max_delay_ms", "batch_scoring_ms"} <= set(r)
    for run in (r, r["adaptive"]):
        assert run["caught_up"] and run["windows"] > 30  # 4 streams × 20 windows/s, less the join and warm-up
        assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"] <= run["max_ms"]
        # milliseconds, and no stall the run does not explain: an output the local broker left unacknowledged for
        # the sink's flush timeout (5 s) pauses the input (2 of 8 CI runs: max 5.8-6.0 s); the benchmark counts it
        # (commit_retries, with a warning) rather than pass it off as batching latency
        assert run["max_ms"] < 5000 or run["commit_retries"] > 0
        assert run["in_daemon_p99_ms"] <= run["p99_ms"] and run["batch_scoring_ms"] > 0
    assert sum("commit(s) put off" in w for w in r["warnings"]) == sum(bool(run["commit_retries"]) for run in (r, r["adaptive"]))
    for run in (r, r["adaptive"]):
        assert run["bound_ms"] == pytest.approx(50.0 + 2 * run["batch_scoring_ms"], abs=0.01)
        assert run["within_bound"] == (run["p99_ms"] <= run["bound_ms"])
    # waiting for a batch: the fixed policy gathers the windows of max_delay_ms (about 4 here), an idle adaptive
    # scorer takes them 4 ms after they come (measured: p50 37-41 ms vs 16-17 ms)
    assert r["mean_batch"] > r["adaptive"]["mean_batch"] and r["adaptive"]["p50_ms"] < r["p50_ms"]
    over = r["overload"]
    assert over["caught_up"] and over["max_pending_windows"] <= over["max_pending"] + 10  # + one record's windows
