"""Shared fixtures: small synthetic series and trained artifacts (module-scoped where training is slow)."""

from __future__ import annotations

from pathlib import Path

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
    """A real Kafka-protocol broker (Tansu) on a free loopback port for the whole session, stopped by PID."""
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
