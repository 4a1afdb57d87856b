"""The data path from records to published alerts: parse → windows → batcher → scorer → calibrator → alerts.

Owns per-stream state and the order of the at-least-once contract inside one consumer:

1. every record ends in exactly one place: a stream's windows (its samples held in the ledger), or the
   dead-letter topic with the reason (never dropped, never an exception out of :meth:`handle`);
2. windows are scored in micro-batches by a scoring backend (a worker thread or a process of its own,
   :mod:`monitor.scoring`) while the next records are parsed; results are applied on the caller's thread
   in submission order:
   each updates the stream's alert state and, if normal, the calibrator; transitions go to the sink;
3. :meth:`commit` flushes the sink (every alert, event and dead letter acknowledged by the broker), then sends
   the state documents saved since and flushes again (a document says its alerts were published), then the
   operators' acknowledgements (:mod:`monitor.outbox`), and only then commits, per partition, the oldest offset
   whose samples are still needed.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, NoReturn

import numpy as np

from models.errors import BrokerError, ScoringStuck, SinkBackpressure, describe
from monitor import logs, windows
from monitor.alerts import UNKNOWN_SOURCE, AlertSettings, AlertState, Observation, Step, Transition, alert_doc, iso
from monitor.batcher import Batch, Batcher
from monitor.calibrator import MAX_QUANTILE, Calibrator
from monitor.ledger import OffsetLedger
from monitor.metrics import Metrics
from monitor.outbox import Outbox
from monitor.quality import QualityEvent, StreamQuality, flat_channels
from monitor.records import BadRecord, Limits, SampleBlock, parse
from monitor.scorer import Scorer, Served
from monitor.scoring import Backend, Result, ThreadBackend
from monitor.sink import OutMessage, Sink, json_message
from monitor.source import TP, InRecord, Source
from monitor.streams import BehindRun, StreamState, doc_partitions, holds_commitments, open_alert_unsilenced, owes_page
from monitor.windows import order_problem

log = logs.get("tsmon.processor")
RESERVED_PREFIX = "__tsmon"  # changelog keys of daemon-wide state
SECONDS_LOOK_LIKE_MS = 100_000_000_000  # 1973-03-03 in ms; epoch seconds of any date before 5138 are below it
FLUSH_SLICE_S = 0.25  # a commit waits for the sink in slices of this: a deadline set meanwhile applies at the next
WAKE_RESERVE = 0.1  # share of limits.max_streams that streams woken for a command leave to new streams
DEAD_LETTER_MAX = 512 * 1024  # a bad record longer than this is dead-lettered truncated …
DEAD_LETTER_KEEP = 64 * 1024  # … to its first bytes (the source offset header names the whole record)
DEAD_LETTER_KEY_KEEP = 4096  # a longer key is cut to this many bytes (or 4 × limits.max_stream_len, if more)


@dataclass(frozen=True, slots=True)
class Settings:
    alerts_topic: str = "tsmon.alerts"
    dead_letter_topic: str = "tsmon.dead-letter"
    gap_ms: float | None = 5000.0
    alerts: AlertSettings = field(default_factory=AlertSettings)
    flatline_rel_std: float = 1e-3
    rate_tolerance: float = 0.25
    quality_cooldown_ms: float = 60_000
    max_hold_windows: int = 1000
    limits: Limits = field(default_factory=Limits)
    flush_timeout_s: float = 10.0
    max_inflight: int = 2  # batches submitted to the scoring thread and not yet applied
    scoring_timeout_s: float = 60.0  # a batch not scored by then is stuck (ScoringStuck): the daemon stops
    state_topic: str | None = None  # changelog of stream states; None = not persisted
    max_streams: int = 10_000  # streams held at once
    idle_evict_s: float | None = 3600.0  # silent this long: snapshotted and dropped from memory
    max_future_s: float | None = None  # samples stamped further ahead of the clock are dead-lettered (daemon: 1 h)
    earliest_ms: int | None = None  # samples stamped before are dead-lettered (daemon: 2000-01-01)
    recent_alerts: int = 20  # alerts per stream remembered for feedback
    gap_periods: float | None = None  # an interval over this many learnt sample periods is a gap too (opt-in)
    model_quantile: bool = False  # each stream calibrated at its model's threshold quantile (no quantile configured)
    forget_after_s: float | None = None  # a document not written for this long is forgotten (:meth:`forget_dormant`)
    max_documents: int | None = None  # documents of streams not held kept at most (the least recently written go)
    clock_step_s: float | None = None  # new input behind the stream this long (its own time): its clock was set back



def _slow_max(prev: float | None, now: float) -> float:
    """The largest rate seen, decaying by a tenth per poll: quick to learn that records grew, slow to forget."""
    return now if prev is None else max(now, 0.9 * prev)


@dataclass
class DataClock:
    """Calls ``tick(stream)`` every ``every_ms`` of each stream's own time, between the windows of a batch:
    a stream is recalibrated only when its own data moved on (never on another stream's evidence)."""

    every_ms: float
    tick: Callable[[list[str]], None]
    next_ms: dict[str, float] = field(default_factory=dict)

    def due(self, stream: str, ts_ms: int) -> bool:
        if stream not in self.next_ms:
            self.next_ms[stream] = ts_ms + self.every_ms
        return ts_ms >= self.next_ms[stream]

    def fire(self, stream: str, ts_ms: int) -> None:
        self.next_ms[stream] = ts_ms + self.every_ms
        self.tick([stream])

    def forget(self, stream: str) -> None:
        self.next_ms.pop(stream, None)


def learn(calibrator: Calibrator, stream: str, step: Step, score: float, normal: list[float]) -> None:
    """What one window's alert step teaches the calibrator: a normal error joins ``normal`` (fed per batch by
    the caller); censored noise (windows before this one) flushes it first, so the calibrator's window stays
    in arrival order."""
    if step.censored:
        calibrator.observe(stream, np.asarray(normal))
        normal.clear()
        calibrator.observe_censored(stream, step.censored, step.above)
    if step.normal:
        normal.append(score)


class Processor:
    def __init__(self, scorer: Scorer, calibrator: Calibrator, batcher: Batcher, sink: Sink,
                 metrics: Metrics | None = None, settings: Settings = Settings(),
                 backend: Backend | None = None) -> None:
        self.scorer, self.calibrator, self.batcher, self.sink = scorer, calibrator, batcher, sink
        self.metrics = metrics or Metrics()
        self.settings = settings
        self.ledger = OffsetLedger()
        self.streams: dict[str, StreamState] = {}
        self._committed: dict[TP, int] = {}
        self.first_record_at: float | None = None  # monotonic time the first record arrived (benchmarks)
        self._backend = backend or ThreadBackend(scorer)
        self._inflight: deque[tuple[Batch, Future[Result], float]] = deque()  # with the monotonic submit time
        self.stuck = False  # a scoring call never returned: the backend is closed without waiting for it
        # a batch whose scoring raised: its windows are lost to this process, so from then on nothing is applied,
        # snapshotted or committed past them (the shutdown and the revoke did both: the restart never replayed them)
        self.failed: str | None = None
        self.restored: dict[str, dict[str, Any]] = {}  # changelog documents of streams not started yet
        self.metrics.documents.set_function(lambda: len(self.restored))  # as it is when scraped (replaced whole too)
        self.read_ts: dict[TP, int] = {}  # per partition, the newest timestamp of the records taken (_moved_on)
        self.knocked: dict[str, int] = {}  # streams with a document refused for want of room: when, last (epoch ms)
        self.evicted: set[str] = set()  # streams this instance evicted since its last assignment (see wake)
        self.evicted_here: set[str] = set()  # those of them evicted by evict_idle (not adopted): no input replayed
        self.owed: dict[str, int] = {}  # evicted with a silenced alert open: silence end (epoch ms), page owed
        self.undocumented: set[str] = set()  # started since the last commit: their first document goes with it
        self.outbox = Outbox()  # state documents, then operators' acknowledgements: sent by the next commit
        self.unpersisted: set[str] = set()  # ids of commands whose documents a failed revoke dropped (see revoke)
        self._owed_warned: set[str] = set()
        self.throttle = logs.Throttle()  # per-record, per-window and per-stream events: a sample in the log
        self.clock = time.time  # wall clock: silences and state timestamps
        self.deadline: float | None = None  # monotonic time by which commits must be done (set at shutdown)
        self.scoring_deadline: float | None = None  # by which scoring must be done (the shutdown's drain)
        # windows a good record makes (samples / hop; decays slowly from the largest seen): sizes the next
        # poll. None until a record told (the daemon's first polls take one record each).
        self.windows_per_record: float | None = None
        # the same per byte of message: messages of another size make windows in proportion to their bytes, not
        # their number (hands a poll's records over in slices that fit, see Daemon._hand_over)
        self.windows_per_byte: float | None = None
        self.data_clock: DataClock | None = None  # calibrator.clock = "data": recalibrations between windows
        self.peak_pending = 0  # most windows waiting right after a poll was handled (benchmarks, tests)
        # called after each batch is applied: (batch, wall-clock ms of the decision, scoring seconds)
        self.on_decided: Callable[[Batch, float, float], None] | None = None

    @property
    def pending(self) -> int:
        """Windows not yet scored and applied (waiting in the batcher or on the scoring thread)."""
        return self.batcher.size + sum(len(b) for b, _, _ in self._inflight)

    # 1. records → windows -------------------------------------------------------------------------
    def handle(self, records: list[InRecord]) -> None:
        """Route each record; then, per stream, append all its good blocks of this poll in one go."""
        if records and self.first_record_at is None:
            self.first_record_at = time.monotonic()
        by_stream: dict[str, list[tuple[InRecord, SampleBlock]]] = {}
        for rec in records:
            try:
                block = parse(rec.value, rec.key, self.settings.limits)
            except Exception as exc:  # noqa: BLE001 — a parser bug must cost one message, never the daemon
                self.throttle.log(log.error, "parse_failed", error=describe(exc)[:300],
                                  topic=rec.topic, partition=rec.partition, offset=rec.offset)
                block = BadRecord("unparseable", describe(exc)[:200])
            why = self._route(block) if isinstance(block, SampleBlock) else block
            if why is not None:
                self._dead_letter(rec, why)
            else:
                by_stream.setdefault(block.stream, []).append((rec, block))  # type: ignore[union-attr]
        made = sum(self._append_or_dead_letter(stream, items) for stream, items in by_stream.items())  # windows
        good = sum(len(items) for items in by_stream.values())
        if good:  # dead letters make no windows and tell nothing about the next records' size
            size = sum(len(rec.value or b"") for items in by_stream.values() for rec, _ in items)
            self.windows_per_record = _slow_max(self.windows_per_record, made / good)
            self.windows_per_byte = _slow_max(self.windows_per_byte, made / max(1, size))
        self.peak_pending = max(self.peak_pending, self.pending)

    def _moved_on(self, st: StreamState, taken: Iterable[InRecord], now_ms: int) -> None:
        """How far the records taken for ``st`` moved its input on: per partition, the offset of the last one (for
        its document's ``read_offsets``), and the newest timestamp (:meth:`forget_dormant`): a dead letter's
        timestamp tells nothing, and one stamped past the clock's tolerance is ignored, not capped (one garbage
        timestamp made a partition look 8 days on and forgot streams whose records were still waiting)."""
        limit = now_ms + (self.settings.max_future_s or 3600.0) * 1000
        for rec in taken:
            st.read_until[rec.tp] = max(rec.offset, st.read_until.get(rec.tp, -1))
            if self.read_ts.get(rec.tp, -1) < rec.timestamp_ms <= limit:
                self.read_ts[rec.tp] = min(rec.timestamp_ms, now_ms)

    def _route(self, block: SampleBlock) -> BadRecord | None:
        served = self.scorer.route(block.stream)
        if served is None:
            return BadRecord("no_model", f"no [[models]] pattern matches stream {block.stream[:64]!r}")
        if block.channels != served.channels:
            return BadRecord("channel_mismatch", f"model {served.name} takes {served.channels} channel(s), "
                                                 f"the message has {block.channels}")
        if block.stream not in self.streams:  # checks for a new stream only, not on every message
            if block.stream.startswith(RESERVED_PREFIX):
                return BadRecord("reserved_stream", f"stream ids starting with {RESERVED_PREFIX!r} are tsmon's own")
            if len(self.streams) >= self.settings.max_streams:
                if block.stream in self.restored:  # it is sending: not unseen (forget_dormant), and its document is
                    self.knocked[block.stream] = int(self.clock() * 1000)  # all the state it has left
                return BadRecord("too_many_streams", f"{len(self.streams)} streams held (limits.max_streams); "
                                                     "idle ones are evicted after limits.idle_evict_s")
            self._new_stream(block.stream, served)
        return None

    def _append_or_dead_letter(self, stream: str, items: list[tuple[InRecord, SampleBlock]]) -> float:
        """:meth:`_append`; a failure we did not foresee costs these records (dead letters ``unprocessable``,
        logged as an error), never the daemon: an exception here stopped the loop, and at the restart the same
        records stopped it again. Records already dead-lettered or counted are not again (a failure after the
        order check dead-lettered a late record twice and counted the others as ok and as dead letters);
        samples already taken into the stream's windows stay there."""
        done: set[int] = set()  # id() of the records accounted for
        try:
            return self._append(stream, items, done)
        except Exception as exc:
            if self.failed is not None:  # scoring failed (a clock step scores what waits): the daemon's, not theirs
                raise
            why = describe(exc)
            log.error("append_failed", stream=stream[:64], error=why[:300])
            for rec, _block in items:
                if id(rec) not in done:
                    self._dead_letter(rec, BadRecord("unprocessable", why[:200]))
            return 0.0

    def _append(self, stream: str, items: list[tuple[InRecord, SampleBlock]], done: set[int]) -> float:
        """Order-check the blocks, then window, hold and batch them together (vectorised per poll); returns
        the windows their samples make at the stream's hop (counted whether or not one completed yet)."""
        st = self.streams[stream]
        st.last_seen = time.monotonic()
        last, good, made = st.windows.last_ts, [], 0.0
        ahead_s, now_ms = self.settings.max_future_s, self.clock() * 1000
        latest_ok = math.inf if ahead_s is None else now_ms + ahead_s * 1000
        earliest = self.settings.earliest_ms
        for rec, block in items:
            if earliest is not None and int(block.ts_ms[0]) < earliest:  # seconds read as ms: January 1970
                t0 = int(block.ts_ms[0])
                first = datetime.fromtimestamp(t0 / 1000, UTC).isoformat(timespec="seconds")
                hint = ("epoch seconds? ts is epoch milliseconds" if t0 < SECONDS_LOOK_LIKE_MS else
                        "historical data: set limits.earliest_ts earlier, or none")
                self._dead_letter(rec, BadRecord("timestamp_too_early", f"ts {t0} is {first}, before "
                                                 f"limits.earliest_ts ({hint})"))
                done.add(id(rec))
                continue
            if int(block.ts_ms[-1]) > latest_ok:  # taken, it would make every later sample "backwards" until then
                ahead = (int(block.ts_ms[-1]) - now_ms) / 1000
                self._dead_letter(rec, BadRecord("timestamp_in_future", f"{ahead:.0f} s ahead of this host's "
                                                 f"clock (limits.max_future_s = {ahead_s:g})"))
                done.add(id(rec))
                continue
            if rec.offset < st.time_from.get(rec.tp, -1) and not st.is_new(rec.tp, rec.offset):  # a replay from
                # before a clock step the state is past: the old time, which the new time's windows must not take
                self.ledger.consumed(rec.tp, rec.offset)
                self.metrics.records.labels("ok").inc()
                done.add(id(rec))
                continue
            behind = last
            if st.doc_last_ts is not None and st.is_new(rec.tp, rec.offset):  # new input follows the document's
                behind = st.doc_last_ts if last is None else max(last, st.doc_last_ts)
            refused = order_problem(int(block.ts_ms[0]), behind, int(block.ts_ms[-1]))
            if refused is not None and behind is not None and int(block.ts_ms[-1]) > behind:
                block, hole, refused = *self._overlap(st, block, behind, good), None  # goes on after the last one
                if hole:  # the samples dropped are a gap
                    made += self._take(stream, st, good, done, now_ms)
                    good = []
                    st.windows.break_at(int(block.ts_ms[0]))
            reason, _, detail = (refused or "").partition(": ")
            if reason == "timestamp_backwards" and self._set_back(st, rec, block, now_ms, behind):
                made += self._take(stream, st, good, done, now_ms)  # those before the step, in the old time
                good = []
                st.time_from[rec.tp] = rec.offset  # before the step's document is saved: it must say where
                self._clock_step(stream, st, behind)
                refused = None
            if refused is None:
                good.append((rec, block))
                last = int(block.ts_ms[-1])
                st.behind_run = None
                continue
            kind = "duplicate" if reason == "duplicate_timestamp" else "late"
            run = st.behind_run
            if kind == "late" and run is not None and behind is not None and self.settings.clock_step_s is not None:
                detail = (f"{(behind - int(block.ts_ms[0])) / 1000:.1f} s behind the stream's last sample "
                          f"({iso(behind)}); behind it for {(run.last_ts - run.first_ts) / 1000:.1f} s of their own "
                          f"time so far: a clock set back? after windows.clock_step_s "
                          f"({self.settings.clock_step_s:g} s) the stream restarts at their time ({detail})")
            self._quality(st.quality.event(kind, int(block.ts_ms[0]), detail))
            self._dead_letter(rec, BadRecord(reason, detail))
            done.add(id(rec))
        return made + self._take(stream, st, good, done, now_ms)

    def _take(self, stream: str, st: StreamState, good: list[tuple[InRecord, SampleBlock]], done: set[int],
              now_ms: float) -> float:
        """Window, hold and batch the stream's blocks that passed the order check; returns the windows their samples
        make at the stream's hop."""
        if not good:
            return 0.0
        ts = np.concatenate([b.ts_ms for _, b in good]) if len(good) > 1 else good[0][1].ts_ms
        values = np.concatenate([b.values for _, b in good]) if len(good) > 1 else good[0][1].values
        base = self._base_gap_ms(st.served)
        st.windows.gap_ms = self._gap_ms(st, base)
        self._quality(st.quality.timing(ts, st.windows.last_ts, st.windows.gap_ms, base))
        seen = st.windows.seen
        w = st.windows.push(ts, values)
        for (rec, block), last_seq in zip(good, seen + np.cumsum([len(b.ts_ms) for _, b in good]), strict=True):
            self.ledger.hold(rec.tp, stream, rec.offset, int(last_seq))
        self.batcher.add(st.served.name, stream, w)
        st.unscored.extend(zip((w.end_seq - st.served.window + 1).tolist(), w.start_ts.tolist(), strict=True))
        self._release(stream, st)
        self.metrics.records.labels("ok").inc(len(good))
        self.metrics.samples.inc(len(ts))
        done.update(id(rec) for rec, _ in good)
        self._moved_on(st, (rec for rec, _ in good), int(now_ms))
        return len(ts) / st.served.hop

    def _overlap(self, st: StreamState, block: SampleBlock, behind: int,
                 taken: list[tuple[InRecord, SampleBlock]]) -> tuple[SampleBlock, bool]:
        """The samples of ``block`` after the stream's last one (at ``behind``), and whether the windows must restart
        before them. Those at or before it are dropped, counted and reported: ``duplicate`` when the stream still
        holds the same samples at their times (a message sent again, longer than the last: no restart), else ``late``.
        Chunks whose ``period_ms`` is a little long (128 Hz sent as 8 ms) overlap the next one: whole, every other
        chunk was dead-lettered as going back, and the windows spliced the chunks kept across the holes, which paged.
        Samples lost so are a hole of their number (plus one) of the chunk's own period, judged by the stream's gap
        rule — but the windows restart there only if the rest of the chunk fills a window: restarted at every
        message, a stream of shorter ones was never scored."""
        keep = block.ts_ms > behind
        n, dropped = len(keep), int(len(keep) - np.count_nonzero(keep))
        span = int(block.ts_ms[-1] - block.ts_ms[0])
        lost_ts, lost = block.ts_ms[~keep], block.values[~keep]
        held_ts, held = self._held(st, taken, int(lost_ts[0]))
        oldest = held_ts[0] if len(held_ts) else np.iinfo("int64").max  # nothing held (back from eviction): none
        lost_ts, lost = lost_ts[lost_ts >= oldest], lost[lost_ts >= oldest]  # those older than what is held cannot be
        # compared: judged by the rest (a long resend)
        at = np.searchsorted(held_ts, lost_ts).clip(max=max(0, len(held_ts) - 1))
        resent = bool(len(lost_ts) and (held_ts[at] == lost_ts).all()
                      and np.array_equal(held[at], lost))  # the same samples, not just the same times
        self.metrics.overlapped.inc(dropped)
        what = "sent again" if resent else "overlapping chunks — is period_ms right?"
        self._quality(st.quality.event("duplicate" if resent else "late", int(block.ts_ms[0]), (
            f"{dropped} sample(s) of a chunk of {n} at or before the stream's last one ({iso(behind)}) dropped, the "
            f"rest taken: {what} ({n} samples spanning {span} ms, starting {behind - int(block.ts_ms[0])} ms before "
            "the last sample)")))
        period = span / max(1, n - 1)  # the chunk's own
        gap = self._gap_ms(st, self._base_gap_ms(st.served), period)
        hole = not resent and gap is not None and (dropped + 1) * period > gap and n - dropped >= st.served.window
        return replace(block, ts_ms=block.ts_ms[keep], values=block.values[keep]), hole

    @staticmethod
    def _held(st: StreamState, taken: list[tuple[InRecord, SampleBlock]], since: int) -> tuple[np.ndarray, np.ndarray]:
        """The samples the stream holds from ``since`` on: the last blocks of this poll taken so far, back to the one
        that reaches ``since``, and before them its windows' tail (only as far back as needed: every overlapping chunk
        of a stream with a long period_ms concatenated the whole poll's blocks again)."""
        parts = []
        for _, b in reversed(taken):
            parts.append((b.ts_ms, b.values))
            if b.ts_ms[0] <= since:
                break
        else:
            tail_ts, tail = st.windows.recent()
            parts.append((tail_ts, tail.reshape(len(tail_ts), st.windows.channels)))
        parts.reverse()
        return np.concatenate([t for t, _ in parts]), np.concatenate([v for _, v in parts])

    def _set_back(self, st: StreamState, rec: InRecord, block: SampleBlock, now_ms: float, behind: int | None) -> bool:
        """Count a block refused as behind the stream into its run of such blocks (:class:`BehindRun`); True once the
        run has lasted ``clock_step_s`` of its own time and was produced over at least half of that: the stream's clock
        was set back (a device's clock corrected by NTP, or reset at a reboot), not a late message nor a buffer sent
        again at once (a store-and-forward gateway's two minutes, resent in a second, would have restarted the stream
        on them). Produced over: by the records' Kafka timestamps where they are times of production; where one is
        missing, or is its first sample's time (a producer stamping records with event time), by this host's clock
        as they are taken — so such a stream's clock step read while catching up is taken once it is live. And only
        while the time it went back from is still ahead of this host's clock: a clock that ran fast, corrected. Behind
        a time that has passed, the run is history sent again (an upstream's replay from a checkpoint, a backfill):
        taken for a step, it paged an old incident a second time under a new id (regression review)."""
        first, end = int(block.ts_ms[0]), int(block.ts_ms[-1])
        run, produce_time = st.behind_run, rec.timestamp_ms > 0 and rec.timestamp_ms != first
        if run is None or first < run.first_ts:  # further back than the run began: a run of its own
            run = BehindRun(first, end, 1, rec.timestamp_ms, now_ms, produce_time)
        elif end > run.last_ts:  # it goes on (chunks that overlap, as a period_ms a little long makes them, too)
            run = BehindRun(run.first_ts, end, run.records + 1, run.first_produced, run.first_read,
                            run.produce_times and produce_time)
        # else a message sent again inside the run: it neither ends nor moves it (a producer's retries did both)
        st.behind_run = run
        if self.settings.clock_step_s is None:
            return False
        step_ms = self.settings.clock_step_s * 1000
        produced = rec.timestamp_ms - run.first_produced if run.produce_times else now_ms - run.first_read
        ahead = behind is not None and behind > now_ms
        return ahead and end - run.first_ts >= step_ms and produced >= step_ms / 2

    def _clock_step(self, stream: str, st: StreamState, was: int | None) -> None:
        """Restart a stream whose clock was set back at its new time: what waits is scored first, an open alert is
        resolved (``clock_step``), and its windows, order point, alert state and data-clock schedule start again —
        its alerts in a new generation, so that their ids cannot meet those of the old time. Its calibration stays
        (it counts windows, not time). Before, its samples were dead-lettered until its clock passed the old time."""
        run = st.behind_run
        first, refused = (run.first_ts, run.records) if run is not None else (0, 1)
        self.score_ready(force=True)
        self._end_episode(stream, st, clock_step=True)
        st.windows.set_back()
        st.quality.set_back()
        st.doc_last_ts, st.applied_until_ts, st.last_window_ts, st.behind_run, st.dirty = None, -1, -1, None, True
        if self.data_clock is not None:
            self.data_clock.forget(stream)
        back_s = ((was or first) - first) / 1000
        detail = (f"its samples went back {back_s:.0f} s (to {iso(first)}) and stayed behind for "
                  f"{self.settings.clock_step_s:g} s (windows.clock_step_s): its clock was set back? restarted at the "
                  f"new time; {refused - 1} record(s) dead-lettered meanwhile")
        self._quality(st.quality.event("clock_step", first, detail))
        log.warning("clock_step", stream=stream[:64], back_s=round(back_s, 3), dead_lettered=refused - 1)
        self._release(stream, st)
        self.save(stream)  # with the next commit, not the next snapshot: a crash before it stepped again elsewhere

    def _end_episode(self, stream: str, st: StreamState, **why: Any) -> str | None:
        """Resolve an open alert for ``why`` (not the stream's windows) and start its alert state again, in a new
        generation so that later ids cannot meet the old ones. Returns the resolved alert's id."""
        ep = st.alerts.episode
        fired = ep is not None and ep.fired is not None
        if fired:
            self.publish_alert(stream, st, Transition("resolved", ep), **why)
        st.alerts = AlertState(stream, st.served.identity, self.alert_settings(st.served),
                               generation=st.alerts.generation + 1)
        st.dirty = True
        return ep.alert_id if fired else None

    def _base_gap_ms(self, served: Served) -> float | None:
        """The route's ``gap_ms``, else the daemon's."""
        return served.gap_ms if served.gap_ms is not None else self.settings.gap_ms

    def _gap_ms(self, st: StreamState, base: float | None, period: float | None = None) -> float | None:
        """The longest interval that is not a gap: ``base`` (the route's or daemon's ``gap_ms``), or with ``gap_periods``
        set (the route's, else the daemon's), that many of the stream's sample periods once learnt (the recent period while the rate has drifted:
        learnt once, a rate that fell made every interval a gap), whichever is shorter. With ``gap_ms`` alone a
        130 ms dropout of a 100 Hz stream joined two phases of its signal inside windows, which paged. ``period``:
        the one to use while none is learnt."""
        k = st.served.gap_periods if st.served.gap_periods is not None else self.settings.gap_periods
        period = st.quality.current_period_ms or period
        if k is None or not period:  # off, or not learnt yet
            return base
        return k * period if base is None else min(base, k * period)

    def _new_stream(self, stream: str, served: Served) -> StreamState:
        s, det = self.settings, served.detector
        self.calibrator.register(stream, det.threshold.value, thin=max(1, served.window // served.hop),
                                 quantile=min(det.threshold.quantile, MAX_QUANTILE) if s.model_quantile else None)
        st = StreamState(
            served, windows.for_stream(det.windowing, served.window, served.hop, served.channels,
                                       self._base_gap_ms(served)),
            StreamQuality(stream, np.asarray(det.scaler.flat_scale, "float32"), det.channel_names, s.flatline_rel_std,
                          s.rate_tolerance, s.quality_cooldown_ms,
                          on_finding=lambda kind: self.metrics.quality.labels(kind).inc()),
            AlertState(stream, served.identity, self.alert_settings(served)), recent_alerts=deque(maxlen=s.recent_alerts))
        if s.state_topic is not None:  # until its first document (sent with the next commit), a replay after a
            st.doc_from_seq = 1       # crash must begin where this instance began reading it: the state it
            self.undocumented.add(stream)  # started from (restored or the artifact's) is the latest there is
            # (the commit ran past a restored document's point, and a crash then lost the windows in between,
            # their evidence and the alert ids that followed)
        replayed = stream not in self.evicted_here  # its input was released at the eviction: none comes again
        self._unevict(stream)
        restored = self._restore(stream, st, replayed)
        state = self.calibrator.threshold(stream)
        self.throttle.log(log.info, "stream_started", stream=stream, model=served.name, window=served.window,
                          hop=served.hop, threshold=state.value, threshold_source=state.source,
                          threshold_version=state.version, restored=restored)
        self.streams[stream] = st
        self.metrics.streams.set(len(self.streams))
        return st

    def _restore(self, stream: str, st: StreamState, replayed: bool = True) -> str | None:
        doc = self.restored.pop(stream, None)
        self.knocked.pop(stream, None)
        if doc is None:
            return None
        try:
            how = st.restore(stream, doc, self.calibrator, replayed)
        except Exception as exc:  # noqa: BLE001 — a bad document (compaction keeps it) must not stop the stream
            log.error("state_restore_failed", stream=stream, error=describe(exc))
            return "failed"
        at = doc.get("recalibrate_at_ts")  # absent: written on the wall clock, or by an earlier version
        if how == "evidence_unreadable":
            log.warning("state_evidence_unreadable", stream=stream, consequence="threshold, controls and alert "
                        "state restored; the calibrator learns its evidence again")
        if how != "controls" and self.data_clock is not None and isinstance(at, int | float) and math.isfinite(at):
            self.data_clock.next_ms[stream] = float(at)
        if st.orphan is not None:  # paged under the model version it replaced: never leave that page open
            names = doc.get("channels")  # the old model's (the new one's named another model's channels)
            names = names if isinstance(names, list) and all(isinstance(n, str) for n in names) else []
            self.publish_alert(stream, st, Transition("resolved", st.orphan), remember=False, names=names, reset=True,
                               model_changed=True, model=doc["model"])  # its errors are on the old model's scale
            st.orphan = None
        return how

    def _release(self, stream: str, st: StreamState) -> None:
        """Let the ledger forget input that no future window and no open episode needs."""
        point = st.windows.phase()  # the next window's start, or for hop ≥ window the last sample (its phase)
        seqs = [point[0] if point is not None else st.windows.needed_from]
        if st.unscored:
            seqs.append(st.unscored[0][0])
        limit = self.settings.max_hold_windows * st.served.hop
        for hold in (st.alerts.hold_seq, st.doc_from_seq):  # an open episode; where the stored state resumes
            if hold is not None and st.windows.seen - hold <= limit:
                seqs.append(hold)
        self.ledger.release(stream, min(seqs))

    # 2. batches → scores → alerts -----------------------------------------------------------------
    def score_ready(self, force: bool = False) -> int:
        """Apply finished results (in order), then submit the batches that are due while a scoring slot is
        free; returns the windows applied. Never blocks unless ``force``: then every waiting window is
        scored and applied (revoke, shutdown). What cannot be submitted waits in the batcher, which the
        daemon bounds by pausing its input (:attr:`pending`)."""
        if self.failed is not None:
            return 0
        n = self._apply_done()
        if force:
            for batch in self.batcher.ready(force=True):
                while len(self._inflight) >= self.settings.max_inflight:  # bounded: wait for the oldest
                    n += self._apply(*self._inflight.popleft())
                self._submit(batch)
            while self._inflight:
                n += self._apply(*self._inflight.popleft())
            return n
        room = self.settings.max_inflight - len(self._inflight)
        for batch in self.batcher.ready(idle=not self._inflight, room=max(0, room)):
            self._submit(batch)
        return n

    def wait_scored(self, timeout_s: float) -> None:
        """Block until the oldest batch in flight is scored, or while none is, until the next batch is due
        (at most ``timeout_s`` either way)."""
        if self._inflight:
            futures.wait([self._inflight[0][1]], timeout=max(0.0, timeout_s))
        else:
            time.sleep(max(0.0, min(timeout_s, self.batcher.wait_s() or 0.0)))

    def _apply_done(self) -> int:
        n = 0
        while self._inflight and self._inflight[0][1].done():
            n += self._apply(*self._inflight.popleft())
        return n

    def _submit(self, batch: Batch) -> None:
        self._inflight.append((batch, self._backend.submit(batch.model, batch.values), time.monotonic()))

    def check_stuck(self) -> None:
        """Raise :class:`ScoringStuck` once the oldest batch in flight has run past ``scoring_timeout_s`` (the loop
        asks every turn: waiting on it never blocks there, so a hung call went unnoticed while the loop turned)."""
        if self._inflight and not self._inflight[0][1].done():
            batch, _, since = self._inflight[0]
            if time.monotonic() - since > self.settings.scoring_timeout_s:
                self._stuck(batch)

    @property
    def scoring_busy(self) -> bool:
        """A batch is being scored (its result not applied yet)."""
        return bool(self._inflight)

    def _stuck(self, batch: Batch, shutting_down: bool = False) -> NoReturn:
        self.stuck = True
        self.failed = (f"scoring stuck: a batch of {len(batch)} windows of model {batch.model} has not returned "
                       + ("by the end of the shutdown's drain (daemon.shutdown_timeout_s)" if shutting_down else
                          f"in {self.settings.scoring_timeout_s:g} s (daemon.scoring_timeout_s)"))
        log.error("scoring_stuck", error=self.failed, consequence="nothing applied, snapshotted or committed from "
                  "now on; the process exits for its supervisor to restart it, which replays from the last commit")
        raise ScoringStuck(self.failed)

    def _apply(self, batch: Batch, future: Future[Result], since: float) -> int:
        limit = since + self.settings.scoring_timeout_s
        if self.scoring_deadline is not None:
            limit = min(limit, self.scoring_deadline)
        try:  # a scoring failure surfaces here, on our thread; a call that never returns, after the timeout
            window_err, channel_err, seconds = future.result(timeout=max(0.0, limit - time.monotonic()))
        except Exception as exc:
            if not future.done():  # not a failure of the call: it is still running
                self._stuck(batch, shutting_down=limit < since + self.settings.scoring_timeout_s)
            self.failed = describe(exc)[:300]
            log.error("scoring_failed", error=self.failed, windows=len(batch),
                      consequence="nothing applied, snapshotted or committed from now on: the next start replays "
                                  "from the last commit")
            raise
        if self._inflight:  # the next batch waited behind this one: its time counts from now
            head_batch, head_future, head_since = self._inflight[0]
            self._inflight[0] = (head_batch, head_future, max(head_since, time.monotonic()))
        self.metrics.batch_seconds.observe(seconds)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.windows.labels(batch.model).inc(len(batch))
        self.batcher.observed(batch.model, len(batch), seconds)
        self._after_scoring(batch, window_err, channel_err)
        decided_ms = self.clock() * 1000
        self.metrics.event_lag.observe(max(0.0, (decided_ms - float(batch.end_ts.min())) / 1000))
        if self.on_decided is not None:
            self.on_decided(batch, decided_ms, seconds)
        return len(batch)

    def close(self) -> None:
        self._backend.close(wait=not self.stuck)

    def _after_scoring(self, batch: Batch, window_err: np.ndarray, channel_err: np.ndarray) -> None:
        served = self.scorer.models[batch.model]
        scaler = served.detector.scaler
        flat = flat_channels(batch.values, np.asarray(scaler.flat_scale, "float32"), self.settings.flatline_rel_std,
                             scaler.window_spread)  # one pass for the whole batch
        touched: dict[str, StreamState] = {}
        normal: dict[str, list[float]] = {}  # per stream, fed to the calibrator once per batch, in order
        every: dict[str, list[float]] = {}  # all finite errors per stream, for the drift guard
        clock = self.data_clock
        for i, stream in enumerate(batch.streams):
            if clock is not None and clock.due(stream, int(batch.end_ts[i])):  # on what came before, in order
                self._feed_calibrator(normal, every)
                clock.fire(stream, int(batch.end_ts[i]))
            st = self.streams.get(stream)
            if st is None:  # its partition was revoked while the window waited; the new owner replays it
                continue
            st.unscored.popleft()
            touched[stream] = st
            if int(batch.end_ts[i]) <= st.applied_until_ts:  # already in the restored state
                self.metrics.skipped.labels("restored").inc()
                continue
            if flat[i].any():
                self.metrics.skipped.labels("flatline").inc()
                self._quality(st.quality.flat_events(flat[i : i + 1], batch.end_ts[i : i + 1]))
                continue
            score = float(window_err[i])
            if not np.isfinite(score):  # not "normal": no calibration, no progress towards resolving
                self.metrics.skipped.labels("nonfinite_score").inc()
                self.throttle.log(log.error, "nonfinite_score", stream=stream, model=batch.model,
                                  end_ts=int(batch.end_ts[i]))
                self._quality(st.quality.unscorable(batch.values[i], channel_err[i], score, int(batch.end_ts[i])))
                continue
            every.setdefault(stream, []).append(score)
            normal.setdefault(stream, [])
            if self._observe(stream, st, batch, i, score, channel_err[i], normal[stream]):
                self._feed_calibrator(normal, every)  # the evidence of every window the document says applied
                self.save(stream)
        self._feed_calibrator(normal, every)
        for stream, st in touched.items():
            self._release(stream, st)

    def _feed_calibrator(self, normal: dict[str, list[float]], every: dict[str, list[float]]) -> None:
        for stream, errors in normal.items():
            self.calibrator.observe(stream, np.asarray(errors))
        for stream, errors in every.items():
            self.calibrator.observe_all(stream, errors)
        normal.clear()
        every.clear()

    def _observe(self, stream: str, st: StreamState, batch: Batch, i: int, score: float, ch: np.ndarray,
                 normal: list[float]) -> bool:
        """One window through the alert state; True when it changed the alert (the caller saves the stream)."""
        th = self.calibrator.threshold(stream)
        end_seq = int(batch.end_seq[i])
        obs = Observation(int(batch.start_ts[i]), int(batch.end_ts[i]), end_seq - st.served.window + 1, end_seq,
                          score, th.value, th.source, ch, batch.values[i].copy() if score > th.value else None)
        gaps = st.windows.gaps
        while gaps and gaps[0] <= obs.start_ts:  # a gap since the last window: no pending run goes on across it
            if st.last_window_ts < gaps.popleft():
                learn(self.calibrator, stream, st.alerts.cut(), score, normal)
        st.scored += 1
        st.last_window_ts = obs.end_ts
        st.dirty = True
        step = st.alerts.update(obs)
        learn(self.calibrator, stream, step, score, normal)
        arrived = float(batch.enqueued[i]) if batch.enqueued is not None else None
        for t in step.transitions:
            self.publish_alert(stream, st, t, arrived)
        self._page_if_unsilenced(stream, st, arrived)  # silence over, still anomalous
        return bool(step.transitions)

    def silenced(self, st: StreamState) -> bool:
        return st.silenced_until_ms > self.clock() * 1000

    def _page_if_unsilenced(self, stream: str, st: StreamState, arrived: float | None = None) -> bool:
        """Publish the page a silence held back, once the silence is over and the alert still open."""
        if not st.alerts.silenced_open or self.silenced(st):
            return False
        self.publish_alert(stream, st, Transition("firing", st.alerts.episode), arrived,  # type: ignore[arg-type]
                           after_silence=True)  # a late page: consumers could not tell it from a fresh one
        return True

    def page_unsilenced(self) -> int:
        """Publish as ``firing`` the open alerts whose silence has ended or was lifted. The next window of the
        stream does it too, but a stream that went quiet meanwhile sends none, and the page would be owed."""
        now_ms = self.clock() * 1000
        for name in [n for n, until in self.owed.items() if until <= now_ms]:  # quiet enough to be evicted
            if not self.wake(name, reserve=False) and name not in self._owed_warned:
                self._owed_warned.add(name)  # tried again every tick; said once
                log.warning("page_owed_not_woken", stream=name, held=len(self.streams),
                            max_streams=self.settings.max_streams)
        paged = [n for n, st in self.streams.items() if self._page_if_unsilenced(n, st)]
        for stream in paged:
            self.save(stream)
        return len(paged)

    def publish_alert(self, stream: str, st: StreamState, t: Transition, arrived: float | None = None,
                      remember: bool = True, names: list[str] | None = None, **extra: Any) -> None:
        """Send a transition: a firing one carries its picture; while silenced it is recorded, not paged.
        ``names``: the channels of the model that scored it, when not the stream's model now."""
        ep = t.episode
        status = t.status
        if status == "firing":
            if not ep.paged:  # a page that went out stays one: a silence set later does not relabel its repeats
                ep.silenced = self.silenced(st)
            status = "silenced" if ep.silenced else "firing"
        if ep.first_source is None:  # as first published, ever after (a restored start names the replay's input)
            first = self.ledger.offset_of(stream, ep.start.start_seq)
            if first is not None:
                ep.first_source = (first[0][0], first[0][1], first[1])
        else:
            first = None if ep.first_source == UNKNOWN_SOURCE else (ep.first_source[:2], ep.first_source[2])
        last = self.ledger.offset_of(stream, (ep.last or ep.peak).end_seq)
        topic, partition = (first or last or ((None, None), None))[0]
        source = {"topic": topic, "partition": partition,
                  "first_offset": first[1] if first else None, "last_offset": last[1] if last else None}
        doc = alert_doc(stream, t, st.served.describe(), st.served.detector.channel_names if names is None else names,
                        source, self.settings.alerts)
        doc.update(status=status, silenced=ep.silenced, published_ts=int(self.clock() * 1000), **extra)
        if t.status == "firing":  # a restored peak has no samples: a silenced episode keeps its picture for its page
            doc["explain"] = self._explain(st, ep.peak) or ep.explain
            ep.explain = doc["explain"] if status == "silenced" else None
        if status == "firing" and not ep.paged:  # once per episode: not a silenced one, not a flapping repeat
            ep.paged = True
            self.metrics.alert_severity.labels(doc["severity"]).inc()
        if remember:  # firing, then resolved: with all its over-threshold windows
            st.remember(ep.alert_id, ep.scores)
        self.sink.send(json_message(self.settings.alerts_topic, stream, doc, [("tsmon.type", b"anomaly")]))
        self.metrics.alerts.labels(status).inc()
        if arrived is not None:
            self.metrics.alert_latency.observe(time.monotonic() - arrived)
        log.info("alert", alert_id=ep.alert_id, stream=stream, status=status, severity=doc["severity"],
                 flapping=ep.flapping, ratio=doc["ratio"], threshold=doc["threshold"],
                 threshold_source=doc["threshold_source"])

    def _explain(self, st: StreamState, peak: Observation) -> dict[str, Any] | None:
        """The peak window, its reconstruction and errors (one forward pass; alerts are rare)."""
        if peak.values is None:  # restored from the changelog: the first firing message had the picture
            return None
        from monitor import explain

        try:
            return explain.for_window(st.served.detector, peak.values, peak.threshold, peak.start_ts, peak.end_ts)
        except Exception as exc:  # noqa: BLE001 — a picture must never cost the alert itself
            log.error("explain_failed", error=describe(exc))
            return None

    def alert_settings(self, served: Served) -> AlertSettings:
        """The daemon's alert settings with the route's own debounce, where it sets one."""
        a = self.settings.alerts
        return replace(a, for_windows=served.for_windows or a.for_windows,
                       resolve_after=served.resolve_after or a.resolve_after)

    def reset_stream(self, stream: str, reason: str) -> None:
        """Forget the stream's windows, alert state and calibration (scores what waits first)."""
        self.score_ready(force=True)
        st = self.streams[stream]
        ep = st.alerts.episode
        if ep is not None and ep.fired is not None:  # never leave a page open that nothing will resolve
            self.publish_alert(stream, st, Transition("resolved", ep), reset=True)
        st.reset(AlertState(stream, st.served.identity, self.alert_settings(st.served), generation=st.alerts.generation))
        self.calibrator.reset(stream, reason)
        self._release(stream, st)
        self.save(stream)

    # persisted state ------------------------------------------------------------------------------
    def save(self, stream: str) -> dict[str, Any] | None:
        """Send the stream's state to the changelog (acknowledged with everything else before a commit)."""
        st, topic = self.streams.get(stream), self.settings.state_topic
        if st is None or self.failed is not None:  # it would include windows after the lost ones
            return None
        ep = st.alerts.episode  # a picture kept for a late page shows the peak as it is now (it may have grown)
        if ep is not None and ep.explain is not None and ep.peak.values is not None \
                and ep.explain.get("end_ts") != ep.peak.end_ts:
            ep.explain = self._explain(st, ep.peak) or ep.explain
        point = st.replay_point()
        st.home = frozenset(self.ledger.partitions_of(stream)) or st.home  # woken: none read since, keep the doc's
        doc = st.to_doc(stream, self.calibrator, int(self.clock() * 1000), point)
        if self.data_clock is not None and stream in self.data_clock.next_ms:  # the replay keeps its schedule
            doc["recalibrate_at_ts"] = self.data_clock.next_ms[stream]
        if topic is not None:
            self.outbox.document(stream, json_message(topic, stream, doc, [("tsmon.type", b"stream_state")]), st.home)
            self.undocumented.discard(stream)
            st.doc_from_seq = st.resume_seq(point)  # a replay after a crash must reach this document's
            self._release(stream, st)  # the older document's hold ends now (a shutdown sends no more records)
            st.dirty = False
            self.metrics.snapshots.inc()
        return doc

    def save_changed(self, every: bool = False) -> int:
        """Snapshot the streams that changed since their last one (all of them with ``every``)."""
        names = [n for n, st in self.streams.items() if every or st.dirty]
        for name in names:
            self.save(name)
        return len(names)

    def evict_idle(self, now: float, input_since: float = 0.0) -> int:
        """Snapshot and drop the streams silent for ``idle_evict_s`` with nothing waiting to be scored.

        Silence counts from ``input_since`` at the earliest: the daemon's input was paused before it (a failing
        sink or broker, back-pressure) and a stream cannot be heard while its records wait in the broker.

        Their documents stay at hand for when they come back (without a changelog at most ``max_streams`` of
        them), and on the changelog; the ledger stops holding their input, the sink acknowledges the document
        first.
        """
        idle = self.settings.idle_evict_s
        if idle is None:
            return 0
        quiet = {n: now - max(st.last_seen, input_since) for n, st in self.streams.items() if not st.unscored}
        gone = [n for n, q in quiet.items() if q >= idle]
        for name in gone:
            self._evict(name, quiet[name])
        # Without a changelog the evicted streams' documents live only here: at most max_streams of them, oldest
        # out first. With one, ``restored`` is what the changelog held at the last assignment (its size; the
        # restore read it all anyway) plus streams evicted since: trimming it would forget the pins, silences
        # and open alerts of streams this instance will see again.
        while self.settings.state_topic is None and len(self.restored) > self.settings.max_streams:
            self._unevict(str(self.restored.pop(next(iter(self.restored))).get("stream", "")))
        return len(gone)

    def _evict(self, name: str, idle_s: float) -> None:
        """Snapshot a stream and drop it from memory, its document kept at hand (see :meth:`evict_idle`)."""
        st = self.streams[name]
        partial = max(0, st.windows.seen - st.windows.needed_from + 1)  # of a window never completed
        ep, last = st.alerts.episode, st.last_sample_ts
        if ep is not None and ep.fired is not None and last is not None:  # paged, then silent: a sensor gone?
            self._quality(st.quality.event("stale", last, (
                f"no data for {idle_s:.0f} s (limits.idle_evict_s) since its last sample at {iso(last)}: alert "
                f"{ep.alert_id} stays open until the stream sends again — is its source alive?")))
        doc = self.save(name)
        if doc is not None:
            self.restored[name] = doc
            if st.alerts.silenced_open:
                self.owed[name] = st.silenced_until_ms
        self._drop(name)
        self.ledger.forget(name)
        self.evicted.add(name)
        if st.windows.seen:  # it read input here, so none of its input is still to be replayed to it (one
            self.evicted_here.add(name)  # woken for a command before its replay came still needs aligning)
        self.metrics.evicted.inc()
        self.throttle.log(log.info, "stream_evicted", stream=name, idle_s=round(idle_s, 1),
                          partial_window_samples=partial)

    def forget_dormant(self, assigned: set[TP], now_ms: int | None = None) -> int:
        """Forget the documents of streams not held that went unseen for ``forget_after_s`` — and, over
        ``max_documents``, the least recently written of the others — unless they hold commitments
        (:func:`holds_commitments`). Returns how many.

        Unseen is measured in input, not in wall-clock time: a document of a stream on ``assigned`` partitions
        goes once every such partition's input was read ``forget_after_s`` past the document's ``written_ms``
        (:meth:`_moved_on`), so an outage or a lag reading older input forgets nothing (records of the stream may
        be waiting). It gets a tombstone on the changelog when all its partitions are this instance's (evicted
        here, or adopted at a restore: dropped from memory only, a document came back at every restart and the
        changelog grew for good); documents of other partitions are only dropped from memory, by wall-clock age
        (their owner decides, and the next restore reads them again). The bound drops those first, then the
        streams this instance evicted itself; never an adopted one of its partitions, whose stream may be
        replayed any moment.

        Without it every stream id ever seen kept its document: a producer that sent 20 000 ids once each left
        20 000 documents in every instance's memory and in every restore (6.6 s, growing)."""
        after, topic, most = self.settings.forget_after_s, self.settings.state_topic, self.settings.max_documents
        now_ms = int(self.clock() * 1000) if now_ms is None else now_ms
        after_ms = None if after is None else after * 1000
        old: dict[str, int] = {}
        tombstoned: dict[str, frozenset[TP]] = {}  # → the partitions its stream came from
        others: list[tuple[int, str]] = []  # for the bound: copies of other instances' partitions, first
        own: list[tuple[int, str]] = []  # ... then the streams this instance evicted itself
        held, gone = 0, []  # documents with commitments (outside the bound); of them, alerts of streams gone
        for name, doc in self.restored.items():
            w = doc.get("written_ms")
            if name in self.streams or not isinstance(w, int):
                continue
            w = max(w, self.knocked.get(name, w))  # sending, but refused for want of room: seen then
            parts = doc_partitions(doc)
            home = parts & assigned if parts else set(assigned)  # none recorded (earlier versions): maybe any of them
            unseen = after_ms is not None and (all(self.read_ts.get(tp, -1) >= w + after_ms for tp in home) if home
                                               else w < now_ms - after_ms)
            # this instance's stream: a tombstone, or the resolution of its alert, is its to send (another owner's
            # stream may still be alive and firing there)
            mine = name in self.evicted_here or bool(parts and parts <= assigned)
            if holds_commitments(doc, now_ms):  # kept, but outside the bound: counted in it, they forgot the others
                held += 1
                if unseen and mine and name in self.evicted and open_alert_unsilenced(doc, now_ms):
                    gone.append(name)
                continue
            if unseen:
                old[name] = w
                if mine:
                    tombstoned[name] = parts
            elif not home:
                others.append((w, name))
            elif name in self.evicted_here:
                own.append((w, name))
        over = len(self.restored) - len(old) - held - most if most is not None else 0
        if over > 0:
            for w, name in (sorted(others) + sorted(own))[:over]:
                old[name] = w
                if name in self.evicted_here:
                    tombstoned[name] = doc_partitions(self.restored[name])
        for name, written_ms in old.items():
            del self.restored[name]
            self.knocked.pop(name, None)
            if topic is not None and name in tombstoned:
                self.outbox.document(name, OutMessage(topic, name.encode(), None, [("tsmon.type", b"stream_forgotten")]),
                                     tombstoned[name])
            self._unevict(name)
            self.throttle.log(log.info, "stream_forgotten", stream=name, written_s_ago=(now_ms - written_ms) // 1000,
                              documents=len(self.restored))
        self.metrics.forgotten.inc(len(old))
        for name in gone:
            self._resolve_gone(name, now_ms)
        return len(old)

    def _resolve_gone(self, stream: str, now_ms: int) -> None:
        """Resolve the open alert of a stream unseen for ``forget_after_s`` (its ``stale`` event went out at the
        eviction): woken from its document, the alert resolved with ``stream_gone``, the document saved — then it is
        evicted again when idle and forgotten like any other. Kept open, its document was never forgotten: every
        dead sensor that had paged stayed in memory, in every restore and on the changelog for good."""
        doc, here = self.restored.get(stream, {}), stream in self.evicted_here
        if not self.wake(stream):  # no room now: tried again at the next pass
            return
        st = self.streams[stream]
        alert_id = self._end_episode(stream, st, stream_gone=True)
        written = doc.get("written_ms")
        unseen_s = (now_ms - written) // 1000 if isinstance(written, int) else 0
        log.warning("alert_resolved_stream_gone", stream=stream[:64], alert_id=alert_id, unseen_s=unseen_s)
        self._evict(stream, unseen_s)  # at once: woken and held for idle_evict_s, a die-off took the streams' room
        if here:
            self.evicted_here.add(stream)

    def _unevict(self, stream: str) -> None:
        """Forget that ``stream`` was evicted (it is back, or its document is gone)."""
        self.evicted.discard(stream)
        self.evicted_here.discard(stream)
        self.owed.pop(stream, None)

    def _drop(self, stream: str) -> None:
        self.streams.pop(stream, None)
        self.calibrator.forget(stream)
        if self.data_clock is not None:
            self.data_clock.forget(stream)
        self.metrics.streams.set(len(self.streams))

    def status_rows(self, lags: dict[TP, int]) -> list[dict[str, Any]]:
        now_ms = int(self.clock() * 1000)
        rows = []
        for name, st in self.streams.items():
            tps = self.ledger.partitions_of(name)
            lag = sum(lags[tp] for tp in tps if tp in lags) if any(tp in lags for tp in tps) else None
            rows.append(st.status(name, self.calibrator, lag, now_ms))
        return rows

    # 3. side outputs ------------------------------------------------------------------------------
    def _quality(self, events: list[QualityEvent]) -> None:
        for e in events:  # counted as found (StreamQuality.on_finding), held back by the cooldown or not
            doc: dict[str, Any] = {"type": "data_quality", "event_id": e.event_id, "stream": e.stream,
                                   "kind": e.kind, "ts": e.ts, "time": iso(e.ts), "detail": e.detail,
                                   "channels": list(e.channels), "suppressed": e.suppressed}
            self.sink.send(json_message(self.settings.alerts_topic, e.stream, doc, [("tsmon.type", b"data_quality")]))
            self.throttle.log(log.warning, "data_quality", stream=e.stream, kind=e.kind, detail=e.detail,
                              repeats_suppressed=e.suppressed)

    def _dead_letter(self, rec: InRecord, bad: BadRecord) -> None:
        self.ledger.consumed(rec.tp, rec.offset)
        self.metrics.records.labels("dead_letter").inc()
        self.metrics.dead_letters.labels(bad.reason).inc()
        headers = [("tsmon.reason", bad.reason.encode()), ("tsmon.detail", bad.detail.encode()[:1000]),
                   ("tsmon.source.topic", rec.topic.encode()), ("tsmon.source.partition", str(rec.partition).encode()),
                   ("tsmon.source.offset", str(rec.offset).encode()),
                   ("tsmon.source.timestamp", str(rec.timestamp_ms).encode())]
        value, key = rec.value or b"", rec.key
        if len(value) > DEAD_LETTER_MAX:  # with the headers, near the producer's request size: undeliverable
            headers.append(("tsmon.truncated_from", str(len(value)).encode()))
            value = value[:DEAD_LETTER_KEEP]
        keep = max(DEAD_LETTER_KEY_KEEP, 4 * self.settings.limits.max_stream_len)  # never a stream id (UTF-8)
        if key is not None and len(key) > keep:  # a 1 MB key (bad_stream) made it undeliverable too
            headers.append(("tsmon.key_truncated_from", str(len(key)).encode()))
            key = key[:keep]
        self.sink.send(OutMessage(self.settings.dead_letter_topic, key, value, headers))
        self.throttle.log(log.warning, "dead_letter", reason=bad.reason, detail=bad.detail, topic=rec.topic,
                          partition=rec.partition, offset=rec.offset)

    # 4. commits and rebalances --------------------------------------------------------------------
    def commit(self, source: Source, tps: set[TP] | None = None) -> dict[TP, int]:
        """The commit order, all within ``flush_timeout_s`` (and by ``deadline``):

        1. flush the sink: alerts, data-quality events and dead letters acknowledged;
        2. send the state documents saved since (:attr:`outbox`) and flush again — a document says its stream's
           alerts were published, so it never reaches the changelog before them;
        3. send the acknowledgements of the operators' commands those documents record (:attr:`outbox`): an
           "applied" never goes out for a change that is not on the changelog;
        4. commit what the ledger says is safe — not after a batch failed to score (:attr:`failed`): steps 1–3
           still run, for what was decided and saved before it.

        Raises SinkBackpressure (the sink did not acknowledge: nothing committed) or BrokerError (the
        commit itself failed); either way the input is replayed from the last commit if we die now.
        """
        end = time.monotonic() + self.settings.flush_timeout_s

        def left() -> float:  # the flush and the commit share the timeout; a deadline (shutdown) cuts it
            return (end if self.deadline is None else min(end, self.deadline)) - time.monotonic()

        for name in sorted(self.undocumented):  # their hold from the first sample read ends with this commit
            self.save(name)
        self.undocumented.clear()
        self._flush(left)  # 1. alerts, events, dead letters: acknowledged before any document that follows them
        self.outbox.delivered()  # (and documents a failed step 2 left with the sink)
        if self.send_documents():  # 2. then acknowledged too (a lost alert with its document acknowledged was
            self._flush(left)  # never sent again: the replay skipped its windows)
            self.outbox.delivered()
        self.send_acks()  # 3. (flushed with the next commit's step 1)
        if self.failed is not None:
            return {}
        assigned = source.assignment() if tps is None else tps
        offsets = {tp: o for tp, o in self.ledger.committable(assigned).items() if self._committed.get(tp) != o}
        if offsets:
            source.commit(offsets, max(0.05, left()))
            self._committed.update(offsets)
            self.metrics.commits.inc()
            self._past_steps(offsets)
        return offsets

    def _past_steps(self, committed: dict[TP, int]) -> None:
        """Forget where a clock step began once the commit is past it: no replay can start before it any more, and
        kept, it passed over records of a partition whose offsets began again (a topic recreated)."""
        for st in self.streams.values():
            if st.time_from:  # rare: one pass over the streams per commit costs nothing more
                done = [tp for tp, at in st.time_from.items() if committed.get(tp, -1) > at]
                for tp in done:
                    del st.time_from[tp]
                st.dirty = st.dirty or bool(done)

    def send_documents(self) -> int:
        """Hand the state documents saved since the last commit to the sink (:meth:`commit`'s step 2)."""
        return self.outbox.send_documents(self.sink)

    def send_acks(self) -> None:
        """Hand the command acknowledgements to the sink (:meth:`commit`'s step 3)."""
        self.outbox.send_acks(self.sink)

    def uncommitted(self, tps: set[TP]) -> dict[TP, int]:
        """Records read past the offsets last committed to the broker, per partition: what a crash now would
        replay — held back by a quiet stream's partial window, or by commits that fail (not what *could* be
        committed: that reads near 0 exactly while the commits fail)."""
        return self.ledger.read_past(self._committed, tps)

    def _flush(self, left: Callable[[], float]) -> None:
        """Wait for the sink while ``left()`` > 0, in slices of ``FLUSH_SLICE_S``: a SIGTERM that lands in
        a stalled flush brings ``deadline`` forward, and the flush ends by it (give or take a slice, or a
        re-send blocking up to the producer's ``max_block_ms``) instead of after its whole timeout. A sink that
        gives up before its slice is over (refusals retried, a test sink) raises at once, as a single flush
        would. The sink's re-send limit (``retries``) now applies per slice."""
        while True:
            step = max(0.05, min(FLUSH_SLICE_S, left()))
            began = time.monotonic()
            try:
                self.sink.flush(step)
                return
            except SinkBackpressure:
                if left() <= 0 or time.monotonic() - began < 0.9 * step:
                    raise

    def wake(self, stream: str, reserve: bool = True) -> bool:
        """Bring a stream this instance evicted (or adopted: :meth:`adopt`) back from its document, for an
        operator's command that names it (it is evicted again when idle). Only since the last assignment:
        after a rebalance its partition may be another instance's, whose newer document this one must not
        overwrite. ``reserve``: leave ``WAKE_RESERVE`` of ``max_streams`` (at least one) to new streams; a
        page owed takes any room left."""
        served, most = self.scorer.route(stream), self.settings.max_streams
        room = len(self.streams) < (most - max(1, math.ceil(most * WAKE_RESERVE)) if reserve else most)
        if stream not in self.evicted or stream in self.streams or served is None or not room:
            return False
        self._new_stream(stream, served).last_seen = time.monotonic()
        return True

    def evicted_docs(self) -> dict[str, dict[str, Any]]:
        """The documents of the streams :meth:`wake` can bring back."""
        return {n: d for n in self.evicted if (d := self.restored.get(n)) is not None}

    def adopt(self, assigned: set[TP]) -> int:
        """After a restore: the streams whose documents say they come from these partitions but have sent
        nothing since are this instance's, so commands reach them (woken like evicted ones) and a page owed
        when their silence ends is sent. Returns how many."""
        mine = [n for n, d in self.restored.items() if n not in self.streams and doc_partitions(d) & assigned]
        for name in mine:
            doc = self.restored[name]
            self.evicted.add(name)
            if owes_page(doc) and isinstance(until := doc.get("silenced_until_ms"), int):
                self.owed[name] = until  # paged by page_unsilenced once it has passed
        return len(mine)

    def forget_evicted(self) -> None:
        """At an assignment change: the evicted streams' partitions may now be another instance's."""
        self.knocked.clear()
        self.evicted.clear()
        self.evicted_here.clear()
        self.owed.clear()
        self._owed_warned.clear()

    def revoke(self, source: Source, tps: set[TP]) -> dict[TP, int]:
        """Partitions are leaving: score what waits, publish, commit them, forget their streams.

        Returns, per partition read from, where a next owner must begin: the offset committed now or, if that
        failed, the last one committed (else where this instance began). The daemon rewinds a partition that
        comes straight back to it there, since its streams are gone from memory."""
        self.forget_evicted()
        self.score_ready(force=True)
        # a stream woken by a command has read nothing since: its partition is unknown, it may be one of these
        woken = {n for n in self.streams if not self.ledger.partitions_of(n)}
        for stream in self.ledger.streams_on(tps) | woken:  # their next owner restores from these
            self.save(stream)
        failed = False
        try:
            self.commit(source, tps)
        except (SinkBackpressure, BrokerError) as exc:  # the next owner replays from the last commit
            log.error("commit_on_revoke_failed", error=str(exc))
            failed = True
        resume = {tp: o for tp in tps if (o := self._committed.get(tp, self.ledger.first_read(tp))) is not None}
        for stream in self.ledger.drop(tps) | woken:  # a woken one comes back from the changelog if it stays
            self._drop(stream)
            self.ledger.forget(stream)  # also what it held on partitions that stay: nothing would release it
        # The documents (tombstones too) of streams only on these partitions are never sent: sent at this instance's
        # next commit, they landed after the next owner's own and became the streams' latest (a pin set there was
        # lost at the next restore), and a tombstone deleted the next owner's document. A command whose change was
        # in them is not acknowledged ("applied" went out, the next owner restored the streams without it): tsmon
        # ctl says the partition was not answered for, to send it again.
        if failed and (lost := self.outbox.drop_revoked(tps)):
            self.unpersisted |= lost
            log.warning("commands_not_persisted", command_ids=sorted(self.unpersisted),
                        consequence="not acknowledged: send them again (their streams' next owner applies them)")
        for tp in tps:
            self._committed.pop(tp, None)
            self.read_ts.pop(tp, None)
        return resume
