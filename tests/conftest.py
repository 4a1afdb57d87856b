"""Shared fixtures: small synthetic series and trained artifacts (module-scoped where training is slow)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def synthetic_series(n: int = 4000, channels: int = 2, period: int = 40, anomalies: tuple[int, ...] = (2600, 3300),
                     seed: int = 0) -> pd.DataFrame:
    """Sines plus noise, with a spike burst of 30 samples at each index in ``anomalies`` (labelled)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    data: dict[str, object] = {"timestamp": pd.date_range("2024-01-01", periods=n, freq="s")}
    label = np.zeros(n, dtype=int)
    for a in anomalies:
        label[a : a + 30] = 1
    for c in range(channels):
        v = np.sin(2 * np.pi * t / period + c) + 0.05 * rng.normal(size=n)
        for a in anomalies:
            v[a : a + 30] += 3.0 * (c == 0)  # only channel 0 is perturbed
        data[f"ch{c}"] = v
    data["label"] = label
    return pd.DataFrame(data)


@pytest.fixture(scope="session")
def series_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "series.csv"
    synthetic_series().to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def broker():
    """A real Kafka-protocol broker (Tansu) on a free loopback port for the whole session (one per test worker
    process under pytest-xdist), stopped by PID."""
    from monitor.broker import LocalBroker

    b = LocalBroker()
    b.start()
    yield b
    b.stop()


@pytest.fixture
def topic(broker) -> str:
    """A fresh uuid-named topic (4 partitions) so tests never see each other's data."""
    import uuid

    from kafka.admin import KafkaAdminClient, NewTopic

    name = f"t-{uuid.uuid4().hex[:12]}"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(name, num_partitions=4, replication_factor=1)])
    finally:
        admin.close()
    return name


# ---- the streaming pipeline: a small model and helpers shared by the integration tests ------------------------------

STREAM_WINDOW, STREAM_HOP, STREAM_PERIOD_MS = 40, 10, 10


def sine_stream(n: int, bursts: tuple[int, ...] = (), seed: int = 0, noise: float = 0.05,
                start_ms: int = 1_700_000_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps and 2-channel sines (period 40 samples) with +3 bursts of 30 samples on channel 0."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    values = np.stack([np.sin(2 * np.pi * t / 40 + c) for c in range(2)], axis=1)
    values += noise * rng.normal(size=values.shape)
    for b in bursts:
        values[b : b + 30, 0] += 3.0
    return start_ms + STREAM_PERIOD_MS * t.astype("int64"), values.astype("float32")


@pytest.fixture(scope="session")
def stream_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PCA artifact for 40-sample, 2-channel sine windows (hop 10); threshold = 1.5 × max validation error,
    so clean data essentially never crosses it while +3 bursts always do."""
    from models import artifact
    from models.data import Series, series_dataset
    from models.detector import Threshold
    from models.train import TrainConfig
    from models.workflow import train_detector

    _, values = sine_stream(6000, seed=1)
    ds = series_dataset(Series(values, ["ch0", "ch1"]), STREAM_WINDOW, STREAM_HOP, train_fraction=0.9)
    det, training = train_detector(ds, "pca", {}, TrainConfig(epochs=1, seed=0, device="cpu"))
    det.threshold = Threshold(1.0, 1.5, det.quantiles["max"] * 1.5)
    return artifact.save(det, tmp_path_factory.mktemp("stream-model") / "sine-pca", training)


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid``."""
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def running(pid: int) -> bool:
    """Is ``pid`` a live process (not a zombie)?"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def child_processes(proc: Any, timeout_s: float = 60.0) -> set[int]:
    """The processes ``proc`` started (its broker, once up): waited for up to ``timeout_s``."""
    deadline, kids = time.monotonic() + timeout_s, set()
    while not kids and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        kids = children(proc.pid)
    return kids


def kill_all(proc: Any, kids: set[int]) -> None:
    """A failing test leaves nothing running: ``proc`` and its children, by PID."""
    if proc.poll() is None:
        proc.kill()
    for k in kids:
        if running(k):
            os.kill(k, signal.SIGKILL)
