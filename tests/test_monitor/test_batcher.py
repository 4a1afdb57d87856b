"""Micro-batching: release by size, age or force; one model per batch; per-stream order; splits; accounting."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.batcher import Batcher
from monitor.windows import Windows


class Clock:
    """A fake monotonic clock the test moves by hand (in binary fractions of a second, so sums are exact)."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def wins(first_seq: int, k: int, window: int = 4, channels: int = 2) -> Windows:
    """``k`` windows whose end_seq are first_seq … first_seq+k-1; values and timestamps derived from it."""
    seq = np.arange(first_seq, first_seq + k, dtype="int64")
    values = np.broadcast_to(seq[:, None, None], (k, window, channels)).astype("float32")
    return Windows(values, seq * 10 - 30, seq * 10, seq)


def make(max_batch: int = 4, max_delay_ms: float = 500.0) -> tuple[Batcher, Clock]:
    clock = Clock()
    return Batcher(max_batch, max_delay_ms, clock=clock), clock


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Batcher(0, 10)
    with pytest.raises(ValueError):
        Batcher(1, -1)


def test_nothing_is_released_before_size_or_age() -> None:
    b, clock = make(max_batch=4, max_delay_ms=500)
    b.add("m", "s", wins(1, 3))
    clock.t += 0.4990234375
    assert b.ready() == []
    assert b.size == 3


def test_released_by_size_with_exactly_max_batch_rows() -> None:
    b, _ = make(max_batch=4)
    b.add("m", "a", wins(1, 3))
    b.add("m", "b", wins(101, 3))
    batches = b.ready()
    assert len(batches) == 1
    batch = batches[0]
    assert len(batch) == 4 and batch.values.shape == (4, 4, 2)
    assert batch.streams == ["a", "a", "a", "b"]
    np.testing.assert_array_equal(batch.end_seq, [1, 2, 3, 101])
    np.testing.assert_array_equal(batch.end_ts, [10, 20, 30, 1010])
    np.testing.assert_array_equal(batch.start_ts, [-20, -10, 0, 980])
    np.testing.assert_array_equal(batch.values[:, 0, 0], [1, 2, 3, 101])
    assert b.size == 2  # the two remaining windows of "b" wait (not due by size nor age)


def test_released_by_age_with_the_oldest_wait() -> None:
    b, clock = make(max_batch=10, max_delay_ms=500)
    b.add("m", "a", wins(1, 2))
    clock.t += 0.25
    b.add("m", "b", wins(11, 1))
    clock.t += 0.25  # the head has waited exactly 500 ms
    batches = b.ready()
    assert len(batches) == 1
    assert batches[0].streams == ["a", "a", "b"]
    assert batches[0].oldest_wait_s == 0.5
    assert b.size == 0 and b.ready() == []


def test_force_releases_everything() -> None:
    b, _ = make(max_batch=3, max_delay_ms=10_000)
    b.add("m1", "a", wins(1, 2))
    b.add("m2", "b", wins(1, 1))
    assert b.ready() == []
    batches = b.ready(force=True)
    assert sorted((x.model, len(x)) for x in batches) == [("m1", 2), ("m2", 1)]
    assert b.size == 0 and b.wait_s() is None


def test_a_batch_never_mixes_models() -> None:
    b, _ = make(max_batch=4)
    b.add("m1", "a", wins(1, 2))
    b.add("m2", "b", wins(1, 2, window=6, channels=3))
    b.add("m1", "c", wins(1, 2))
    b.add("m2", "d", wins(1, 2, window=6, channels=3))
    batches = {x.model: x for x in b.ready()}
    assert set(batches) == {"m1", "m2"}
    assert batches["m1"].streams == ["a", "a", "c", "c"] and batches["m1"].values.shape == (4, 4, 2)
    assert batches["m2"].streams == ["b", "b", "d", "d"] and batches["m2"].values.shape == (4, 6, 3)


def test_per_stream_order_is_kept_across_batches() -> None:
    b, _ = make(max_batch=3)
    for first in (1, 3, 5, 7):
        b.add("m", "a", wins(first, 2))
        b.add("m", "b", wins(100 + first, 2))
    rows = [(s, int(q)) for x in b.ready(force=True) for s, q in zip(x.streams, x.end_seq)]
    assert [q for s, q in rows if s == "a"] == list(range(1, 9))
    assert [q for s, q in rows if s == "b"] == list(range(101, 109))
    assert len(rows) == 16


def test_a_large_job_is_split_and_the_rest_stays_at_the_head() -> None:
    b, clock = make(max_batch=4, max_delay_ms=500)
    b.add("m", "a", wins(1, 6))
    clock.t += 0.125
    b.add("m", "b", wins(101, 1))
    first = b.ready()
    assert len(first) == 1 and first[0].streams == ["a"] * 4
    np.testing.assert_array_equal(first[0].end_seq, [1, 2, 3, 4])
    assert b.size == 3
    assert b.wait_s() == 0.375
    clock.t += 0.375  # the rest of "a" keeps the enqueue time of its job: due by age now (500 ms)
    assert b.wait_s() == 0.0
    second = b.ready()
    assert len(second) == 1 and second[0].streams == ["a", "a", "b"]
    np.testing.assert_array_equal(second[0].end_seq, [5, 6, 101])
    assert second[0].oldest_wait_s == 0.5
    assert b.size == 0


def test_a_job_several_times_max_batch_is_released_in_full_batches() -> None:
    b, _ = make(max_batch=4)
    b.add("m", "a", wins(1, 9))
    batches = b.ready()
    assert [len(x) for x in batches] == [4, 4]
    np.testing.assert_array_equal(np.concatenate([x.end_seq for x in batches]), np.arange(1, 9))
    assert b.size == 1
    last = b.ready(force=True)
    assert len(last) == 1 and last[0].end_seq.tolist() == [9]


def test_size_counts_windows_of_all_models() -> None:
    b, _ = make(max_batch=100)
    assert b.size == 0
    b.add("m1", "a", wins(1, 3))
    b.add("m2", "a", wins(1, 5))
    b.add("m1", "b", wins(1, 2))
    assert b.size == 10
    b.ready(force=True)
    assert b.size == 0


def test_wait_s() -> None:
    b, clock = make(max_batch=100, max_delay_ms=500)
    assert b.wait_s() is None
    b.add("m1", "a", wins(1, 1))
    clock.t += 0.125
    b.add("m2", "b", wins(1, 1))
    assert b.wait_s() == 0.375  # the oldest head of all queues decides
    clock.t += 0.25
    assert b.wait_s() == 0.125
    clock.t += 0.5
    assert b.wait_s() == 0.0  # overdue: never negative
    b.ready()
    assert b.wait_s() is None


def test_empty_windows_are_ignored() -> None:
    b, clock = make(max_batch=1, max_delay_ms=0)
    b.add("m", "a", wins(1, 0))
    assert b.size == 0 and b.wait_s() is None
    clock.t += 1
    assert b.ready() == [] and b.ready(force=True) == []


# ---- adaptive batching (latency target) ---------------------------------------------------------------------------


def test_cost_model_recovers_a_fixed_and_a_per_window_cost() -> None:
    from monitor.batcher import CostModel

    c = CostModel()
    assert not c.known and c.largest(0.01, 512) == 512  # nothing learnt: no cap below max_batch
    for n in (1, 100, 50, 1, 100):
        c.observe(n, 0.001 + 0.0001 * n)
    a, b = c.coefficients()
    assert a == pytest.approx(0.001, rel=1e-6) and b == pytest.approx(0.0001, rel=1e-6)
    assert c.predict(200) == pytest.approx(0.021)
    assert c.largest(0.005, 1000) == 40 and c.largest(0.5, 1000) == 1000 and c.largest(0.0001, 1000) == 1
    c.observe(10, float("nan"))  # a broken timing teaches nothing
    assert c.coefficients() == pytest.approx((a, b))


def test_cost_model_with_one_batch_size_is_proportional() -> None:
    from monitor.batcher import CostModel

    c = CostModel()
    c.observe(64, 0.0064)
    assert c.coefficients() == pytest.approx((0.0, 0.0001)) and c.largest(0.0032, 256) == 32


def adaptive(target_ms: float = 30.0, max_batch: int = 256, max_delay_ms: float = 500.0) -> tuple[Batcher, Clock]:
    clock = Clock()
    b = Batcher(max_batch, max_delay_ms, clock=clock, latency_target_ms=target_ms)
    for n in (1, 64, 256):  # learnt cost: 1 ms + 0.0625 ms per window (binary fractions: exact)
        b.observed("m", n, 0.0009765625 + n * 0.00006103515625)
    return b, clock


def test_adaptive_releases_a_tenth_of_the_target_after_arrival_when_the_scorer_is_idle() -> None:
    b, clock = adaptive(target_ms=32.0)  # idle linger 3.2 ms
    b.add("m", "s", wins(1, 3))
    assert b.idle_wait_s() == pytest.approx(0.0032) and b.ready(idle=True) == []
    clock.t += 0.00390625
    assert b.ready(idle=False) == []  # busy: the windows wait for company
    assert b.idle_wait_s() == 0.0
    [batch] = b.ready(idle=True)
    assert len(batch) == 3 and b.size == 0 and b.idle_wait_s() is None
    fixed, clock = make()
    fixed.add("m", "s", wins(1, 3))
    clock.t += 0.25
    assert fixed.ready(idle=True) == [] and fixed.idle_wait_s() is None  # the fixed policy waits for size or age


def test_adaptive_batches_grow_to_what_a_third_of_the_target_allows() -> None:
    b, _ = adaptive(target_ms=30.0)  # 10 ms budget: (10 - 0.977) / 0.061 = 147 windows
    assert b.limit("m") == 147
    b.add("m", "s", wins(1, 400))
    sizes = [len(x) for x in b.ready()]
    assert sizes == [147, 147] and b.size == 400 - 294  # the rest is not due yet
    fixed = Batcher(256, 500.0, clock=Clock())
    fixed.observed("m", 256, 1.0)  # a fixed batcher learns but does not change its size
    assert fixed.limit("m") == 256


def test_adaptive_releases_before_waiting_longer_would_break_the_target() -> None:
    b, clock = adaptive(target_ms=30.0)
    b.add("m", "s", wins(1, 10))  # 10 windows cost 1.6 ms: due once waited 30 - 2 × 1.6 = 26.8 ms
    assert b.wait_s() == pytest.approx(0.030 - 2 * (0.0009765625 + 10 * 0.00006103515625))
    clock.t += 0.025
    assert b.ready() == []
    clock.t += 0.002
    assert [len(x) for x in b.ready()] == [10]


def test_room_caps_the_batches_released() -> None:
    b, _ = make(max_batch=2)
    b.add("m", "s", wins(1, 6))
    assert len(b.ready(room=1)) == 1 and b.size == 4
    assert b.ready(room=0) == [] and len(b.ready()) == 2


def test_a_backlog_is_drained_in_full_batches() -> None:
    b, _ = adaptive(target_ms=30.0)  # limit 147
    b.add("m", "s", wins(1, 4 * 147 + 10))
    sizes = [len(x) for x in b.ready()]
    assert sizes == [256, 147, 147] and b.size == 48  # below the backlog: the target's size again


def test_a_backlog_below_max_batch_goes_at_once() -> None:
    # limit 147, backlog from 588: 600 waiting with max_batch 1024 were held until their age (the size
    # trigger compared them with max_batch), while 587 went out at once
    clock = Clock()
    b = Batcher(1024, 500.0, clock=clock, latency_target_ms=30.0)
    for n in (1, 64, 256):
        b.observed("m", n, 0.0009765625 + n * 0.00006103515625)
    b.add("m", "s", wins(1, 600))
    assert [len(x) for x in b.ready(room=1)] == [600] and b.size == 0


def test_one_models_full_batches_do_not_starve_another_models_queue() -> None:
    # the queues were taken in a fixed order up to `room`: A filling two batches a turn kept B's one window
    # waiting for good, though it was due by age
    b, clock = make(max_batch=4, max_delay_ms=5.0)
    b.add("A", "a", wins(1, 8))
    b.add("B", "b", wins(1, 1))
    seq = 9
    released = []
    for _ in range(4):
        clock.t += 0.0078125
        released += [x.model for x in b.ready(room=2)]
        b.add("A", "a", wins(seq, 8))
        seq += 8
    assert released[:4] == ["A", "A", "B", "A"]  # B (due, older than A's new windows) goes in the second turn


def test_an_idle_scorer_takes_one_queue_the_others_wait_their_turn() -> None:
    # "the first waiting queue goes at once": an idle scorer is busy again after one batch, so the next model's
    # windows (not due by size or age) wait for the next idle turn instead of queueing behind it now
    b, clock = adaptive(target_ms=32.0)
    for n in (1, 64, 256):
        b.observed("n", n, 0.0009765625 + n * 0.00006103515625)
    b.add("m", "s", wins(1, 3))
    b.add("n", "t", wins(11, 3))
    clock.t += 0.00390625  # past both queues' idle linger (3.2 ms), far from their size and age
    [first] = b.ready(idle=True)
    assert first.model == "m" and b.size == 3
    [second] = b.ready(idle=True)
    assert second.model == "n" and b.size == 0


def test_the_idle_linger_never_exceeds_max_delay() -> None:
    b, _ = adaptive(target_ms=1000.0, max_delay_ms=4.0)  # a tenth of the target (100 ms) is past max_delay_ms
    b.add("m", "s", wins(1, 3))
    assert b.idle_wait_s() == pytest.approx(0.004)


def test_the_cost_model_never_fits_a_negative_fixed_cost() -> None:
    # timings whose line crosses below zero (a pass of 1 window cheaper per window than one of 10): the fit would give
    # a < 0 and predict a negative time for small batches; it falls back to seconds per window
    from monitor.batcher import CostModel

    c = CostModel()
    for n, s in ((1, 0.0001), (10, 0.01), (1, 0.0001), (10, 0.01)):
        c.observe(n, s)
    a, b = c.coefficients()
    assert a == 0.0 and b > 0 and c.predict(1) > 0
