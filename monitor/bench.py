"""``tsmon bench pipeline``: what the whole pipeline costs beyond its slowest stage, measured in one run.

Owns the pipeline benchmark. On one local broker and one topic of chunked messages it measures three
rates, each from its first record to its last (group joins excluded): a bare kafka-python
consume-and-parse loop, the scorer alone on the very windows those messages make (same model, same
``max_batch``), and the daemon end to end (broker → windows → scores → alerts acknowledged).
``ratio`` = pipeline / min(consume, scorer). The scorer alone is measured twice: with the daemon's scoring
threads (``daemon.torch_threads``, cores − 1 by default, since the consuming thread needs a core) — the
configuration the pipeline runs, used for ``ratio`` — and with every core, for ``ratio_vs_all_cores_scorer``.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import numpy as np
import torch

from monitor.batcher import Batcher
from monitor.broker import LocalBroker
from monitor.config import load_config
from monitor.records import SampleBlock, parse
from monitor.replay import messages
from monitor.scorer import Scorer, load_served
from monitor.windows import StreamWindows


def _streams(det: Any, n_streams: int, per_stream: int, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """ECG5000 test beats for a 140 × 1 model trained on them, else noisy sines of the model's shape."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_streams):
        if det.meta.get("training", {}).get("data", {}).get("source") == "ecg5000":
            from models.data import load_ecg5000

            beats = load_ecg5000("classic", 42).test
            values = beats[rng.integers(0, len(beats), per_stream // det.window + 1)].reshape(-1, det.channels)
        else:
            t = np.arange(per_stream)[:, None]
            values = np.sin(2 * np.pi * t / 50 + np.arange(det.channels)) + 0.05 * rng.normal(size=(per_stream,
                                                                                                    det.channels))
        ts = 1_700_000_000_000 + 8 * np.arange(per_stream, dtype="int64")
        out.append((f"bench-{s:03d}", ts, values[:per_stream].astype("float32")))
    return out


def _consume(bootstrap: str, topic: str, n_messages: int) -> tuple[float, list[SampleBlock]]:
    from kafka import KafkaConsumer

    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bench-{uuid.uuid4().hex[:8]}",
                      enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=2000,
                      heartbeat_interval_ms=500)
    blocks: list[SampleBlock] = []
    seen, t0, deadline = 0, None, time.monotonic() + 120
    while seen < n_messages and time.monotonic() < deadline:
        for records in c.poll(timeout_ms=200).values():
            t0 = t0 or time.monotonic()
            for r in records:
                b = parse(r.value, r.key)
                if isinstance(b, SampleBlock):
                    blocks.append(b)
                seen += 1
    dt = time.monotonic() - (t0 or time.monotonic())
    c.close()
    return dt, blocks


def _score_alone(scorer: Scorer, blocks: list[SampleBlock], max_batch: int) -> tuple[float, int]:
    served = next(iter(scorer.models.values()))
    wins: dict[str, StreamWindows] = {}
    batcher = Batcher(max_batch, 0.0)
    for b in blocks:
        sw = wins.setdefault(b.stream, StreamWindows(served.window, served.hop, served.channels))
        batcher.add(served.name, b.stream, sw.push(b.ts_ms, b.values))
    batches = batcher.ready(force=True)
    t0 = time.perf_counter()
    for batch in batches:
        scorer.score(batch)
    return time.perf_counter() - t0, sum(len(b) for b in batches)


def bench_pipeline(model: str, streams: int = 8, samples: int = 560_000, chunk: int = 140, max_batch: int = 256,
                   device: str = "auto", seed: int = 0) -> dict[str, Any]:
    from kafka import KafkaProducer

    from monitor.daemon import Daemon
    from monitor.topics import ensure_topics

    served = load_served("*", model, "bench", None, device)
    scorer = Scorer([served])
    data = _streams(served.detector, streams, samples // streams, seed)
    total = sum(len(ts) for _, ts, _ in data)
    with LocalBroker() as broker:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        ensure_topics(broker.bootstrap, {topic: 4, "tsmon.alerts": 1, "tsmon.dead-letter": 1})
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1, linger_ms=20, batch_size=256 * 1024)
        n_messages = 0
        for name, ts, values in data:
            for body, _n in messages(name, ts, values, chunk):
                producer.send(topic, key=name.encode(), value=body)
                n_messages += 1
        producer.flush()
        producer.close()
        consume_s, blocks = _consume(broker.bootstrap, topic, n_messages)
        all_cores = torch.get_num_threads()
        score_all_s, n_windows = min(_score_alone(scorer, blocks, max_batch) for _ in range(3))
        cfg = load_config(None, {"kafka.bootstrap_servers": broker.bootstrap, "kafka.topics": [topic],
                                 "kafka.group_id": f"bench-{uuid.uuid4().hex[:8]}", "kafka.session_timeout_ms": 2000,
                                 "kafka.heartbeat_interval_ms": 500, "batch.max_batch": max_batch,
                                 "daemon.device": device, "models": [{"pattern": "*", "path": model}]}, env={})
        daemon = Daemon(cfg, scorer=scorer)  # sets the daemon's scoring threads
        daemon_threads = torch.get_num_threads()
        score_s, _ = min(_score_alone(scorer, blocks, max_batch) for _ in range(3))
        done: list[float] = []

        def finished() -> bool:
            if daemon.metrics.total("tsmon_samples_total") >= total and daemon.processor.pending == 0:
                daemon.processor.sink.flush(30)  # alerts acknowledged: the end of the pipeline
                done.append(time.monotonic())
                return True
            return False

        cpu0, broker0 = time.process_time(), _cpu_seconds(broker.proc.pid if broker.proc else None)
        daemon.run(until=finished)
        cpu_s, broker_s = time.process_time() - cpu0, _cpu_seconds(broker.proc.pid if broker.proc else None) - broker0
        first = daemon.processor.first_record_at
        pipeline_s = done[0] - first if done and first else float("nan")
        torch.set_num_threads(all_cores)
    consume = total / consume_s
    scorer_rate = n_windows / score_s * served.hop
    scorer_all = n_windows / score_all_s * served.hop
    pipeline = total / pipeline_s
    warnings = []
    if pipeline > min(consume, scorer_rate) or scorer_all < 0.8 * scorer_rate:
        warnings.append("inconsistent figures (a stage faster than the pipeline allows, or more threads slower "
                        "than one): the machine was busy with something else; run again on a quiet machine")
    if pipeline_s < 1.0:
        warnings.append(f"the pipeline ran only {pipeline_s:.2f} s: use more --samples for a stable figure")
    return {
        "warnings": warnings,
        "samples": total, "messages": n_messages, "chunk": chunk, "streams": streams, "windows": n_windows,
        "max_batch": max_batch, "device": str(served.detector.device), "model": served.detector.kind,
        "consume_samples_per_s": round(consume), "scorer_samples_per_s": round(scorer_rate),
        "pipeline_samples_per_s": round(pipeline), "ratio": round(pipeline / min(consume, scorer_rate), 3),
        "scoring_threads": daemon_threads, "scorer_all_cores_samples_per_s": round(scorer_all),
        "all_cores": all_cores, "ratio_vs_all_cores_scorer": round(pipeline / min(consume, scorer_all), 3),
        "alerts_published": int(daemon.metrics.total("tsmon_alert_messages_total")),
        # CPU use while the daemon ran (includes its group join): near cores × wall means CPU-bound
        "daemon_cpu_s": round(cpu_s, 2), "broker_cpu_s": round(broker_s, 2), "cores": os.cpu_count(),
        "pipeline_wall_s": round(pipeline_s, 2),
    }


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of another process (Linux /proc), 0 where unknown."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0
