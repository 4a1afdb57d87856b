"""Input wire format: good messages parse to sample blocks, bad ones to a reason — never an exception."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from monitor.records import REASONS, BadRecord, Limits, SampleBlock, parse

SCHEMA = json.loads((Path(__file__).parents[2] / "monitor" / "schemas" / "input.schema.json").read_text())
GOOD = [
    {"stream": "ecg-1", "ts": 1_700_000_000_000, "value": 0.1},
    {"stream": "ecg-1", "ts": "2024-05-01T12:00:00.250Z", "values": [0.1, -0.2]},
    {"stream": "ecg-1", "ts": 1_700_000_000_000, "period_ms": 2.7778, "samples": [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]},
    {"ts": 1_700_000_000_000, "period_ms": 1000, "samples": [1.0, 2.0, 3.0]},
]


@pytest.mark.parametrize("doc", GOOD)
def test_good_messages_parse_and_match_the_schema(doc: dict) -> None:
    jsonschema.validate(doc, SCHEMA)
    block = parse(json.dumps(doc).encode(), key=b"ecg-1")
    assert isinstance(block, SampleBlock) and block.stream == "ecg-1"
    assert block.values.dtype == np.float32 and np.isfinite(block.values).all()
    assert (np.diff(block.ts_ms) > 0).all()
    with_bom = parse(b"\xef\xbb\xbf" + json.dumps(doc).encode(), key=b"ecg-1")  # RFC 8259 lets a parser skip it
    assert isinstance(with_bom, SampleBlock) and (with_bom.values == block.values).all()


@pytest.mark.parametrize("stream, good", [("pump 3", True), (" ", False), ("s\u0000", False), ("dev\x1b[2J", False),
                                          ("dev\u0085", False), ("\ufeff", False),
                                          # invisible alone, or reordering what a terminal shows (in-process fuzzing)
                                          ("\u200b", False), ("\u2060\u200d", False), ("\u00ad", False),
                                          ("\u3164", False), ("\ufe0f\u034f", False), ("\u3164x", True),
                                          ("dev-1\u202ecba", False), ("dev\u2066x", False),
                                          ("dev\u200dx", True), ("abc\n", False),
                                          # line breaks to str.splitlines and JavaScript (an input-path review)
                                          ("dev\u2028x", False), ("dev\u2029x", False)])
def test_the_schema_and_the_parser_agree_on_stream_ids(stream: str, good: bool) -> None:
    doc = {"stream": stream, "ts": 1_700_000_000_000, "value": 0.1}
    assert jsonschema.Draft202012Validator(SCHEMA).is_valid(doc) is good
    assert isinstance(parse(json.dumps(doc).encode()), SampleBlock) is good


@pytest.mark.parametrize("stream, good", [("\U000e0041\U000e0042", False), ("\U000e0100", False),
                                          ("\U0001d173", False), ("dev\U000e0041", True), ("\U0001f600", True)])
def test_astral_invisible_stream_ids_are_refused_by_the_parser(stream: str, good: bool) -> None:
    """Tags, variation selectors and format controls beyond the BMP alone (noticed at a stop) are bad_stream. The
    input schema leaves them out: in a character class they break ECMA-262 validators without the u flag (a
    review); the parser is the stricter there."""
    doc = {"stream": stream, "ts": 1_700_000_000_000, "value": 0.1}
    assert isinstance(parse(json.dumps(doc).encode()), SampleBlock) is good
    assert jsonschema.Draft202012Validator(SCHEMA).is_valid(doc)


def test_chunk_timestamps_follow_the_period() -> None:
    block = parse(json.dumps(GOOD[2]).encode())
    assert block.ts_ms.tolist() == [1_700_000_000_000, 1_700_000_000_003, 1_700_000_000_006]
    assert block.values.shape == (3, 2)
    iso = parse(json.dumps(GOOD[1]).encode())
    assert iso.ts_ms[0] == 1_714_564_800_250


@pytest.mark.parametrize("raw, key, reason", [
    (b"", None, "empty"),
    (None, b"s", "empty"),
    (b"{not json", b"s", "invalid_json"),
    (b"\xff\xfe", b"s", "invalid_json"),
    (b"[1, 2]", b"s", "not_object"),
    (b'{"ts": 1, "value": NaN}', b"s", "non_finite"),
    (b'{"ts": 1, "values": [1, Infinity]}', b"s", "non_finite"),
    (b'{"ts": 1, "value": 1e400}', b"s", "non_finite"),
    (b'{"ts": 1, "value": 1e39}', b"s", "non_finite"),
    (b'{"ts": 1, "value": 1}', None, "bad_stream"),
    (b'{"stream": "a", "ts": 1, "value": 1}', b"b", "bad_stream"),
    (b'{"stream": 5, "ts": 1, "value": 1}', None, "bad_stream"),
    (b'{"stream": "dev\\ud800", "ts": 1, "value": 1}', None, "bad_stream"),  # would not encode as a key
    (b'{"stream": " ", "ts": 1, "value": 1}', None, "bad_stream"),  # no ctl glob or status row can show it
    (b'{"ts": 1, "value": 1}', b"\t\n", "bad_stream"),
    (b'{"stream": "s\\u0000", "ts": 1, "value": 1}', None, "bad_stream"),
    (b'{"ts": 1, "value": 1}', b"dev\x1b[2J", "bad_stream"),  # a terminal escape in `tsmon status`
    (b'{"ts": 1, "value": 1}', b"dev\xc2\x85", "bad_stream"),  # U+0085, a C1 control
    (b'{"ts": "yesterday", "value": 1}', b"s", "bad_timestamp"),
    (b'{"ts": "2024-05-01T12:00:00", "value": 1}', b"s", "bad_timestamp"),
    (b'{"ts": "2024-05-01T23:59:60Z", "value": 1}', b"s", "bad_timestamp"),  # a leap second: documented
    (b'{"ts": true, "value": 1}', b"s", "bad_timestamp"),
    (b'{"ts": 1, "value": "1.0"}', b"s", "wrong_type"),
    (b'{"ts": 1, "value": true}', b"s", "wrong_type"),
    (b'{"ts": 1, "values": [1, "x"]}', b"s", "wrong_type"),
    (b'{"ts": 1, "values": [[1]]}', b"s", "wrong_type"),
    (b'{"ts": 1, "value": 1, "values": [1]}', b"s", "bad_shape"),
    (b'{"ts": 1}', b"s", "bad_shape"),
    (b'{"ts": 1, "samples": [[1, 2], [3]], "period_ms": 10}', b"s", "bad_shape"),
    (b'{"ts": 1, "samples": [[1, 2]], "period_ms": 0}', b"s", "bad_timestamp"),
    (b'{"ts": 1, "samples": [[1], [2]], "period_ms": 0.1}', b"s", "bad_timestamp"),
    (b'{"ts": 1, "samples": [], "period_ms": 10}', b"s", "bad_shape"),
    (b"[" * 100_000 + b"]" * 100_000, b"s", "invalid_json"),
    # the chunk's last sample past year 9999: its alert time could not be written and the loop stopped
    (b'{"ts": 1700000000000, "samples": [1, 2, 3, 4], "period_ms": 90000000000000}', b"s", "bad_timestamp"),
    (b'{"ts": 1, "value": ' + b"9" * 5000 + b"}", b"s", "non_finite"),  # valid JSON, beyond int conversion
    # UTF-8 only: json.loads(bytes) read UTF-16 and UTF-32 and passed encoded surrogates (the data path review),
    # where the schema says UTF-8 (a UTF-8 byte-order mark is skipped: see the good messages)
    ('{"ts": 1, "value": 1}'.encode("utf-16-le"), b"s", "invalid_json"),
    ('{"ts": 1, "value": 1}'.encode("utf-32"), b"s", "invalid_json"),
    (b'{"ts": 1, "value": 1, "note": "\xed\xa0\x80"}', b"s", "invalid_json"),
])
def test_bad_messages_have_a_reason(raw: bytes | None, key: bytes | None, reason: str) -> None:
    bad = parse(raw, key)
    assert isinstance(bad, BadRecord) and bad.reason == reason, bad
    assert bad.reason in REASONS and bad.detail


def test_a_period_too_long_is_said_to_be_too_long() -> None:
    """period_ms = 1e300 is > 0: it was refused as "a chunk needs period_ms > 0", which it has."""
    bad = parse(b'{"ts": 1, "samples": [1, 2], "period_ms": 1e300}', b"s")
    assert isinstance(bad, BadRecord) and bad.reason == "bad_timestamp" and "below 100000000000000" in bad.detail


def test_a_number_sent_as_a_string_is_said_to_be_one() -> None:
    """A pipeline owner's pass: "ts must be epoch ms …, got '1796636082820'" read as if the value were valid."""
    quoted = " (a string: send the number itself, without quotes)"
    for raw in (b'{"ts": "1796636082820", "value": 1}', b'{"ts": 1, "samples": [1, 2], "period_ms": "100"}'):
        bad = parse(raw, b"s")
        assert isinstance(bad, BadRecord) and bad.reason == "bad_timestamp" and bad.detail.endswith(quoted), bad
    for raw in (b'{"ts": "yesterday", "value": 1}', b'{"ts": "nan", "value": 1}'):
        bad = parse(raw, b"s")
        assert isinstance(bad, BadRecord) and quoted not in bad.detail


def test_limits() -> None:
    big = json.dumps({"ts": 1, "period_ms": 1, "samples": [0.0] * 50}).encode()
    assert parse(big, b"s", Limits(max_samples=10)).reason == "too_many_samples"
    assert parse(big, b"s", Limits(max_bytes=100)).reason == "oversized"
    assert isinstance(parse(big, b"s", Limits(max_bytes=len(big))), SampleBlock)  # the limit itself is allowed
    assert parse(big, b"s", Limits(max_bytes=len(big) - 1)).reason == "oversized"
    assert parse(b'{"ts": 1, "value": 1}', b"x" * 300).reason == "bad_stream"


def test_fuzzed_bytes_never_raise() -> None:
    rng = random.Random(7)
    pieces = [b"{", b"}", b"[", b"]", b'"ts"', b'"value"', b'"samples"', b":", b",", b"1", b"-1e309", b"NaN",
              b'"x"', b"null", b"true", b"\xff", b"0.5", b'"period_ms"', b'"stream"']
    for _ in range(3000):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        out = parse(raw, rng.choice([None, b"s", b"\xff"]))
        assert isinstance(out, (SampleBlock, BadRecord))
        if isinstance(out, SampleBlock):
            assert np.isfinite(out.values).all()


@pytest.mark.parametrize("body", [
    b'{"stream":"a","ts":' + b"9" * 400 + b',"values":[1,2]}',
    b'{"stream":"a","ts":1700000000000,"values":[' + b"9" * 400 + b',2]}',
    b'{"stream":"a","ts":1700000000000,"value":' + b"9" * 400 + b"}",
    b'{"stream":"a","ts":1700000000000,"samples":[' + b"9" * 400 + b',2],"period_ms":10}',
    b'{"stream":"a","ts":1700000000000,"samples":[[1,2]],"period_ms":' + b"9" * 400 + b"}",
    b'{"stream":"a","ts":"0001-01-01T00:00:00+14:00","values":[1,2]}',
])
def test_numbers_beyond_float_range_are_bad_records_not_exceptions(body: bytes) -> None:
    assert isinstance(parse(body), BadRecord)


def test_a_360_hz_series_replays_as_chunks_with_a_fractional_period() -> None:
    """Fractional epoch-ms timestamps (360 Hz) still go out as chunks, parsed back to within a millisecond."""
    from monitor.replay import messages

    ts = 1_700_000_000_000 + np.arange(1000) * (1000 / 360)
    values = np.arange(1000, dtype="float32")[:, None]
    bodies = list(messages("ecg", ts, values, chunk=250))
    assert len(bodies) == 4 and all(n == 250 for _, n in bodies)
    blocks = [parse(b, b"ecg") for b, _ in bodies]
    got = np.concatenate([b.ts_ms for b in blocks])
    assert np.abs(got - ts).max() <= 1.0 and (np.diff(got) > 0).all()
    np.testing.assert_array_equal(np.concatenate([b.values for b in blocks]), values)


@pytest.mark.parametrize("rate, chunk, jitter", [(360, 250, False), (360, 7, False), (128, 100, False), (3, 10, True)])
def test_replay_eval_scores_on_the_times_the_daemon_stamps(rate: float, chunk: int, jitter: bool) -> None:
    """A review: replay-eval scored labelled events on the file's fractional times (360 Hz: sample 3 at +8.333 ms)
    while the daemon stamped +8, so an alert firing on a labelled sample's window read as fired before it."""
    from monitor.replay import messages
    from monitor.replay_eval import daemon_times

    rng = np.random.default_rng(0)
    ts = 1_700_000_000_000.4 + np.arange(1000) * (1000 / rate) + (rng.uniform(0, 50, 1000) if jitter else 0)
    values = np.arange(1000, dtype="float64")[:, None]
    values[[5, 400]] = np.nan  # holes are not sent: their rows keep rounded times
    ok = np.isfinite(values[:, 0])
    got = np.concatenate([parse(b, b"s").ts_ms for b, _ in messages("s", ts[ok], values[ok], chunk)])  # type: ignore[union-attr]
    wire = daemon_times(ts, values, 0, chunk)
    np.testing.assert_array_equal(wire[ok], got)
    assert not np.array_equal(np.round(ts[ok]), got) or jitter  # fractional times do miss the daemon's
    np.testing.assert_array_equal(wire[~ok], np.round(ts[~ok]))


def test_holes_in_a_recording_are_dropped_before_encoding_never_sent_as_nan() -> None:
    from monitor.replay import finite_rows, messages

    ts, values = np.arange(6.0) * 1000, np.array([[1.0], [np.nan], [3.0], [np.inf], [5.0], [6.0]])
    with pytest.raises(ValueError, match="non-finite"):
        list(messages("s", ts, values, chunk=3))  # `nan` is not JSON: its whole chunk was dead-lettered
    kept_ts, kept, skipped = finite_rows(ts, values)
    assert skipped == 2 and kept_ts.tolist() == [0, 2000, 4000, 5000]
    blocks = [parse(b, b"s") for b, _ in messages("s", kept_ts, kept, chunk=3)]
    assert np.concatenate([b.values for b in blocks]).ravel().tolist() == [1.0, 3.0, 5.0, 6.0]


@pytest.mark.parametrize("stamp", ["1978-09-08T07:20:59.715Z", "2004-07-24T21:14:16.001Z", "2047-01-02T03:04:05.006+02:00",
                                   "2024-01-01T00:00:00.999Z"])
def test_iso_timestamps_are_exact_to_the_millisecond(stamp: str) -> None:
    """timestamp() * 1000 truncated some to 1 ms early (0.6-3.4 % of those before 2010 or after 2038): a 1 kHz
    backfill of 2004 had 240 of 1 000 samples dead-lettered as duplicates."""
    import pandas as pd

    block = parse(json.dumps({"ts": stamp, "value": 1.0}).encode(), b"s")
    assert isinstance(block, SampleBlock) and int(block.ts_ms[0]) == pd.Timestamp(stamp).value // 10**6


def test_replay_reports_a_message_the_producer_or_the_broker_refuses() -> None:
    """A message too large for the producer ended `tsmon replay` in a traceback, and a send the broker refused
    was never looked at: `replayed` and exit 0."""
    from kafka.errors import MessageSizeTooLargeError, TopicAuthorizationFailedError
    from kafka.future import Future

    from models.errors import BrokerError
    from monitor.replay import replay

    class Producer:
        def __init__(self, refuse: Exception | None, fail: Exception | None) -> None:
            self.refuse, self.fail = refuse, fail

        def send(self, topic: str, key: bytes, value: bytes) -> Future:
            if self.refuse is not None:
                raise self.refuse
            f = Future()
            return f.failure(self.fail) if self.fail is not None else f.success(None)

        def flush(self) -> None:
            pass

    ts, v = np.arange(10, dtype="int64") * 10, np.zeros((10, 1), "float32")
    assert replay(Producer(None, None), "t", "s", ts, v, chunk=5) == 10
    with pytest.raises(BrokerError, match="MessageSizeTooLargeError.*a smaller --chunk"):
        replay(Producer(MessageSizeTooLargeError("1.4 MB"), None), "t", "s", ts, v, chunk=5)
    with pytest.raises(BrokerError, match="2 message\\(s\\) to t not delivered: TopicAuthorizationFailedError"):
        replay(Producer(None, TopicAuthorizationFailedError()), "t", "s", ts, v, chunk=5)


def test_a_360_hz_series_stamped_to_the_microsecond_still_goes_in_chunks() -> None:
    """A model CLI pass: ISO times written to the microsecond (truncated) differ from even spacing by up to 1.2e-3 ms
    in float64 epoch ms, over the 1e-3 ms allowed: 54 000 messages for 54 000 samples."""
    import pandas as pd

    from monitor.replay import messages, stamped

    exact = 1_774_000_000_000 + np.arange(1000) * (1000 / 360)
    written = pd.to_datetime(exact, unit="ms").strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # to the microsecond
    ts = pd.to_datetime(written).tz_localize(None).to_numpy().astype("datetime64[ns]").astype("int64") / 1e6  # as read
    bodies = list(messages("ecg", ts, np.zeros((1000, 1)), chunk=100))
    assert len(bodies) == 10
    got = np.concatenate([parse(b, b"ecg").ts_ms for b, _ in bodies])  # type: ignore[union-attr]
    np.testing.assert_array_equal(got, stamped(ts, 100))
    assert np.abs(got - exact).max() <= 1.0


def test_a_dead_letter_carries_the_producers_headers_within_a_bound() -> None:
    """A pipeline owner's pass: a dead letter dropped the producer's trace id. Carried on now, at most 64 KiB of
    them, and none named tsmon.* (a producer cannot fake a dead letter's reason)."""
    from monitor.procstate import DEAD_LETTER_HEADERS, _producers_headers
    from monitor.source import InRecord

    many = [("trace-id", b"t"), ("tsmon.reason", b"fake"), ("TSMON.detail", b"fake")] + \
        [(f"h{i}", b"x" * 1000) for i in range(100)]
    *kept, (marker, dropped) = _producers_headers(InRecord("in", 0, 1, None, b"{", 0, many))
    assert kept[0] == ("trace-id", b"t") and all(not n.lower().startswith("tsmon.") for n, _ in kept)
    assert 50 < len(kept) < 100 and sum(len(n) + len(v) for n, v in kept) <= DEAD_LETTER_HEADERS
    assert marker == "tsmon.headers_dropped" and int(dropped) == 101 - len(kept)
    # one header too large does not cost those after it (an operator pass: a trace id after it was lost)
    big = [("big", b"x" * 70_000), ("trace-id", b"t3")]
    assert _producers_headers(InRecord("in", 0, 1, None, b"{", 0, big)) == [("trace-id", b"t3"),
                                                                             ("tsmon.headers_dropped", b"1")]
    assert _producers_headers(InRecord("in", 0, 1, None, b"{", 0, [("k", None)])) == [("k", b"")]  # (librdkafka)


def test_a_dead_letter_of_many_small_headers_stays_deliverable() -> None:
    """An input-path review: the bound counted only names and values, so 268 150 empty headers counted 0 and were all
    carried on — a dead letter of 1 048 613 bytes from an input record of 1 048 393 the broker took, over the
    producer's max_request_size (undeliverable: the bad record never reached the dead-letter topic). Each header's
    own cost on the wire is counted now."""
    from kafka.record.default_records import DefaultRecordBatchBuilder

    from monitor.procstate import DEAD_LETTER_HEADERS, _producers_headers
    from monitor.source import InRecord

    *kept, (marker, dropped) = _producers_headers(InRecord("in", 0, 1, None, b"{", 0, [("", b"")] * 268_150))
    wire = DefaultRecordBatchBuilder.estimate_size_in_bytes(None, b"", kept)
    assert wire <= DEAD_LETTER_HEADERS and marker == "tsmon.headers_dropped" and int(dropped) == 268_150 - len(kept)


def test_rfc3339_lower_case_t_and_z_are_taken() -> None:
    """The schema's ts is a date-time, RFC 3339, which allows "t" and "z" (refused as bad_timestamp: an input-path
    review)."""
    for stamp in ("2024-05-01t12:00:00.250z", "2024-05-01T12:00:00.250z", "2024-05-01t12:00:00.250+00:00"):
        block = parse(json.dumps({"ts": stamp, "value": 1.0}).encode(), b"s")
        assert isinstance(block, SampleBlock) and int(block.ts_ms[0]) == 1_714_564_800_250, (stamp, block)


def test_every_limit_itself_is_allowed_and_one_past_it_is_not() -> None:
    lim = Limits(max_samples=10, max_channels=3, max_stream_len=5)
    chunk = {"ts": 1, "period_ms": 1}
    assert isinstance(parse(json.dumps({**chunk, "samples": [0.0] * 10}).encode(), b"s", lim), SampleBlock)
    assert parse(json.dumps({**chunk, "samples": [0.0] * 11}).encode(), b"s", lim).reason == "too_many_samples"
    assert isinstance(parse(b'{"ts": 1, "values": [1, 2, 3]}', b"s", lim), SampleBlock)
    assert parse(b'{"ts": 1, "values": [1, 2, 3, 4]}', b"s", lim).reason == "bad_shape"
    assert isinstance(parse(b'{"ts": 1, "value": 1}', b"x" * 5, lim), SampleBlock)
    assert parse(b'{"ts": 1, "value": 1}', b"x" * 6, lim).reason == "bad_stream"


def test_sample_times_end_just_below_max_ts_ms() -> None:
    from monitor.records import MAX_TS_MS

    last = MAX_TS_MS - 1
    assert isinstance(parse(json.dumps({"ts": last, "value": 1}).encode(), b"s"), SampleBlock)
    assert parse(json.dumps({"ts": MAX_TS_MS, "value": 1}).encode(), b"s").reason == "bad_timestamp"
    chunk = {"period_ms": 1, "samples": [1.0, 2.0]}  # its last sample one period after ts
    assert isinstance(parse(json.dumps({**chunk, "ts": last - 1}).encode(), b"s"), SampleBlock)
    assert parse(json.dumps({**chunk, "ts": last}).encode(), b"s").reason == "bad_timestamp"
