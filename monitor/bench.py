"""``tsmon bench pipeline``: what the whole pipeline costs beyond its slowest stage, measured in one run.

Owns the pipeline benchmark. On one local broker and one topic of chunked messages it measures three
rates, each from its first record to its last (group joins excluded): a bare kafka-python
consume-and-parse loop, the scorer alone on the very windows those messages make (same model, same
``max_batch``), and the daemon end to end (broker → windows → scores → alerts acknowledged).
``ratio`` = pipeline / min(consume, scorer). Rounds interleave the three (each figure is the best of its
rounds), so that all of them see the same machine conditions. With confluent-kafka installed the bare loop
and the daemon also run on librdkafka (``kafka.client = "confluent"``) in the same rounds. The scorer alone is measured twice: with
the daemon's scoring threads (``daemon.torch_threads``, cores − 1 by default, since the consuming thread
needs a core) — the configuration the pipeline runs, used for ``ratio`` — and with every core, for
``ratio_vs_all_cores_scorer``.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import numpy as np
import torch

from models.errors import BrokerError
from monitor.batcher import Batcher
from monitor.broker import LOCAL_GROUP, LocalBroker
from monitor.config import load_config
from monitor.records import SampleBlock, parse
from monitor.replay import replay
from monitor.scorer import Scorer, load_served
from monitor.windows import StreamWindows


def sample_streams(det: Any, n_streams: int, per_stream: int, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The model's ECG5000 test beats for a model trained on them, else noisy sines of the model's shape."""
    rng = np.random.default_rng(seed)
    beats = None
    if det.meta.get("training", {}).get("data", {}).get("source") == "ecg5000":
        from models.workflow import load_dataset, spec_for_eval

        beats = load_dataset(spec_for_eval(det.meta, "ecg5000", None)).test  # once, not per stream
    ts = 1_700_000_000_000 + 8 * np.arange(per_stream, dtype="int64")
    out = []
    for s in range(n_streams):
        if beats is not None:
            values = beats[rng.integers(0, len(beats), per_stream // det.window + 1)].reshape(-1, det.channels)
        else:
            t = np.arange(per_stream)[:, None]
            noise = 0.05 * rng.normal(size=(per_stream, det.channels))
            values = np.sin(2 * np.pi * t / 50 + np.arange(det.channels)) + noise
        out.append((f"bench-{s:03d}", ts, values[:per_stream].astype("float32")))
    return out


CONSUME_DEADLINE_S = 120.0  # a bare consume loop that has not read every message by then says so
PIPELINE_DEADLINE_S = 600.0  # one daemon round that has not caught up by then says so


def _all_read(seen: int, n_messages: int, deadline_s: float, what: str) -> None:
    """A rate is the whole count over the whole time: a loop stopped by its deadline has neither (the full count over
    the part read overstated the rate) — an error, not a figure."""
    if seen < n_messages:
        raise BrokerError(f"bench pipeline: {what} read {seen} of {n_messages} messages in {deadline_s:.0f} s; "
                          "no rate measured")


def _consume(bootstrap: str, topic: str, n_messages: int,
             deadline_s: float = CONSUME_DEADLINE_S) -> tuple[float, list[SampleBlock]]:
    from kafka import KafkaConsumer

    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bench-{uuid.uuid4().hex[:8]}",
                      enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=2000,
                      heartbeat_interval_ms=500)
    blocks: list[SampleBlock] = []
    seen, t0, deadline = 0, None, time.monotonic() + deadline_s
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
    _all_read(seen, n_messages, deadline_s, "the kafka-python consume loop")
    return dt, blocks


def _consume_confluent(bootstrap: str, topic: str, n_messages: int, deadline_s: float = CONSUME_DEADLINE_S) -> float:
    """The same bare consume-and-parse loop on librdkafka (confluent-kafka)."""
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest", "session.timeout.ms": 2000,
                  "heartbeat.interval.ms": 500})
    c.subscribe([topic])
    seen, t0, deadline = 0, None, time.monotonic() + deadline_s
    while seen < n_messages and time.monotonic() < deadline:
        for m in c.consume(num_messages=500, timeout=0.2):
            if m.error() is None:
                t0 = t0 or time.monotonic()
                parse(m.value(), m.key())
                seen += 1
    dt = time.monotonic() - (t0 or time.monotonic())
    c.close()
    _all_read(seen, n_messages, deadline_s, "the librdkafka consume loop")
    return dt


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


def _pipeline_once(broker: LocalBroker, topic: str, model: str, scorer: Scorer, total: int, max_batch: int,
                   device: str, client: str = "kafka-python",
                   deadline_s: float = PIPELINE_DEADLINE_S) -> tuple[float, float, int]:
    """One daemon, fresh group: seconds from its first record to the last alert acknowledged; CPU s; alerts. A daemon
    that has not caught up with the ``total`` samples within ``deadline_s`` is stopped and the round is an error."""
    from monitor.daemon import Daemon

    cfg = load_config(None, {"kafka.bootstrap_servers": broker.bootstrap, "kafka.topics": [topic],
                             "kafka.group_id": f"bench-{uuid.uuid4().hex[:8]}", **LOCAL_GROUP,
                             "batch.max_batch": max_batch,
                             "kafka.client": client, "daemon.device": device,
                             "models": [{"pattern": "*", "path": model}]}, env={})
    daemon = Daemon(cfg, scorer=scorer)  # sets the daemon's scoring threads
    done: list[float] = []

    def finished() -> bool:
        if daemon.caught_up(total):
            daemon.processor.sink.flush(30)  # alerts acknowledged: the end of the pipeline
            done.append(time.monotonic())
            return True
        return False

    cpu0, deadline = time.process_time(), time.monotonic() + deadline_s
    daemon.run(until=lambda: finished() or time.monotonic() >= deadline)
    if not done:
        raise BrokerError(f"bench pipeline: the daemon did not catch up with {total} samples in {deadline_s:.0f} s "
                          f"({client}); no rate measured")
    first = daemon.processor.first_record_at
    seconds = done[0] - first if done and first else float("nan")
    return seconds, time.process_time() - cpu0, int(daemon.metrics.total("tsmon_alert_messages_total"))


def bench_pipeline(model: str, streams: int = 8, samples: int = 560_000, chunk: int = 140, max_batch: int = 256,
                   device: str = "auto", seed: int = 0, rounds: int = 3) -> dict[str, Any]:
    """Each round measures consume, scorer (daemon threads and all cores) and pipeline in turn, so that all
    figures see the same machine; each figure is the best of its rounds."""
    from kafka import KafkaProducer

    from monitor.daemon import scoring_threads
    from monitor.topics import ensure_topics

    served = load_served("*", model, None, None, device)  # named as the daemon's route names it
    scorer = Scorer([served])
    data = sample_streams(served.detector, streams, samples // streams, seed)
    total = sum(len(ts) for _, ts, _ in data)
    all_cores, daemon_threads = torch.get_num_threads(), scoring_threads(None)
    from monitor.confluent import available

    confluent = available()
    t_consume, t_scorer, t_all, t_pipe, cpu = [], [], [], [], []
    t_consume_rd, t_pipe_rd = [], []
    with LocalBroker() as broker:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        ensure_topics(broker.bootstrap, {topic: 4, "tsmon.alerts": 1, "tsmon.dead-letter": 1})
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1, linger_ms=20, batch_size=256 * 1024)
        for name, ts, values in data:
            replay(producer, topic, name, ts, values, chunk)
        producer.close()
        n_messages = sum(-(-len(ts) // chunk) for _, ts, _ in data)  # uniform series: one message per chunk
        for _ in range(rounds):
            seconds, blocks = _consume(broker.bootstrap, topic, n_messages)
            t_consume.append(seconds)
            torch.set_num_threads(all_cores)
            seconds, n_windows = _score_alone(scorer, blocks, max_batch)
            t_all.append(seconds)
            torch.set_num_threads(daemon_threads)
            t_scorer.append(_score_alone(scorer, blocks, max_batch)[0])
            seconds, cpu_s, alerts = _pipeline_once(broker, topic, model, scorer, total, max_batch, device)
            t_pipe.append(seconds)
            cpu.append(cpu_s)
            if confluent:  # the optional librdkafka client: bare loop and daemon, same topic, same round
                t_consume_rd.append(_consume_confluent(broker.bootstrap, topic, n_messages))
                t_pipe_rd.append(_pipeline_once(broker, topic, model, scorer, total, max_batch, device, "confluent")[0])
        torch.set_num_threads(all_cores)
    consume, pipeline = total / min(t_consume), total / min(t_pipe)
    scorer_rate, scorer_all = n_windows / min(t_scorer) * served.hop, n_windows / min(t_all) * served.hop
    warnings = []
    if pipeline > min(consume, scorer_rate) or scorer_all < 0.8 * scorer_rate:
        warnings.append("inconsistent figures (a stage faster than the pipeline allows, or more threads slower "
                        "than one): the machine was busy with something else; run again on a quiet machine")
    if min(t_pipe) < 1.0:
        warnings.append(f"the pipeline ran only {min(t_pipe):.2f} s: use more --samples for a stable figure")
    return {
        "warnings": warnings, "rounds": rounds,
        "samples": total, "messages": n_messages, "chunk": chunk, "streams": streams, "windows": n_windows,
        "max_batch": max_batch, "device": str(served.detector.device), "model": served.detector.kind,
        "consume_samples_per_s": round(consume), "scorer_samples_per_s": round(scorer_rate),
        "pipeline_samples_per_s": round(pipeline), "ratio": round(pipeline / min(consume, scorer_rate), 3),
        "scoring_threads": daemon_threads, "scorer_all_cores_samples_per_s": round(scorer_all),
        "all_cores": all_cores, "ratio_vs_all_cores_scorer": round(pipeline / min(consume, scorer_all), 3),
        "alerts_published": alerts,
        # CPU seconds of this process during the best pipeline round (a scoring process is not counted)
        "pipeline_wall_s": round(min(t_pipe), 2), "daemon_cpu_s": round(cpu[t_pipe.index(min(t_pipe))], 2),
        "cores": os.cpu_count(),
        # confluent-kafka (librdkafka), when installed: the same two figures with kafka.client = "confluent"
        "consume_confluent_samples_per_s": round(total / min(t_consume_rd)) if t_consume_rd else None,
        "pipeline_confluent_samples_per_s": round(total / min(t_pipe_rd)) if t_pipe_rd else None,
    }
