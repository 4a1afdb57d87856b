"""Scoring backends: a thread and a process give the same errors; the choice; a bad model fails at start."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models.errors import ConfigError
from monitor.scorer import REGROW_AFTER, Scorer, load_served
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

    from models import train
    from monitor import daemon

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    cpu_max = tmp_path / "cpu.max"
    cases = {"200000 100000\n": 2, "150000 100000\n": 2, "50000 100000\n": 1, "max 100000\n": 64, "garbage\n": 64}
    for text, cpus in cases.items():
        cpu_max.write_text(text)
        assert train.usable_cpus(cpu_max) == cpus, text
    assert train.usable_cpus(tmp_path / "absent") == 64
    monkeypatch.setattr(train, "usable_cpus", lambda: 2)
    assert daemon.scoring_threads(None) == 1 and daemon.scoring_threads(5) == 5


def test_out_of_gpu_memory_scores_in_parts_that_fit(stream_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA out-of-memory error in a batch stopped the daemon, and every restart at the same batch: it is scored in
    halves down to what fits, and later batches keep to that size."""
    _, values = sine_stream(STREAM_WINDOW * 50, (500,), seed=7)
    windows = values.reshape(50, STREAM_WINDOW, 2)
    scorer = Scorer([load_served("*", stream_model, None, None, "cpu")])
    name = next(iter(scorer.models))
    exact = scorer.score_values(name, windows)
    assert [a.shape for a in scorer.score_values(name, windows[:0])] == [(0,), (0, 2)]  # no windows: none scored
    real, calls = scorer._score, []

    def small_gpu(model: str, v: np.ndarray, precision: str) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(v))
        if len(v) > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(model, v, precision)

    monkeypatch.setattr(scorer, "_score", small_gpu)
    for _ in range(2):  # the same scores, to float32 rounding: the BLAS kernel a batch size takes on this CPU (and
        got = scorer.score_values(name, windows)  # the torch threads) decides the matmul's blocking
        np.testing.assert_allclose(got[0], exact[0], rtol=1e-5)
        np.testing.assert_allclose(got[1], exact[1], rtol=1e-5)
    assert scorer.max_rows[name] == 6 and calls[-9:] == [6] * 8 + [2]  # the second batch went in parts at once
    for _ in range(REGROW_AFTER - 1):  # a while later, twice the size is tried again (and fails here)
        scorer.score_values(name, windows)
    assert scorer.max_rows[name] == 12
    np.testing.assert_allclose(scorer.score_values(name, windows)[0], exact[0], rtol=1e-5)
    assert scorer.max_rows[name] == 6 and calls[-3:] == [6, 6, 2]
    for _ in range(REGROW_AFTER):  # that failed: twice as long before the next try
        scorer.score_values(name, windows)
    assert scorer.max_rows[name] == 6
    for _ in range(REGROW_AFTER - 1):
        scorer.score_values(name, windows)
    assert scorer.max_rows[name] == 12
    monkeypatch.setattr(scorer, "_score", real)  # the memory is back: the full size again, in steps
    for _ in range(12 * REGROW_AFTER):
        scorer.score_values(name, windows)
    assert scorer.max_rows[name] >= len(windows)
    monkeypatch.setattr(scorer, "_score", lambda *_: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError):  # one window that does not fit: the daemon's scoring failure
        scorer.score_values(name, windows[:1])


def test_a_score_beyond_reduced_precision_is_scored_again_in_float32(stream_model: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Under float16 a window beyond its range (a 1e6 spike: 65 504 σ) scored NaN, which is never taken for normal
    but never pages either: such windows are scored again in float32."""
    _, values = sine_stream(STREAM_WINDOW * 4, seed=7)
    windows = values.reshape(4, STREAM_WINDOW, 2)
    windows[2, 5, 0] = 1e6
    scorer = Scorer([load_served("*", stream_model, None, None, "cpu")])
    name = next(iter(scorer.models))
    exact = scorer.score_values(name, windows)
    real = scorer._score

    def half(model: str, v: np.ndarray, precision: str) -> tuple[np.ndarray, np.ndarray]:
        w, c = real(model, v, "float32")
        if precision == "float16":  # what CUDA autocast does to a value past 65 504
            w[np.abs(v).max(axis=(1, 2)) > 65_504] = np.nan
        return w, c

    monkeypatch.setattr(scorer, "_score", half)
    got = scorer.score_values(name, windows, "float16")
    assert np.isfinite(got[0]).all() and got[0][2] == pytest.approx(exact[0][2], rel=1e-5)
    assert exact[0][2] > 1000 * exact[0][0]


def test_precision_on_cuda_is_what_it_says(stream_model: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN's LSTM runs in float16 under any autocast dtype: "bfloat16" served it with float16's range under the name
    of the other, and the log and /readyz said bfloat16."""
    from models import artifact
    from models.detector import Detector
    from models.registry import build

    pca = artifact.load(stream_model)
    lstm = build("lstm", {"window": STREAM_WINDOW, "channels": 2, "embedding": 4}).eval()
    artifact.save(Detector(lstm, pca.scaler, pca.threshold, pca.quantiles, pca.loss, pca.names, pca.hop),
                  tmp_path / "lstm", {})
    scorer = Scorer([load_served("*", stream_model, None, None, "cpu"),
                     load_served("ecg*", tmp_path / "lstm", None, None, "cpu")], precision="bfloat16")
    names = list(scorer.models)
    assert [scorer.precision_of(n) for n in names] == ["float32", "float32"]  # CPU
    for served in scorer.models.values():
        monkeypatch.setattr(served.detector, "device", torch.device("cuda"))
    assert [scorer.precision_of(n) for n in names] == ["bfloat16", "float16"]
    # float32 on CUDA is IEEE float32, not cuDNN's default TF32 for RNNs and convolutions
    flags = (torch.backends.cudnn.rnn, torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    before = [f.fp32_precision for f in flags]
    try:
        assert before[0] == "tf32"
        Scorer(list(scorer.models.values()))
        assert [f.fp32_precision for f in flags] == ["ieee"] * 3
    finally:
        for f, value in zip(flags, before, strict=True):
            f.fp32_precision = value
