"""10 000 hostile messages interleaved with a labelled stream on the real broker: every one dead-lettered
with a reason, the daemon never stops, the labelled stream's alerts are exactly those of a clean run, and
the state held stays bounded (one stream held; unknown ids never create state)."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from monitor.replay import messages
from monitor.topics import TopicReader, ensure_topics
from tests.conftest import STREAM_HOP, sine_stream
from tests.hostile import corpus
from tests.test_integration.test_pipeline import BURSTS, config, run_until_samples

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
N_BAD = 10_000


def dead_letters(bootstrap: str, topic: str, expected: int) -> list[Any]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or {0})]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    out: list[Any] = []
    empty = 0
    while empty < 20 and len(out) < expected + 100:
        batch = c.poll(timeout_ms=200)
        empty = 0 if batch else empty + 1
        out.extend(r for rs in batch.values() for r in rs)
    c.close()
    return out


def test_hostile_corpus_is_dead_lettered_and_changes_no_alert(broker: Any, stream_model: Path) -> None:
    topic = f"hostile-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, {topic: 1})  # one partition: the order below is the order consumed
    ts, values = sine_stream(4000, BURSTS, seed=5)
    good = [body for body, _ in messages("dev-main", ts, values, STREAM_HOP)]
    last_ts = [int(t) for t in ts[STREAM_HOP - 1 :: STREAM_HOP]]
    max_bytes = 64 * 1024
    bad = corpus(N_BAD, 11, "dev-main", last_ts[:10], max_bytes)  # duplicates aim at the first messages
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1, linger_ms=5, max_request_size=4 << 20)
    per_good = len(bad) // len(good) + 1
    for i, body in enumerate(good):  # the labelled stream first, then its share of hostile messages
        p.send(topic, key=b"dev-main", value=body)
        if i >= 10:  # after the first 10 messages, which the duplicates repeat
            for key, value, _ in bad[(i - 10) * per_good : (i - 9) * per_good]:
                p.send(topic, key=key, value=value)
    p.flush()
    p.close()

    cfg = config(broker, topic, stream_model, **{"limits.max_bytes": max_bytes, "limits.max_streams": 1,
                                                 "models": [{"pattern": "dev-*", "path": str(stream_model)}]})
    d = run_until_samples(cfg, len(ts), limit_s=240)
    wanted = N_BAD
    dlq = dead_letters(broker.bootstrap, cfg.kafka.dead_letter_topic, wanted)
    reasons = Counter(dict(r.headers)["tsmon.reason"].decode() for r in dlq)
    assert len(dlq) == wanted and d.metrics.total("tsmon_dead_letters_total") == wanted
    assert set(reasons) >= {"invalid_json", "non_finite", "empty", "oversized", "channel_mismatch", "no_model",
                            "too_many_streams", "not_object", "bad_timestamp"}
    assert reasons["duplicate_timestamp"] + reasons["timestamp_backwards"] > 0
    assert list(d.final_thresholds) == ["dev-main"]  # the only stream that ever held state
    fired = [a for a in TopicReader(broker.bootstrap, cfg.kafka.alerts_topic).settle()
             if a.get("type") == "anomaly" and a["stream"] == "dev-main"]
    assert [a["status"] for a in fired] == ["firing", "resolved"] * len(BURSTS)  # as a clean run gives
