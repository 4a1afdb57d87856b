"""Offset ledger: commit the oldest needed message per partition, release by sample number, drop on revoke."""

from __future__ import annotations

import pytest

from monitor.ledger import OffsetLedger

P0, P1 = ("in", 0), ("in", 1)


def test_nothing_held_commits_past_the_last_record_read() -> None:
    led = OffsetLedger()
    assert led.committable() == {}
    led.consumed(P0, 7)
    assert led.committable() == {P0: 8}
    led.consumed(P0, 3)  # an older offset never moves it back
    assert led.committable() == {P0: 8}


def test_consumed_alone_advances_the_commit() -> None:
    led = OffsetLedger()
    for off in range(5):
        led.consumed(P0, off)
        assert led.committable() == {P0: off + 1}


def test_the_oldest_held_message_is_committed() -> None:
    led = OffsetLedger()
    led.hold(P0, "a", 10, last_seq=5)
    led.hold(P0, "a", 11, last_seq=9)
    led.consumed(P0, 12)  # e.g. a dead letter after them
    assert led.committable() == {P0: 10}


def test_release_frees_messages_whose_samples_all_come_before_seq() -> None:
    led = OffsetLedger()
    led.hold(P0, "a", 10, last_seq=5)  # samples 1-5
    led.hold(P0, "a", 11, last_seq=9)  # samples 6-9
    led.hold(P0, "a", 12, last_seq=12)  # samples 10-12
    led.release("a", 5)  # sample 5 still needed → message 10 still needed
    assert led.committable() == {P0: 10}
    led.release("a", 6)
    assert led.committable() == {P0: 11}
    led.release("a", 3)  # releasing is monotonic
    assert led.committable() == {P0: 11}
    led.release("a", 12)
    assert led.committable() == {P0: 12}
    led.release("a", 13)
    assert led.committable() == {P0: 13}


def test_two_streams_on_one_partition_commit_the_older_of_both() -> None:
    led = OffsetLedger()
    led.hold(P0, "a", 0, last_seq=4)
    led.hold(P0, "b", 1, last_seq=4)
    led.hold(P0, "a", 2, last_seq=8)
    led.hold(P0, "b", 3, last_seq=8)
    led.release("a", 5)
    assert led.committable() == {P0: 1}  # "b" still needs offset 1
    led.release("b", 9)
    assert led.committable() == {P0: 2}
    led.release("a", 9)
    assert led.committable() == {P0: 4}


def test_holding_names_what_each_stream_keeps_from_the_commit() -> None:
    """A pipeline owner saw a partition's commit held 3 000 records back, and lag 0 for every stream: which one?"""
    led = OffsetLedger()
    led.hold(P0, "quiet", 0, last_seq=0)  # one sample of a window, then nothing
    for off in range(1, 101):
        led.hold(P0, "busy", off, last_seq=off)
    led.release("busy", 99)  # all but its last message scored
    led.hold(P1, "busy", 7, last_seq=101)
    assert led.committable() == {P0: 0, P1: 7}
    assert (led.holding("quiet"), led.holding("busy"), led.holding("unknown")) == (101, 2 + 1, 0)
    led.release("quiet", 1)
    assert led.holding("quiet") == 0 and led.committable()[P0] == 99


def test_partitions_are_independent() -> None:
    led = OffsetLedger()
    led.hold(P0, "a", 100, last_seq=3)
    led.hold(P1, "b", 7, last_seq=3)
    led.release("b", 4)
    assert led.committable() == {P0: 100, P1: 8}


def test_committable_filters_partitions() -> None:
    led = OffsetLedger()
    led.hold(P0, "a", 100, last_seq=3)
    led.consumed(P1, 7)
    assert led.committable({P1}) == {P1: 8}
    assert led.committable({P0, ("other", 0)}) == {P0: 100}
    assert led.committable(set()) == {}


def test_offset_of_maps_a_sample_to_its_message() -> None:
    led = OffsetLedger()
    led.hold(P0, "a", 10, last_seq=5)
    led.hold(P0, "a", 11, last_seq=9)
    led.hold(P0, "b", 12, last_seq=2)
    assert led.offset_of("a", 1) == (P0, 10)
    assert led.offset_of("a", 5) == (P0, 10)
    assert led.offset_of("a", 6) == (P0, 11)
    assert led.offset_of("a", 9) == (P0, 11)
    assert led.offset_of("a", 10) is None  # not received yet
    assert led.offset_of("b", 1) == (P0, 12)
    assert led.offset_of("nobody", 1) is None
    led.release("a", 6)
    assert led.offset_of("a", 7) == (P0, 11)


@pytest.mark.parametrize("order", [(P0, P1), (P1, P0)])
def test_offset_of_a_stream_on_two_partitions_names_the_message_that_carried_the_sample(order: tuple) -> None:
    """Keyless messages of one stream spread over partitions: each partition's numbers have gaps, and the first
    partition that reached the sample (by the order of a set) was named: the alert's source pointed at another
    message (in-process fuzzing)."""
    led = OffsetLedger()
    first, second = order
    for k in range(6):  # messages of 10 samples, alternating: samples 0-9 on `first`, 10-19 on `second`, …
        led.hold(first if k % 2 == 0 else second, "a", 100 + k // 2, last_seq=10 * k + 9)
    for seq in range(60):
        k = seq // 10
        assert led.offset_of("a", seq) == (first if k % 2 == 0 else second, 100 + k // 2), seq
    # a message dropped from one partition's list may have carried it: not known, not a later one of the other
    # partition (review: samples 300-399's message was named for sample 10)
    led = OffsetLedger()
    for k in range(300):
        led.hold(first, "b", k, last_seq=k)
    led.hold(second, "b", 0, last_seq=399)
    led.release("b", 350)
    assert led.offset_of("b", 10) is None and led.offset_of("b", 360) == (second, 0)


def test_drop_forgets_partitions_and_returns_their_streams() -> None:
    led = OffsetLedger()
    led.hold(P0, "a", 0, last_seq=1)
    led.hold(P0, "b", 1, last_seq=1)
    led.hold(P1, "c", 0, last_seq=1)
    assert led.drop({P0}) == {"a", "b"}
    assert led.committable() == {P1: 0}
    assert led.offset_of("a", 1) is None
    led.release("a", 5)  # no error for a forgotten stream
    assert led.drop({P0}) == set()
    assert led.drop({P1}) == {"c"}
    assert led.committable() == {}


def test_a_stream_on_two_partitions_survives_dropping_one() -> None:
    led = OffsetLedger()
    led.hold(P0, "a", 3, last_seq=2)
    led.hold(P1, "a", 9, last_seq=4)
    assert led.drop({P0}) == {"a"}
    assert led.offset_of("a", 3) == (P1, 9)
    led.release("a", 5)
    assert led.committable() == {P1: 10}


def test_answers_stay_right_through_compaction() -> None:
    led = OffsetLedger()
    n = 5000
    for i in range(n):  # message i carries samples 3i+1 … 3i+3 at offset 1000 + 2i (another stream owns the odd ones)
        led.hold(P0, "a", 1000 + 2 * i, last_seq=3 * i + 3)
        led.consumed(P0, 1001 + 2 * i)
    assert led.committable() == {P0: 1000}
    for i in range(0, n, 7):  # release up to (and keeping) the message that carries sample 3i+1
        led.release("a", 3 * i + 1)
        assert led.committable() == {P0: 1000 + 2 * i}
        assert led.offset_of("a", 3 * i + 2) == (P0, 1000 + 2 * i)
        if i + 1 < n:
            assert led.offset_of("a", 3 * (i + 1) + 3) == (P0, 1002 + 2 * i)
    assert len(led._held[P0]["a"].offsets) < n  # white box: the released entries were compacted away
    led.hold(P0, "a", 1000 + 2 * n, last_seq=3 * n + 3)  # still appends correctly after compaction
    led.release("a", 3 * n)
    assert led.committable() == {P0: 1000 + 2 * (n - 1)}
    assert led.offset_of("a", 3 * n + 1) == (P0, 1000 + 2 * n)
    led.release("a", 3 * n + 4)
    assert led.committable() == {P0: 1000 + 2 * n + 1}


def test_a_released_message_is_still_named_until_it_is_dropped() -> None:
    """An episode longer than max_hold_windows has its first samples released: its alert named the oldest
    message still held as its first_offset (161 for 97 in a review), not the one that carried them."""
    led = OffsetLedger()
    for i in range(3000):
        led.hold(P0, "a", 100 + i, last_seq=10 * (i + 1))  # message 100 + i carries samples 10i+1 .. 10i+10
    led.release("a", 55)
    assert led.committable() == {P0: 105} and led.offset_of("a", 21) == (P0, 102)  # released, still known
    led.release("a", 20_000)  # past half of them: the released ones are dropped
    assert led.committable() == {P0: 100 + 1999} and led.offset_of("a", 21) is None  # unknown, not wrong
    assert led.offset_of("a", 20_000) == (P0, 100 + 1999)


def test_the_bookkeeping_of_single_sample_messages_stays_small_per_stream() -> None:
    """With one sample a message it kept 1 024 released messages a stream in Python lists, ~74 kB a stream (more
    than all the rest of its state: 725 MB for 10 000 streams). Deterministic (tracemalloc), not timed."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ledger = OffsetLedger()
    for s in range(50):
        for i in range(3000):  # window 140, hop 35: released up to the next window's start
            ledger.hold(("t", 0), f"dev-{s}", s * 3000 + i, i)
            if i % 35 == 0 and i > 140:
                ledger.release(f"dev-{s}", i - 140)
    gc.collect()
    per_stream = (tracemalloc.get_traced_memory()[0] - before) / 50
    tracemalloc.stop()
    assert per_stream < 12_000, per_stream
    assert ledger.offset_of("dev-7", 2990) == (("t", 0), 7 * 3000 + 2990)  # what is needed is still known


def test_the_last_sample_of_the_dropped_messages_is_not_known_either() -> None:
    # the message that carried sample dropped_seq itself was dropped: on another partition a later message reaching
    # that number must not be named for it (the boundary of the review case above)
    led = OffsetLedger()
    for k in range(300):
        led.hold(P0, "b", k, last_seq=k)
    led.hold(P1, "b", 0, last_seq=399)
    led.release("b", 290)  # drops the messages carrying samples 0 … 289
    assert led._held[P0]["b"].dropped_seq == 289  # white box: the boundary this test is about
    assert led.offset_of("b", 289) is None and led.offset_of("b", 290) == (P0, 290)


def test_records_read_past_with_no_commit_yet_count_from_where_reading_began() -> None:
    led = OffsetLedger()
    for off in range(10, 20):
        led.consumed(P0, off)
    assert led.read_past({}, {P0, P1}) == {P0: 10}  # a crash now reads all ten again; P1: nothing read
    assert led.read_past({P0: 15}, {P0}) == {P0: 5}
