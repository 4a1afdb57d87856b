"""``tsmon bench soak``: the daemon's memory over a long run at a steady input rate.

Owns the soak benchmark. A local broker, the daemon in this process (its scoring process too), and a
producer thread sending every stream's samples in chunk messages at a fixed rate, with timestamps that
keep advancing. Resident memory (this process and its children, the broker excluded: its in-memory
storage grows with the data by design) is sampled every second; after a warm-up the start value is
compared with the end value: ``drift_pct`` and ``flat`` (|drift| <= 10 %).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from monitor.broker import LOCAL_GROUP, LocalBroker
from monitor.config import load_config
from monitor.replay import messages


def rss_mb(pid: int) -> float:
    """Resident memory of one process in MB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_rss_mb(root: int, exclude: set[int]) -> float:
    """``root`` and its descendants (Linux ``/proc``), minus ``exclude`` and theirs."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in exclude:
            continue
        total += rss_mb(pid)
        todo.extend(children.get(pid, []))
    return total


def _producer(bootstrap: str, topic: str, streams: int, rate: float, chunk: int, window: int, channels: int,
              stop: threading.Event, sent: list[int]) -> None:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20)
    rng = np.random.default_rng(0)
    period_ms = max(1, int(1000 / rate))
    t = np.arange(chunk)[:, None]
    t0, k, ts0 = time.monotonic(), 0, int(time.time() * 1000)
    while not stop.is_set():
        for s in range(streams):
            values = np.sin(2 * np.pi * (t + k * chunk) / window + np.arange(channels)) + 0.05 * rng.normal(
                size=(chunk, channels))
            ts = ts0 + period_ms * (k * chunk + np.arange(chunk, dtype="int64"))
            for body, n in messages(f"soak-{s:03d}", ts, values.astype("float32"), chunk):
                p.send(topic, key=f"soak-{s:03d}".encode(), value=body)
                sent[0] += n
        k += 1
        stop.wait(max(0.0, t0 + k * chunk / rate - time.monotonic()))
    p.flush()
    p.close()


def bench_soak(model: str, seconds: float = 600, streams: int = 8, rate: float = 1000, chunk: int = 140,
               warmup_s: float | None = None) -> dict[str, Any]:
    """Run the daemon for ``seconds`` at ``rate`` samples/s per stream; RSS figures in MB."""
    from monitor.daemon import Daemon
    from monitor.topics import ensure_topics

    warmup = min(60.0, seconds * 0.2) if warmup_s is None else warmup_s
    series: list[tuple[float, float]] = []
    sent = [0]
    with LocalBroker() as broker:
        topic = f"soak-{uuid.uuid4().hex[:8]}"
        ensure_topics(broker.bootstrap, {topic: 4})
        cfg = load_config(None, {"kafka.bootstrap_servers": broker.bootstrap, "kafka.topics": [topic],
                                 **LOCAL_GROUP,
                                 "http.port": 0, "calibrator.interval_s": 5.0,
                                 "models": [{"pattern": "*", "path": model}]}, env={})
        daemon = Daemon(cfg)
        det = daemon.scorer.models[cfg.models[0].display_name].detector
        stop = threading.Event()
        args = (broker.bootstrap, topic, streams, rate, chunk, det.window, det.channels, stop, sent)
        feeder = threading.Thread(target=_producer, args=args, name="soak-producer", daemon=True)
        exclude = {p.pid for p in (broker.proc, broker.store) if p is not None}

        def sample() -> None:
            t0 = time.monotonic()
            while not stop.wait(1.0):
                series.append((time.monotonic() - t0, tree_rss_mb(os.getpid(), exclude)))

        sampler = threading.Thread(target=sample, name="soak-rss", daemon=True)
        t_start = time.monotonic()
        feeder.start(), sampler.start()
        try:
            daemon.run(until=lambda: time.monotonic() - t_start >= seconds)
        finally:
            stop.set()
            feeder.join(10), sampler.join(5)
    after = [r for t, r in series if t >= warmup] or [r for _, r in series]
    start, end = after[0], float(np.median(after[-5:]))
    return {"rss_start_mb": round(start, 1), "rss_end_mb": round(end, 1), "rss_max_mb": round(max(after), 1),
            "seconds": round(time.monotonic() - t_start, 1), "warmup_s": warmup,
            "drift_pct": round(100 * (end - start) / start, 2), "flat": abs(end - start) <= 0.1 * start,
            "samples_sent": sent[0], "samples_scored": int(daemon.metrics.total("tsmon_samples_total")),
            "streams": streams, "rate_per_stream": rate, "rss_series_mb": [round(r, 1) for _, r in series]}
