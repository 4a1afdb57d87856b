"""``tsmon bench latency``: sample-to-decision latency at a fixed input rate, fixed vs adaptive batching.

Owns the latency benchmark. One local broker; a producer in a process of its own sends every stream's
samples in chunk messages at a fixed rate, each sample stamped with the wall-clock time it is due and each
message sent when its last sample is due (streams out of phase with each other, as independent sources are). The daemon runs in this process (its scoring process too, on
CPU) and every scored window's latency is the wall clock when its result was applied (alert state
updated, any alert handed to the sink) minus its last sample's timestamp: broker, fetch, parsing,
windowing, waiting for a batch, scoring and applying, everything between a sample existing and tsmon
deciding on it. Windows ending before the group is joined and ``warmup_s`` more (the input sent meanwhile
drains) are left out.

The same input is run twice on fresh topics and groups, in one run: with the fixed batching policy
(``max_batch`` / ``max_delay_ms``) and with the adaptive one (``latency_target_ms``). The fixed run's p99 is
compared with ``max_delay_ms + 2 × batch_scoring_ms`` (the median scoring time of one batch in that run),
the adaptive run's with its target and with the same bound (its own batches' scoring time). Each run also reports how often the input was paused because scoring
fell behind (back-pressure) and the most windows that waited. A third, short run (``overload_s``) makes
every sample end a window (hop 1), far beyond what the scorer takes, with ``max_pending`` = 4 batches: the
daemon stops taking records (and pauses its partitions if records make more windows than learnt) instead
of queueing (the backlog stays in the broker), which ``max_pending_windows`` and ``backpressure_pauses`` show.

The local broker (Tansu) holds every fetch for the consumer's ``fetch_max_wait_ms`` even when data is
waiting (measured: p50 138 ms at kafka-python's 500 ms, 29 ms at 100, 6 ms at 10), so the benchmark runs
the daemon at 10 ms (``--fetch-max-wait-ms``; the daemon's default stays 500); Apache Kafka answers a fetch
as soon as data arrives.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from typing import Any

import numpy as np

from monitor.broker import LOCAL_GROUP, LocalBroker
from monitor.config import load_config
from monitor.replay import messages


def _produce(bootstrap: str, topic: str, streams: list[tuple[str, np.ndarray]], rate: float, chunk: int,
             seconds: float, result: Any) -> None:
    """Send ``chunk`` samples per stream every ``chunk / rate`` s for ``seconds``; report samples and lateness."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)
    period_ms, step = 1000.0 / rate, chunk / rate
    t0, sent, late, k = time.time() + 0.2, 0, 0.0, 0
    while k * step < seconds:
        for s, (name, values) in enumerate(streams):  # streams are out of phase, as independent sources are
            due = t0 + (k + 1 + s / len(streams)) * step  # this chunk's last sample is due now
            wait = due - time.time()
            if wait > 0:
                time.sleep(wait)
            late = max(late, time.time() - due)
            ts = due * 1000 - period_ms * np.arange(chunk - 1, -1, -1)
            rows = values[(k * chunk + np.arange(chunk)) % len(values)]
            for body, n in messages(name, ts, rows, chunk):
                p.send(topic, key=name.encode(), value=body)
                sent += n
        k += 1
    p.flush()
    p.close()
    result.put({"samples": sent, "producer_late_ms": round(late * 1000, 2)})


def _percentiles(ms: np.ndarray) -> dict[str, float]:
    if not len(ms):
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2),
            "max_ms": round(float(ms.max()), 2)}


def _run(broker: LocalBroker, model: str, hop: int, streams: list[tuple[str, np.ndarray]], rate: float, chunk: int,
         seconds: float, warmup_s: float, batch: dict[str, Any], device: str, fetch_max_wait_ms: int) -> dict[str, Any]:
    """One daemon on a fresh topic and group, fed at ``rate`` for ``seconds``; latencies of its windows."""
    from monitor.daemon import Daemon
    from monitor.topics import ensure_topics

    topic = f"latency-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, {topic: 4, "tsmon.alerts": 1, "tsmon.dead-letter": 1})
    cfg = load_config(None, {"kafka.bootstrap_servers": broker.bootstrap, "kafka.topics": [topic],
                             "kafka.group_id": f"latency-{uuid.uuid4().hex[:8]}", **LOCAL_GROUP,
                             "kafka.fetch_max_wait_ms": fetch_max_wait_ms,
                             "daemon.device": device, "http.enabled": False,
                             **{f"batch.{k}": v for k, v in batch.items()},
                             "models": [{"pattern": "*", "path": model, "hop": hop}]}, env={})
    daemon = Daemon(cfg)
    lat: list[np.ndarray] = []
    inside: list[np.ndarray] = []  # from entering the batcher to the decision: what batching and scoring add
    scoring: list[float] = []
    sizes: list[int] = []
    start_ms = [float("inf")]

    def decided(b: Any, decided_ms: float, seconds_: float) -> None:
        keep = b.end_ts >= start_ms[0]
        lat.append(decided_ms - b.end_ts[keep])
        inside.append((time.monotonic() - b.enqueued[keep]) * 1000)
        scoring.append(seconds_)
        sizes.append(len(b))

    daemon.processor.on_decided = decided
    ctx = multiprocessing.get_context("spawn")
    result = ctx.Queue()
    producer = ctx.Process(target=_produce, args=(broker.bootstrap, topic, streams, rate, chunk, seconds, result),
                           daemon=True)
    produced: dict[str, Any] = {}
    deadline = [float("inf")]

    def until() -> bool:
        if start_ms[0] == float("inf") and daemon.source.assignment():  # joined: what came before drains first
            start_ms[0] = time.time() * 1000 + warmup_s * 1000
        if not produced and not producer.is_alive():
            produced.update(result.get() if not result.empty() else {"samples": 0, "failed": producer.exitcode})
            deadline[0] = time.monotonic() + 30
        if produced and daemon.caught_up(produced["samples"]):
            return True
        return time.monotonic() > deadline[0]

    producer.start()
    daemon.run(until=until)
    producer.join(10)
    ms = np.concatenate(lat) if lat else np.zeros(0)
    batch_ms = float(np.median(scoring) * 1000) if scoring else float("nan")
    queued = np.concatenate(inside) if inside else np.zeros(0)
    before = ms - queued  # sample due → in the batcher: producer, broker, fetch, parse, windowing
    return {**_percentiles(ms), "windows": len(ms),
            "in_daemon_p99_ms": round(float(np.percentile(queued, 99)), 2) if len(queued) else float("nan"),
            "to_daemon_p50_ms": round(float(np.median(before)), 2) if len(before) else float("nan"),
            "to_daemon_p99_ms": round(float(np.percentile(before, 99)), 2) if len(before) else float("nan"), "batch_scoring_ms": round(batch_ms, 3),
            "mean_batch": round(float(np.mean(sizes)), 1) if sizes else 0.0, "batches": len(sizes),
            "max_pending_windows": daemon.processor.peak_pending, "backpressure_pauses": int(daemon.metrics.backpressure_pauses._value.get()),
            "commit_retries": int(daemon.metrics.total("tsmon_commit_retries_total")),
            "samples": produced.get("samples", 0), "producer_late_ms": produced.get("producer_late_ms"),
            "caught_up": bool(produced.get("samples")) and daemon.caught_up(produced["samples"]),
            "producer_failed": produced.get("failed")}


def bench_latency(model: str, streams: int = 32, rate: float = 500.0, seconds: float = 20.0, hop: int | None = None,
                  chunk: int | None = None, max_batch: int = 256, max_delay_ms: float = 50.0,
                  target_ms: float = 50.0, device: str = "auto", warmup_s: float = 3.0,
                  fetch_max_wait_ms: int = 10, overload_s: float = 3.0) -> dict[str, Any]:
    """Fixed policy, then adaptive, on the same input; the fixed figures are the top-level keys."""
    from monitor.bench import sample_streams
    from monitor.scorer import load_served

    served = load_served("*", model, None, hop, device)
    hop = served.hop
    chunk = chunk or hop  # each message completes one window: its last sample is the window's
    data = [(name, values) for name, _ts, values in sample_streams(served.detector, streams, 20 * served.window, 0)]
    with LocalBroker() as broker:
        fixed = _run(broker, model, hop, data, rate, chunk, seconds, warmup_s,
                     {"max_batch": max_batch, "max_delay_ms": max_delay_ms}, device, fetch_max_wait_ms)
        adaptive = _run(broker, model, hop, data, rate, chunk, seconds, warmup_s,
                        {"max_batch": max_batch, "max_delay_ms": max_delay_ms, "latency_target_ms": target_ms}, device,
                        fetch_max_wait_ms)
        over = None
        if overload_s > 0:  # every sample ends a window: far more than the scorer takes
            over = _run(broker, model, 1, data, rate, chunk, overload_s, 0.0,
                        {"max_batch": max_batch, "max_delay_ms": max_delay_ms, "latency_target_ms": target_ms,
                         "max_pending": 4 * max_batch}, device, fetch_max_wait_ms)
            over.update(offered_windows_per_s=round(streams * rate, 1), max_pending=4 * max_batch)
    bound = round(max_delay_ms + 2 * fixed["batch_scoring_ms"], 2)  # compared as reported
    a_bound = round(max_delay_ms + 2 * adaptive["batch_scoring_ms"], 2)  # the same bound, with this run's batches
    adaptive.update(target_ms=target_ms, within_target=bool(adaptive["p99_ms"] <= target_ms),
                    bound_ms=a_bound, within_bound=bool(adaptive["p99_ms"] <= a_bound))
    warnings = [f"{name}: the producer fell {r['producer_late_ms']} ms behind its schedule; latencies include it"
                for name, r in (("fixed", fixed), ("adaptive", adaptive)) if (r["producer_late_ms"] or 0) > 20]
    warnings += [f"{name}: the producer process failed (exit code {r['producer_failed']})"
                 for name, r in (("fixed", fixed), ("adaptive", adaptive)) if r["producer_failed"] is not None]
    warnings += [f"{name}: {r['commit_retries']} commit(s) put off (the sink or the broker failed: the input paused "
                 f"for each); the max latency includes the flush timeout and the retry, not batching"
                 for name, r in (("fixed", fixed), ("adaptive", adaptive)) if r["commit_retries"]]
    warnings += [f"{name}: the daemon did not catch up with the input (over saturation?)"
                 for name, r in (("fixed", fixed), ("adaptive", adaptive)) if not r["caught_up"]]
    if over is not None and over["max_pending_windows"] > over["max_pending"] + chunk:
        warnings.append(f"overload: {over['max_pending_windows']} windows waited, over batch.max_pending "
                        f"{over['max_pending']} + one record's {chunk}")
    return {**fixed, "max_delay_ms": max_delay_ms, "bound_ms": bound,
            "within_bound": bool(fixed["p99_ms"] <= bound), "adaptive": adaptive, "overload": over,
            "fetch_max_wait_ms": fetch_max_wait_ms, "streams": streams, "rate_per_stream": rate, "chunk": chunk, "hop": hop, "window": served.window,
            "offered_windows_per_s": round(streams * rate / hop, 1), "seconds": seconds, "max_batch": max_batch,
            "model": served.detector.kind, "device": str(served.detector.device), "warnings": warnings}
