"""Scoring backends: a thread and a process give the same errors; the choice; a bad model fails at start."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest

from models.errors import ConfigError
from monitor.scorer import Scorer, load_served
from monitor.scoring import ProcessBackend, ThreadBackend, choose
from tests.conftest import STREAM_WINDOW, sine_stream


def test_thread_and_process_backends_agree(stream_model: Path) -> None:
    _, values = sine_stream(STREAM_WINDOW * 64, (500,), seed=7)
    windows = values.reshape(64, STREAM_WINDOW, 2)
    served = load_served("*", stream_model, None, None, "cpu")
    thread = ThreadBackend(Scorer([served]))
    process = ProcessBackend([("*", str(stream_model), None, None)], "cpu", 1)
    try:
        a = thread.submit(served.name, windows).result()
        b = process.submit(served.name, windows).result()
        assert process._pool.submit(gc.get_freeze_count).result() > 10_000  # torch and the model: never walked
    finally:
        thread.close()
        process.close()
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (64,) and a[1].shape == (64, 2) and b[2] > 0


def test_the_scoring_process_has_its_own_process_series(stream_model: Path) -> None:
    """On CPU the models, torch and the scoring live in the scoring process: the daemon's process series missed
    them (an operator's memory alert saw a fraction of the pod's memory)."""
    from prometheus_client import generate_latest

    from monitor.metrics import Metrics

    metrics = Metrics()
    process = ProcessBackend([("*", str(stream_model), None, None)], "cpu", 1)
    metrics.watch_scoring_process(lambda: process.pid)
    try:
        assert process.pid not in (None, os.getpid())
        process.submit(stream_model.name, np.zeros((8, STREAM_WINDOW, 2), "float32")).result()
        rows = {line.split()[0]: float(line.split()[1]) for line in generate_latest(metrics.registry).decode().splitlines()
                if line.startswith("tsmon_scoring_process_")}
        assert rows["tsmon_scoring_process_resident_memory_bytes"] > 50e6  # torch and the model
        assert rows["tsmon_scoring_process_cpu_seconds_total"] > 0
        assert "process_resident_memory_bytes" in generate_latest(metrics.registry).decode()  # the daemon's own too
    finally:
        process.close()
    assert process.pid is None
    assert "tsmon_scoring_process_" not in generate_latest(metrics.registry).decode()  # gone: nothing, not stale


def test_auto_is_a_process_on_cpu_and_a_thread_on_cuda() -> None:
    assert choose("auto", "cpu") == "process"
    assert choose("auto", "cuda:0") == "thread"
    assert choose("thread", "cpu") == "thread"


def test_a_model_the_scoring_process_cannot_load_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scoring process could not start"):
        ProcessBackend([("*", str(tmp_path / "missing"), None, None)], "cpu", 1, start_timeout_s=60)


def test_an_artifact_replaced_between_the_daemons_load_and_the_scoring_processs_is_refused(stream_model: Path) -> None:
    """The scoring process loads the artifacts again by path: one replaced in place meanwhile (``tsmon train
    --out`` over it, seconds at start) was scored by the new weights for the process's life while alerts and
    documents named the old version."""
    served = load_served("*", stream_model, None, None, "cpu")
    with pytest.raises(ConfigError, match=rf"artifact\(s\) replaced while the daemon started: {served.name} "
                                          rf"loaded as 0123456789ab, then as {served.version}"):
        ProcessBackend([("*", str(stream_model), None, None)], "cpu", 1, start_timeout_s=60,
                       versions={served.name: "0123456789ab"})


def test_scoring_threads_follow_a_container_cpu_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.cpu_count() counts the node's cores: under a 2-CPU limit on a 64-core node the daemon ran 63 threads."""
    import os

    from monitor import daemon

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    cpu_max = tmp_path / "cpu.max"
    cases = {"200000 100000\n": 2, "150000 100000\n": 2, "50000 100000\n": 1, "max 100000\n": 64, "garbage\n": 64}
    for text, cpus in cases.items():
        cpu_max.write_text(text)
        assert daemon.usable_cpus(cpu_max) == cpus, text
    assert daemon.usable_cpus(tmp_path / "absent") == 64
    monkeypatch.setattr(daemon, "usable_cpus", lambda: 2)
    assert daemon.scoring_threads(None) == 1 and daemon.scoring_threads(5) == 5
