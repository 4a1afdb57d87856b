"""The pipeline benchmark on the real broker: a short run reports consistent figures, and a loop stopped by its
deadline is an error, never a rate (the full count over the part read would overstate it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka import KafkaProducer

from models.errors import BrokerError
from monitor.bench import _consume, _pipeline_once, bench_pipeline
from monitor.replay import replay
from monitor.scorer import Scorer, load_served
from tests.conftest import sine_stream

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def _send(bootstrap: str, topic: str, n: int, chunk: int = 40) -> None:
    ts, values = sine_stream(n)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1)
    try:
        replay(producer, topic, "s-1", ts, values, chunk)
    finally:
        producer.close()


def test_a_consume_loop_short_of_its_messages_is_an_error_not_a_rate(broker, topic: str) -> None:
    _send(broker.bootstrap, topic, 80)  # two messages of 40 samples
    assert _consume(broker.bootstrap, topic, 2, deadline_s=30)[1]  # all there: a time and the blocks
    with pytest.raises(BrokerError, match="read 2 of 5 messages in 3 s"):
        _consume(broker.bootstrap, topic, 5, deadline_s=3)


def test_a_daemon_round_that_does_not_catch_up_is_stopped_at_its_deadline(broker, topic: str, stream_model: Path) -> None:
    _send(broker.bootstrap, topic, 400)
    scorer = Scorer([load_served("*", str(stream_model), None, None, "cpu")])
    with pytest.raises(BrokerError, match="did not catch up with 10000 samples in 5 s"):
        _pipeline_once(broker, topic, str(stream_model), scorer, 10_000, 64, "cpu", deadline_s=5)


def test_a_short_pipeline_run_reports_consistent_figures(stream_model: Path) -> None:
    r = bench_pipeline(str(stream_model), streams=2, samples=8_000, chunk=40, max_batch=64, device="cpu", rounds=1)
    assert (r["samples"], r["messages"], r["streams"], r["rounds"]) == (8_000, 200, 2, 1)
    assert r["windows"] == 2 * ((4_000 - 40) // 10 + 1)  # window 40, hop 10, per stream
    for key in ("consume_samples_per_s", "scorer_samples_per_s", "pipeline_samples_per_s"):
        assert r[key] > 0, key
    assert r["ratio"] == pytest.approx(r["pipeline_samples_per_s"]
                                       / min(r["consume_samples_per_s"], r["scorer_samples_per_s"]), rel=0.01)
