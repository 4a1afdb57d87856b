"""The input topic's topology changed while the daemon runs (a pipeline owner's pass), on the real broker."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from monitor.daemon import Daemon
from monitor.replay import messages
from monitor.topics import ensure_topics
from tests.conftest import sine_stream
from tests.test_integration.test_pipeline import config

pytestmark = pytest.mark.timeout(120)


def send(bootstrap: str, topic: str, stream: str, n: int, seed: int) -> None:
    """``n`` samples of a stream, 10 a message, all on partition 0."""
    ts, v = sine_stream(n, seed=seed)
    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5)
    for body, _ in messages(stream, ts, v, 10):
        p.send(topic, key=stream.encode(), value=body, partition=0)
    p.flush()
    p.close()


def test_an_input_topic_deleted_and_created_again_while_running_is_read_from_its_start(
        broker: Any, stream_model: Path) -> None:
    """An operator deletes the input topic while the daemon runs, and it is created again (by the operator, or by
    a producer's first send on a broker that auto-creates topics: Kafka's default) before the daemon has read
    the new one. Its offsets begin again at 0. The daemon read the new topic on from the old one's position (kept
    by the client, or rewound to at the rebalance the deletion caused): the new topic's first 100 messages were
    passed over without a word (on Tansu, which answers a fetch past the end with nothing, the partition also
    stalled until the new topic grew past that position). Now it is said (``input_topic_recreated``) and the new
    topic is read from its start."""
    topic = f"t-{uuid.uuid4().hex[:12]}"
    ensure_topics(broker.bootstrap, {topic: 1})
    send(broker.bootstrap, topic, "dev-old", 1000, seed=5)  # 100 messages: the daemon's position ends at 100
    cfg = config(broker, topic, stream_model, **{"kafka.metadata_max_age_ms": 1000})
    d = Daemon(cfg)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10_000)

    def operator() -> None:
        admin.delete_topics([topic])
        time.sleep(1.0)
        try:
            admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        except TopicAlreadyExistsError:  # Tansu created it again at a metadata request (it auto-creates topics)
            pass
        send(broker.bootstrap, topic, "dev-new", 2000, seed=6)  # 200 messages on the new topic's partition 0

    op = threading.Thread(target=operator, daemon=True)
    t0 = time.monotonic()

    def until() -> bool:
        if op.ident is None and d.caught_up(1000):
            op.start()
        return (op.ident is not None and not op.is_alive() and d.caught_up(3000)) or time.monotonic() - t0 > 40

    try:
        d.run(until=until)
    finally:
        admin.close()
    assert d.metrics.total("tsmon_samples_total") == 3000, "the re-created topic was not read from its start"
    assert d.metrics.total("tsmon_dead_letters_total") == 0
