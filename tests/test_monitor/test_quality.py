"""Stream data quality: period learning, rate drift, gaps kept out of the rate, per-kind cooldown, flat-lines."""

from __future__ import annotations

import numpy as np

from monitor.quality import GAPS_HINT, KINDS, LEARN_DIFFS, QualityEvent, StreamQuality

PERIOD = 10  # ms


class Feed:
    """Act as the daemon: push blocks of in-order timestamps and collect the events."""

    def __init__(self, q: StreamQuality, gap_ms: float | None = None, t0: int = 1_000_000) -> None:
        self.q, self.gap_ms, self.last = q, gap_ms, None
        self.next = t0

    def block(self, n: int, period: float) -> list[QualityEvent]:
        ts = self.next + (np.arange(n) * period).astype("int64")
        events = self.q.intervals(ts, self.last, self.gap_ms)
        self.last, self.next = int(ts[-1]), int(ts[-1] + period)
        return events

    def learned(self) -> StreamQuality:
        self.block(LEARN_DIFFS + 1, PERIOD)
        assert self.q.period_ms == PERIOD
        return self.q


def quality(**kw: float) -> StreamQuality:
    return StreamQuality("s1", np.ones(2, "float32"), ["a", "b"], **kw)


def test_the_period_is_learned_after_learn_diffs_intervals() -> None:
    q = quality()
    feed = Feed(q)
    assert feed.block(LEARN_DIFFS, PERIOD) == []  # LEARN_DIFFS - 1 intervals
    assert q.period_ms is None
    assert feed.block(1, PERIOD) == []  # the interval to the previous block counts too
    assert q.period_ms == PERIOD


def test_a_rate_drift_gives_one_event_while_it_lasts() -> None:
    q = quality(rate_tolerance=0.25)
    feed = Feed(q)
    feed.learned()
    assert feed.block(64, 12) == []  # +20%: within tolerance
    events = feed.block(64, 20)
    assert len(events) == 1
    e = events[0]
    assert (e.kind, e.stream, e.suppressed, e.channels) == ("rate_drift", "s1", 0, ())
    assert e.ts == feed.last
    assert e.detail == "sample period 20 ms, learned 10 ms (+100%)"
    assert feed.block(64, 20) == [] and feed.block(64, 20) == []  # still drifting: not repeated
    assert q.counts["rate_drift"] == 1


def test_a_new_drift_after_recovery_is_reported_again() -> None:
    q = quality(cooldown_ms=500)
    feed = Feed(q)
    feed.learned()
    assert len(feed.block(64, 20)) == 1
    assert feed.block(64, PERIOD) == []  # recovered
    again = feed.block(64, 5)  # 960 ms after the first event: past the cooldown
    assert [e.kind for e in again] == ["rate_drift"] and again[0].suppressed == 0
    assert again[0].detail.startswith("sample period 5 ms, learned 10 ms (")
    assert q.counts["rate_drift"] == 2


def test_a_faster_rate_is_reported_as_a_negative_change() -> None:
    q = quality()
    feed = Feed(q)
    feed.learned()
    (e,) = feed.block(64, 5)
    assert e.detail == "sample period 5 ms, learned 10 ms (-50%)"


def test_a_new_drift_within_the_cooldown_is_held_back_and_counted() -> None:
    q = quality(cooldown_ms=60_000)
    feed = Feed(q)
    feed.learned()
    first = feed.block(64, 20)
    assert len(first) == 1
    feed.block(64, PERIOD)
    assert feed.block(64, 20) == []  # a new drift 1.9 s later: held back by the cooldown
    assert q.counts["rate_drift"] == 2
    feed.block(64, PERIOD)
    feed.next += 60_000
    third = feed.block(64, 20)  # the 60 s jump is one interval of 60 s among 64: the median ignores it
    assert len(third) == 1 and third[0].suppressed == 1


def test_gaps_are_not_intervals_of_the_rate() -> None:
    ts = 1_000 + PERIOD * np.arange(LEARN_DIFFS + 1, dtype="int64")
    ts[40:] += 5_000  # one gap among the LEARN_DIFFS intervals
    with_gaps = quality()
    with_gaps.intervals(ts, None, 1_000)
    assert with_gaps.period_ms is None  # only LEARN_DIFFS - 1 intervals count
    without = quality()
    without.intervals(ts, None, None)
    assert without.period_ms == PERIOD


def test_many_gaps_do_not_look_like_a_rate_drift() -> None:
    # pairs of samples 10 ms apart, pairs 1 s apart: half of the intervals are gaps
    pairs = np.repeat(np.arange(64, dtype="int64") * 1_000, 2) + np.tile([0, PERIOD], 64)
    for gap_ms, expected in ((100.0, []), (None, ["rate_drift"])):
        q = quality()
        feed = Feed(q, gap_ms=gap_ms)
        feed.learned()
        events = q.intervals(feed.next + 1_000 + pairs, feed.last, gap_ms)
        events += q.intervals(feed.next + 100_000 + pairs, feed.next + 1_000 + int(pairs[-1]), gap_ms)
        assert [e.kind for e in events] == expected, gap_ms


def test_cooldown_holds_back_events_of_the_same_kind_and_counts_them() -> None:
    q = quality(cooldown_ms=60_000)
    (first,) = q.event("gap", 0, "no samples for 9000 ms")
    assert (first.kind, first.ts, first.suppressed, first.detail) == ("gap", 0, 0, "no samples for 9000 ms")
    assert q.event("gap", 59_999, "x") == []
    assert q.event("gap", 30_000, "x") == []
    (late,) = q.event("late", 100, "y")  # another kind has its own cooldown
    assert late.suppressed == 0
    (second,) = q.event("gap", 60_000, "z")
    assert second.suppressed == 2 and second.ts == 60_000
    assert q.event("gap", 119_999, "x") == []  # the cooldown restarts at the last emitted event
    (third,) = q.event("gap", 120_000, "x")
    assert third.suppressed == 1
    assert q.counts == {**dict.fromkeys(KINDS, 0), "gap": 6, "late": 1}


def test_event_id_is_deterministic() -> None:
    a = quality().event("gap", 5_000, "one")[0]
    b = quality().event("gap", 5_000, "other detail")[0]
    assert a.event_id == b.event_id and len(a.event_id) == 20
    assert int(a.event_id, 16) >= 0
    assert QualityEvent("s1", "gap", 5_001, "").event_id != a.event_id
    assert QualityEvent("s1", "late", 5_000, "").event_id != a.event_id
    assert QualityEvent("s2", "gap", 5_000, "").event_id != a.event_id


def test_flat_marks_channels_without_variation_relative_to_scale() -> None:
    q = StreamQuality("s1", np.asarray([500.0, 1.0, 2.0], "float32"), ["a", "b", "c"], flatline_rel_std=1e-3)
    swing = np.asarray([1.0, -1.0, 1.0, -1.0], "float32")  # std exactly 1 × amplitude
    w = np.zeros((3, 4, 3), "float32")
    w[0, :, 0] = 0.5 * swing  # std 0.5 = 1e-3 × 500: flat (≤)
    w[0, :, 1] = 7.0  # stuck: flat
    w[0, :, 2] = 0.5 * swing  # noisy for its scale
    w[1, :, 0] = 0.5001 * swing  # just above
    w[1, :, 1] = 0.0009 * swing + 3.0  # tiny variation under 1e-3 × 1
    w[1, :, 2] = 0.0021 * swing  # above 1e-3 × 2
    w[2] = swing[:, None] * np.asarray([1.0, 0.5, 0.5], "float32")
    np.testing.assert_array_equal(q.flat(w), [[True, True, False], [False, True, False], [False, False, False]])


def test_flat_events_name_the_channels() -> None:
    q = StreamQuality("s1", np.ones(3, "float32"), ["a", "b", "c"], cooldown_ms=1_000)
    flat = np.asarray([[True, False, True], [False, False, False], [False, True, False], [True, True, True]])
    events = q.flat_events(flat, np.asarray([10_000, 11_000, 12_000, 12_500], "int64"))
    assert [(e.kind, e.ts, e.channels, e.detail) for e in events] == [
        ("flatline", 10_000, ("a", "c"), ("no variation on a, c: the stream's windows are not scored until it varies "
                                          "again")),
        ("flatline", 12_000, ("b",), "no variation on b: the stream's windows are not scored until it varies again"),
    ]  # the last row is within the cooldown of the one before
    assert q.counts["flatline"] == 3
    assert q.flat_events(np.zeros((2, 3), bool), np.asarray([20_000, 21_000])) == []
    (later,) = q.flat_events(flat[3:], np.asarray([13_000], "int64"), open_alert="91ec6067")
    assert later.suppressed == 1 and later.channels == ("a", "b", "c")
    # from the on-call pass: an alert open when a channel stuck never resolved, and nothing said why
    assert later.detail.endswith("the stream's windows are not scored; alert 91ec6067 stays open, neither resolved nor "
                                 "raised, until it varies again")


def test_the_flat_line_test_of_an_unnormalised_model_is_relative_to_the_training_spread() -> None:
    """With --normalisation none the scale is 1: the test was absolute (std ≤ 1e-3), and a live channel of std 3e-4
    was flat in every window — never scored, flatline events on normal data. The artifact now keeps the spread."""
    from models.scaling import Scaler
    from monitor.quality import flat_channels

    rng = np.random.default_rng(0)
    train = rng.normal(0.0, 3e-4, size=(200, 40, 2))
    for method in ("none", "standard"):
        scaler = Scaler.fit(train, method)
        live = rng.normal(0.0, 3e-4, size=(10, 40, 2))
        stuck = np.full((1, 40, 2), 0.5)
        flat = flat_channels(np.concatenate([live, stuck]), np.asarray(scaler.flat_scale), 1e-3)
        assert not flat[:10].any() and flat[10].all(), method
        assert Scaler.from_dict(scaler.to_dict()) == scaler  # the spread survives the artifact


def test_a_channel_of_tiny_units_is_scaled_by_its_own_spread_and_is_not_flat() -> None:
    """A spread under 1e-8 (a strain gauge in metres, a current in amperes) was taken for a constant channel: scale
    1, and the daemon's flat-line test, relative to it, found every live window flat — the stream was never scored.
    A channel is constant when its spread is nothing or float32 rounding of its level."""
    from models.scaling import Scaler
    from monitor.quality import flat_channels

    rng = np.random.default_rng(1)
    train = np.stack([rng.normal(0.0, 1e-9, (100, 40)), 1e6 + rng.normal(0.0, 0.5, (100, 40)),
                      np.full((100, 40), 1e6), np.zeros((100, 40))], axis=-1).astype("float32")
    for method in ("standard", "robust", "none"):
        scaler = Scaler.fit(train, method)
        if method != "none":
            assert 5e-10 < scaler.scale[0] < 2e-9 and 0.2 < scaler.scale[1] < 1.0, method
            assert scaler.scale[2:] == (1.0, 1.0), method  # constant: left as it is, not divided by ~0
        live = np.stack([rng.normal(0.0, 1e-9, (5, 40)), 1e6 + rng.normal(0.0, 0.5, (5, 40))], axis=-1)
        flat = flat_channels(live.astype("float32"), np.asarray(scaler.flat_scale[:2], "float32"), 1e-3)
        assert not flat.any(), method


def test_the_cooldown_holds_back_late_findings_for_a_minute_of_their_own_time_either_way() -> None:
    """Late samples go back in time: after one was reported, a day of backfilled older samples all fell "within the
    cooldown" (their time minus the last report's was negative) and produced no event for the whole day."""
    q = StreamQuality("s", np.ones(1, "float32"), ["ch0"])
    now = 1_700_000_000_000
    out = q.event("late", now - 1_000, "one late sample")
    for k in range(3_600):  # then an hour of older data, 1 Hz
        out += q.event("late", now - 86_400_000 + k * 1000, "backfill")
    assert len(out) == 1 + 60 and q.counts["late"] == 3_601


def test_a_stream_sampled_more_slowly_than_gap_ms_is_told_so() -> None:
    """A 5-minute sensor at the default gap_ms (5 s): every sample restarted its windows, none ever completed, and each
    gap event said only "no samples for 300000 ms" (499 of them for 500 samples). After GAPS_HINT gaps in a row the
    event says what to set; a stream with one real gap among regular samples is not told."""
    q = quality()
    slow = 1_000_000 + 300_000 * np.arange(20, dtype="int64")
    events = q.timing(slow[:12], None, 5_000, 5_000) + q.timing(slow[12:], int(slow[11]), 5_000, 5_000)
    hinted = ["set gap_ms" in e.detail for e in events]
    assert len(events) == 19 and hinted == [False] * (GAPS_HINT - 1) + [True] * (20 - GAPS_HINT)
    assert "its last 19 intervals" in events[-1].detail
    # "in a row" across blocks: a block that begins with gaps goes on from the last one's run, and one that ends
    # with samples in time ends it (the run was reset before a block with any interval under gap_ms, and kept after)
    def blocks(*shapes: tuple[int, int]) -> list[QualityEvent]:
        q, at, events = quality(), 1_000_000, []
        for gaps, regular in shapes:
            block = at + np.concatenate([300_000 * np.arange(1, gaps + 1),
                                         300_000 * gaps + PERIOD * np.arange(1, regular + 1)])
            events = q.timing(block, at, 5_000, 5_000)
            at = int(block[-1])
        return events

    assert "set gap_ms" in blocks((GAPS_HINT - 2, 0), (2, 3))[-1].detail  # the GAPS_HINT-th in a row
    assert "set gap_ms" not in blocks((GAPS_HINT - 1, 1), (1, 0))[-1].detail  # the first after a regular interval
    q = quality()
    ts = 1_000 + PERIOD * np.arange(200, dtype="int64")
    ts[100:] += 60_000  # a real gap
    for _ in range(GAPS_HINT + 1):
        events = q.timing(ts, None, 5_000, 5_000)
        assert [e.detail for e in events] == ["no samples for 60010 ms (1.0 min)"]  # (and in minutes, from 1)
        ts = ts + 200_000
    from monitor.quality import _readable

    assert (_readable(50_000), _readable(18_001_000), _readable(3 * 86_400_000)) == ("", " (5.0 h)", " (3.0 d)")
    assert (_readable(3_599_999), _readable(59_999)) == (" (1.0 h)", " (1.0 min)")  # not "60.0 min", "0 …"


def test_a_rate_drift_is_found_and_stamped_alike_however_the_samples_are_grouped() -> None:
    """Checked once per block on its last 64 intervals, the event's time (and id, which consumers deduplicate by)
    depended on how records fell into polls (…019980, …011580, …010980 for polls of 50, 3 and 1 records; the
    observability review), and a slowdown inside one block went unseen. Every 64 intervals now, counted across
    blocks from the poll that taught the period, judged at the sample that completes them (that poll is the same
    here each time: its size sets where the count starts, and a restart starts it again)."""
    ts = 1_000_000 + np.cumsum(np.r_[0, np.full(500, PERIOD), np.full(200, 2 * PERIOD), np.full(500, PERIOD)])
    found = []
    for size in (1000, 50, 7, 1):
        q = quality()
        events, last = q.intervals(ts[: LEARN_DIFFS + 1], None, None), int(ts[LEARN_DIFFS])
        for i in range(LEARN_DIFFS + 1, len(ts), size):
            events += q.intervals(ts[i : i + size], last, None)
            last = int(ts[min(i + size, len(ts)) - 1])
        found.append([(e.kind, e.ts, e.event_id) for e in events])
    assert found[0] == found[1] == found[2] == found[3] and [k for k, *_ in found[0]] == ["rate_drift"]


def test_changes_of_a_streams_state_are_never_held_back() -> None:
    # a sensor that came back for a few seconds and died again within the cooldown: its second `silent` is said
    q = quality(cooldown_ms=60_000)
    for kind in ("silent", "resumed", "stale"):
        assert [len(q.event(kind, t, "x")) for t in (0, 1_000, 2_000)] == [1, 1, 1], kind
    assert [len(q.event("gap", t, "x")) for t in (0, 1_000)] == [1, 0]  # a throttled kind, for contrast


def test_a_gap_is_stamped_at_the_sample_after_it_and_an_interval_of_exactly_gap_ms_is_none() -> None:
    q = quality(cooldown_ms=0)  # nothing held back: every gap found is an event
    ts = np.asarray([0, 10, 20, 1_000, 1_010, 1_110], "int64")  # 980 ms without samples, then exactly 100
    events = q.timing(ts, None, 100, None)
    assert [(e.kind, e.ts) for e in events] == [("gap", 1_000)]
    events = quality(cooldown_ms=0).timing(ts[3:], 20, 100, None)  # the same gap across blocks
    assert [(e.kind, e.ts) for e in events] == [("gap", 1_000)]


def test_intervals_of_exactly_the_rate_gap_teach_the_period() -> None:
    q = quality()
    ts = 1_000 + PERIOD * np.arange(LEARN_DIFFS + 1, dtype="int64")
    q.timing(ts, None, None, PERIOD)
    assert q.period_ms == PERIOD


def test_a_channel_as_steady_as_the_flat_line_bound_in_training_is_not_flat() -> None:
    from monitor.quality import flat_channels

    windows = np.ones((1, 8, 2), "float32")  # both channels constant
    flat = flat_channels(windows, np.ones(2), 1e-3, window_spread=(1e-3, 0.5))
    assert flat.tolist() == [[False, True]]


def test_the_first_event_id_of_a_kind_at_a_time_is_pinned() -> None:
    # consumers deduplicate on the id: the first one's formula is the one of earlier versions (no "|0")
    import hashlib

    e = QualityEvent("s1", "gap", 1_000, "x")
    assert e.event_id == hashlib.sha256(b"s1|gap|1000").hexdigest()[:20]
    assert QualityEvent("s1", "gap", 1_000, "x", nth=2).event_id == hashlib.sha256(b"s1|gap|1000|2").hexdigest()[:20]
