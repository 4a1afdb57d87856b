"""Streaming windows equal offline windows, whatever the block boundaries; gaps restart; order is enforced."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.data import make_windows
from monitor.windows import StreamWindows


def series(n: int, channels: int = 2, period: int = 10) -> tuple[np.ndarray, np.ndarray]:
    ts = 1_000 + period * np.arange(n, dtype="int64")
    values = np.random.default_rng(0).normal(size=(n, channels)).astype("float32")
    return ts, values


@pytest.mark.parametrize("window, hop", [(8, 1), (8, 3), (8, 8), (8, 11)])
def test_blocks_of_any_size_give_the_offline_windows(window: int, hop: int) -> None:
    ts, values = series(200)
    expected, ends = make_windows(values, window, hop)
    sw = StreamWindows(window, hop, channels=2)
    rng = np.random.default_rng(1)
    cuts = np.sort(rng.choice(np.arange(1, 200), size=25, replace=False))
    got, got_ts, got_seq = [], [], []
    for lo, hi in zip([0, *cuts], [*cuts, 200]):
        assert sw.check(ts[lo:hi], values[lo:hi]) is None
        w = sw.push(ts[lo:hi], values[lo:hi])
        got.append(w.values), got_ts.append(w.end_ts), got_seq.append(w.end_seq)
    np.testing.assert_array_equal(np.concatenate(got), expected)
    np.testing.assert_array_equal(np.concatenate(got_ts), ts[ends])
    np.testing.assert_array_equal(np.concatenate(got_seq), ends + 1)
    assert sw.restarts == 0 and sw.seen == 200


def test_a_gap_restarts_the_window() -> None:
    ts, values = series(40)
    ts[20:] += 1_000  # a 1 s hole after sample 19
    sw = StreamWindows(8, 4, channels=2, gap_ms=100)
    w = sw.push(ts, values)
    assert sw.restarts == 1
    # before the gap: windows ending at 7, 11, 15, 19; after it the count starts again at 20 → 27, 31, 35, 39
    np.testing.assert_array_equal(w.end_ts, ts[[7, 11, 15, 19, 27, 31, 35, 39]])
    assert not any(((ts[e - 7] < ts[19]) and (ts[e] > ts[20])) for e in [27, 31, 35, 39])  # none spans the gap


def test_gap_between_blocks_also_restarts() -> None:
    ts, values = series(30)
    sw = StreamWindows(8, 8, channels=2, gap_ms=100)
    sw.push(ts[:12], values[:12])
    w = sw.push(ts[12:] + 5_000, values[12:])
    assert sw.restarts == 1 and (w.end_ts == ts[[19, 27]] + 5_000).all()


def test_order_and_channels_are_checked_without_touching_state() -> None:
    ts, values = series(20)
    sw = StreamWindows(8, 2, channels=2)
    sw.push(ts[:10], values[:10])
    assert sw.check(ts[9:12], values[9:12]).startswith("duplicate_timestamp")
    assert sw.check(ts[5:8], values[5:8]).startswith("timestamp_backwards")
    # the last message sent again (a producer's retry): it ends on the stream's last sample — reported as a clock
    # going back when it held more than one sample
    assert sw.check(ts[6:10], values[6:10]).startswith("duplicate_timestamp")
    assert sw.check(ts[10:12], values[10:12, :1]).startswith("channel_mismatch")
    assert sw.seen == 10 and sw.last_ts == ts[9]


def test_state_is_bounded() -> None:
    ts, values = series(5_000)
    sw = StreamWindows(16, 4, channels=2)
    for lo in range(0, 5_000, 100):
        sw.push(ts[lo : lo + 100], values[lo : lo + 100])
    assert sw._tail.shape == (15, 2)  # the last W − 1 samples, nothing more


@pytest.mark.parametrize("window, hop", [(8, 1), (8, 3), (8, 8), (8, 11)])
def test_start_ts_and_needed_from_follow_the_window_grid(window: int, hop: int) -> None:
    ts, values = series(100)
    sw = StreamWindows(window, hop, channels=2)
    assert sw.needed_from == 1
    for lo in range(0, 100, 7):
        w = sw.push(ts[lo : lo + 7], values[lo : lo + 7])
        np.testing.assert_array_equal(w.start_ts, ts[w.end_seq - window])
        # the next window (end_seq e) starts at sample e - window + 1; nothing before it is needed again
        ends = [e for e in range(window, 1000, hop) if e > sw.seen]
        assert sw.needed_from == ends[0] - window + 1


@pytest.mark.parametrize("window, hop", [(8, 1), (8, 3), (8, 7), (12, 5), (8, 8), (4, 10)])
def test_a_replay_aligned_at_the_stored_phase_cuts_the_same_windows(window: int, hop: int) -> None:
    """A new owner replays from the message holding ``phase()``'s sample, which can begin before it; aligned
    there it cuts exactly the windows the first owner had still to cut (hop ≥ window: the next window starts
    on a sample not arrived yet, a number of samples after the last one); unaligned it would not."""
    ts, values = series(200)
    whole = StreamWindows(window, hop, channels=2).push(ts, values)
    for cut in range(window + 3, 120, 7):
        first = StreamWindows(window, hop, channels=2)
        done = first.push(ts[:cut], values[:cut])
        seq, from_ts, skip = first.phase()
        assert from_ts == ts[seq - 1] and (skip == 0) == (seq == first.needed_from)
        for back in (1, 3):  # the replay begins that many samples before the held one (mid-message)
            lo = seq - back
            later = StreamWindows(window, hop, channels=2)
            later.align(from_ts, skip)
            assert later.phase() == (1, from_ts, skip)  # revoked before reaching it: the point is passed on
            got = [later.push(ts[i : i + 5], values[i : i + 5]) for i in range(lo - 1, 200, 5)]
            got_ts = np.concatenate([g.start_ts for g in got])
            np.testing.assert_array_equal(np.concatenate([done.start_ts, got_ts]), whole.start_ts)
            assert later.seen == 200 - (lo - 1)  # the passed-over samples are counted: the ledger's numbers hold
            unaligned = StreamWindows(window, hop, channels=2).push(ts[lo - 1 :], values[lo - 1 :])
            if hop > 1:
                assert unaligned.start_ts[0] != got_ts[0]
    reset = StreamWindows(window, hop, channels=2)
    reset.align(int(ts[50]))
    reset.restart()  # an operator's reset: the next window starts with the next sample, aligned or not
    np.testing.assert_array_equal(reset.push(ts[10:], values[10:]).start_ts[:1], ts[10:11])
    stale = StreamWindows(window, hop, channels=2)
    stale.align(int(ts[50]))  # the replay begins after the stored phase: the state is older than the commit
    np.testing.assert_array_equal(stale.push(ts[60:], values[60:]).start_ts[:1], ts[60:61])


def random_stream(rng: np.random.Generator, trial: int, windows: tuple[int, int], hops: tuple[int, int],
                  lengths: tuple[int, int], cuts: tuple[int, int]) -> tuple[int, int, np.ndarray, np.ndarray,
                                                                   float | None, list[int]]:
    """A random stream for the replay tests: window, hop, timestamps with gaps of 10 among steps of 1, values,
    ``gap_ms`` (every other trial), and message bounds (the samples cut into ``cuts`` messages)."""
    window, hop, n = int(rng.integers(*windows)), int(rng.integers(*hops)), int(rng.integers(*lengths))
    ts = np.cumsum(rng.choice([1, 1, 1, 1, 10], size=n)).astype("int64")
    values = np.arange(n, dtype="float32")[:, None]
    bounds = [0, *sorted(set(rng.integers(1, n, size=int(rng.integers(*cuts))).tolist())), n]
    return window, hop, ts, values, 5 if trial % 2 else None, bounds


def test_an_aligned_replay_restarts_at_a_gap_among_the_samples_it_passes_over() -> None:
    """hop > window: the stored point says to pass over a few samples after the last one; a gap among those
    restarted the first owner's windows at the gap, and the replay's grid used to run on past it (every later
    window, and so alert ids, moved). Random streams, chunkings and snapshot points, with and without gaps."""
    rng = np.random.default_rng(2)
    for trial in range(1500):
        window, hop, ts, values, gap_ms, bounds = random_stream(rng, trial, (2, 7), (1, 12), (5, 60), (1, 6))
        snap = int(rng.integers(1, len(bounds) - 1))  # state saved after message `snap`
        first, after = StreamWindows(window, hop, 1, gap_ms), []
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            w = first.push(ts[lo:hi], values[lo:hi])
            if i == snap - 1:
                seq, from_ts, skip = first.phase()
            elif i >= snap:
                after += w.start_ts.tolist()
        held = max(i for i in range(len(bounds) - 1) if bounds[i] < seq)  # the message holding sample `seq`
        later = StreamWindows(window, hop, 1, gap_ms)
        later.align(from_ts, skip)
        got = [later.push(ts[lo:hi], values[lo:hi]) for lo, hi in itertools.pairwise(bounds[held:])]
        saved_at = ts[bounds[snap] - 1]
        replayed = [int(s) for g in got for s, e in zip(g.start_ts, g.end_ts, strict=True) if e > saved_at]
        assert replayed == after, (window, hop, gap_ms, trial)


def test_a_point_saved_while_aligning_is_found_again_by_the_next_owner() -> None:
    """Owners in a chain: each aligns at the point the previous one saved, reads a few messages and saves in
    turn. A save while it was still passing over samples (hop ≥ window) kept the old timestamp with the skip
    already reduced, and held input only from the next sample: the next owner's grid moved for good (12
    windows missing and 12 that never existed in the delivery review's run). Random streams, chunkings, gaps
    and hand-over points; the windows decided must be the uninterrupted run's."""
    rng = np.random.default_rng(5)
    for trial in range(1500):
        window, hop, ts, values, gap_ms, bounds = random_stream(rng, trial, (2, 6), (1, 14), (20, 80), (3, 12))
        msgs = list(itertools.pairwise(bounds))
        whole = StreamWindows(window, hop, 1, gap_ms).push(ts, values).start_ts.tolist()
        owner, got, point = StreamWindows(window, hop, 1, gap_ms), [], None
        i, decided_until = 0, -1  # next message to read; last sample timestamp whose windows are decided
        base = 0  # samples before the current owner's first one: its sample numbers count from there
        for hand_over in range(6):  # then the last owner reads to the end
            for lo, hi in msgs[i : i + int(rng.integers(1, 4)) if hand_over < 5 else len(msgs)]:
                w = owner.push(ts[lo:hi], values[lo:hi])
                got += [int(s) for s, e in zip(w.start_ts, w.end_ts, strict=True) if e > decided_until]
                decided_until, i = int(ts[hi - 1]), i + 1
            if (now := owner.phase()) is not None:  # nothing read yet: the document saved before stands
                point = (base + now[0], now[1], now[2])
            if point is None or i == len(msgs):
                break
            seq, from_ts, skip = point
            i = max(j for j in range(len(msgs)) if msgs[j][0] < seq)  # replayed from the message holding `seq`
            base = msgs[i][0]
            owner = StreamWindows(window, hop, 1, gap_ms)
            owner.align(from_ts, skip)
        assert got == whole, (window, hop, gap_ms, trial)


@pytest.mark.parametrize("split", [None, 10])  # within one block, and between two
def test_samples_exactly_gap_ms_apart_are_no_gap(split: int | None) -> None:
    """A gap is a spacing *over* gap_ms: a stream whose period equals gap_ms must not restart at every sample (it
    would never complete a window). One millisecond more is a gap (a mutation audit)."""
    for period, restarts in ((100, 0), (101, 19)):
        ts, values = series(20, period=period)
        sw = StreamWindows(4, 1, channels=2, gap_ms=100)
        parts = [slice(0, 20)] if split is None else [slice(0, split), slice(split, 20)]
        n = sum(len(sw.push(ts[p], values[p])) for p in parts)
        assert (sw.restarts, n) == (restarts, 17 if restarts == 0 else 0), period
