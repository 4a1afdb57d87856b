"""Records → windows: each record is routed to its stream, order-checked and windowed, or dead-lettered.

Owns the first rule of the at-least-once contract (:mod:`monitor.processor`): every record ends in exactly one
place — its samples in a stream's windows (held in the ledger until no window needs them), or the dead-letter topic
with the reason — and raises out of :meth:`Ingest.handle` only when scoring failed (a clock step scores what
waits first; :attr:`ProcessorState.failed`). Also the order rules: samples at or before a stream's last one
(duplicates, late and overlapping chunks), timestamps too early or in the future, and a clock set back (the stream
restarts at its new time); and how many windows a record, and a byte of one, makes (the daemon sizes its polls
and hand-overs by them).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np

from models.errors import describe
from monitor import logs
from monitor.alerts import iso
from monitor.procstate import ProcessorState
from monitor.records import BadRecord, SampleBlock, parse
from monitor.source import InRecord
from monitor.streams import BehindRun, StreamState
from monitor.windows import order_problem

GAP_DECAY = 0.97  # per poll that brings the stream records: a long wait is forgotten after ~100 short ones
log = logs.get("tsmon.processor")

RESERVED_PREFIX = "__tsmon"  # changelog keys of daemon-wide state
SECONDS_LOOK_LIKE_MS = 100_000_000_000  # 1973-03-03 in ms; epoch seconds of any date before 5138 are below it
# records a poll may take while their size is unknown (ProcessorState.unsized_room, doubled by each poll of dead
# letters only): Intake._poll_room takes at most kafka.max_poll_records of it (the confluent client's largest is 1e6)
UNSIZED_ROOM_MAX = 1 << 20


def _slow_max(prev: float | None, now: float) -> float:
    """The largest rate seen, decaying by a tenth per poll: quick to learn that records grew, slow to forget."""
    return now if prev is None else max(now, 0.9 * prev)


class Ingest(ProcessorState):
    """Records → windows (:meth:`handle`); see the module docstring."""

    def handle(self, records: list[InRecord]) -> None:
        """Route each record; then, per stream, append all its good blocks of this poll in one go."""
        if records and self.first_record_at is None:
            self.first_record_at = time.monotonic()
        by_stream: dict[str, list[tuple[InRecord, SampleBlock]]] = {}
        now_ms = self.clock() * 1000  # once a poll: the time bounds every record is checked against
        for rec in records:
            try:
                block = parse(rec.value, rec.key, self.settings.limits)
            except Exception as exc:  # noqa: BLE001 — a parser bug must cost one message, never the daemon
                self.throttle.log(log.error, "parse_failed", error=describe(exc)[:300],
                                  topic=rec.topic, partition=rec.partition, offset=rec.offset)
                block = BadRecord("unparseable", describe(exc)[:200])
            why = self._route(block, now_ms) if isinstance(block, SampleBlock) else block
            if why is not None:
                if isinstance(block, SampleBlock) and (st := self.streams.get(block.stream)) is not None:
                    self._heard(block.stream, st, rec, block)
                self._dead_letter(rec, why)
            else:
                by_stream.setdefault(block.stream, []).append((rec, block))  # type: ignore[union-attr]
        made = sum(self._append_or_dead_letter(stream, items) for stream, items in by_stream.items())  # windows
        good = sum(len(items) for items in by_stream.values())
        if good:  # dead letters make no windows and tell nothing about the next records' size
            size = sum(len(rec.value or b"") for items in by_stream.values() for rec, _ in items)
            self.windows_per_record = _slow_max(self.windows_per_record, made / good)
            self.windows_per_byte = _slow_max(self.windows_per_byte, made / max(1, size))
        elif records and self.windows_per_record is None:  # capped: a producer of garbage alone grew it a bit a poll
            self.unsized_room = min(self.unsized_room * 2, UNSIZED_ROOM_MAX)
        self.peak_pending = max(self.peak_pending, self.pending)
        self._log_first_offsets()

    def _log_first_offsets(self) -> None:
        """Where reading a partition began since it was assigned (after a start: the committed offset, else
        auto_offset_reset's), once per assignment, as the ledger noted it: from the logs alone, an owner could not
        tell that a restart resumed from its commit."""
        for (topic, partition), offset in self.ledger.began:
            log.info("partition_reading_from", partition=f"{topic}-{partition}", offset=offset)
        self.ledger.began.clear()

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

    def _heard(self, stream: str, st: StreamState, rec: InRecord, block: SampleBlock) -> None:
        """A stream held here sent a record refused before its windows (its channel count changed): its source is
        alive — not reported ``silent`` ("is its source alive?") while it sends, and ``resumed`` if it was."""
        if st.read_before(rec.tp, rec.offset):
            return
        st.heard(time.monotonic(), int(self.clock() * 1000))
        if st.silent_ts is not None:
            self._resumed(stream, st, [(rec, block)])

    def _route(self, block: SampleBlock, now_ms: float) -> BadRecord | None:
        new = block.stream not in self.streams  # checks for a new stream only, not on every message
        if new and block.stream.startswith(RESERVED_PREFIX):  # the id itself is refused, whatever route matches it
            return BadRecord("reserved_stream", f"stream ids starting with {RESERVED_PREFIX!r} are tsmon's own")
        served = self.scorer.route(block.stream)
        if served is None:
            return BadRecord("no_model", f"no [[models]] pattern matches stream {block.stream[:64]!r}")
        if block.channels != served.channels:
            return BadRecord("channel_mismatch", f"model {served.name} takes {served.channels} channel(s), "
                                                 f"the message has {block.channels}")
        refused = self._out_of_range(block, now_ms)
        if refused is not None and new and block.stream not in self.restored:  # no stream is made for it: one whose
            return refused  # records were all refused held a slot of limits.max_streams (epoch seconds, fresh ids)
        if new:
            if len(self.streams) >= self.settings.max_streams:
                if block.stream in self.restored:  # it is sending: not unseen (forget_dormant), and its document is
                    self.knocked[block.stream] = int(self.clock() * 1000)  # all the state it has left
                return BadRecord("too_many_streams", f"{len(self.streams)} streams held (limits.max_streams); "
                                                     "idle ones are evicted after limits.idle_evict_s")
            self._new_stream(block.stream, served)  # (woken from its document)
        if refused is not None:  # a stream with state, alive yet unmonitored: said (a clock reset to 1970 went unseen
            # on the alerts topic — each refused record a sign of life, so never `silent`)
            st = self.streams[block.stream]
            self._quality(st.quality.event("clock_out_of_range", int(block.ts_ms[0]), refused.detail))
        return refused

    def _out_of_range(self, block: SampleBlock, now_ms: float) -> BadRecord | None:
        """A block stamped before ``limits.earliest_ts`` (epoch seconds read as ms: January 1970), or ending further
        ahead of this host's clock than ``limits.max_future_s`` (taken, it would make every later sample "backwards"
        until then)."""
        t0, ahead_s = int(block.ts_ms[0]), self.settings.max_future_s
        if (earliest := self.settings.earliest_ms) is not None and t0 < earliest:
            first = datetime.fromtimestamp(t0 / 1000, UTC).isoformat(timespec="seconds")
            hint = ("epoch seconds? ts is epoch milliseconds" if t0 < SECONDS_LOOK_LIKE_MS else
                    "historical data: set limits.earliest_ts earlier, or none")
            return BadRecord("timestamp_too_early", f"ts {t0} is {first}, before limits.earliest_ts ({hint})")
        if ahead_s is not None and int(block.ts_ms[-1]) > now_ms + ahead_s * 1000:
            ahead = (int(block.ts_ms[-1]) - now_ms) / 1000
            return BadRecord("timestamp_in_future", f"{ahead:.0f} s ahead of this host's clock "
                                                    f"(limits.max_future_s = {ahead_s:g})")
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
            self.throttle.log(log.error, "append_failed", stream=stream[:64], error=why[:300])  # a line a poll
            for rec, _block in items:
                if id(rec) not in done:
                    self._dead_letter(rec, BadRecord("unprocessable", why[:200]))
            return 0.0

    def _resumed(self, stream: str, st: StreamState, items: list[tuple[InRecord, SampleBlock]]) -> None:
        """A stream reported ``silent`` sends again — new input, whatever its timestamps (a clock set back) and
        whether or not it is dead-lettered next: its source is alive — a ``resumed`` event, once. A replay of what
        it sent before (a new owner reading from the commit) is not news."""
        silent = st.silent_ts
        assert silent is not None
        first = next((int(b.ts_ms[b.ts_ms > silent][0]) if int(b.ts_ms[-1]) > silent else int(b.ts_ms[0])
                      for rec, b in items if st.is_new(rec.tp, rec.offset) or int(b.ts_ms[-1]) > silent), None)
        if first is None:
            return
        st.silent_ts, st.dirty = None, True
        when = (f"{(first - silent) / 1000:.0f} s after" if first > silent else "stamped before") + \
            f" its last sample before the silence ({iso(silent)})"
        # the silence's count in its id, as silent's: the same old samples sent again after a second silence gave
        # the first one's id, and deduplicated, "silent" stayed the last word for a stream that is alive
        self._quality(st.quality.event("resumed", first, f"data again at {iso(first)}, {when}",
                                       nth=max(0, st.silences - 1)))

    def _append(self, stream: str, items: list[tuple[InRecord, SampleBlock]], done: set[int]) -> float:
        """Order-check the blocks, then window, hold and batch them together (vectorised per poll); returns
        the windows their samples make at the stream's hop (counted whether or not one completed yet)."""
        st = self.streams[stream]
        now = time.monotonic()
        if not all(st.read_before(rec.tp, rec.offset) for rec, _block in items):  # not only a replay
            if st.last_seen and st.silent_ts is None and not st.seen_from_doc:  # what "silent" waits for
                # (Residency._report_silent): not a pause of the daemon's input, nor a silence it reported, nor its
                # wait across a restart and the replay before its first new record (no usual wait)
                st.arrival_gap_s = max(now - max(st.last_seen, self.input_since), st.arrival_gap_s * GAP_DECAY)
                st.gaps_seen += 1
            st.heard(now, int(self.clock() * 1000))
        if st.silent_ts is not None:
            self._resumed(stream, st, items)
        last, good, made = st.windows.last_ts, [], 0.0
        now_ms = self.clock() * 1000
        for rec, block in items:
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
                st.behind_run, st.last_tp = None, rec.tp
                continue
            kind = "duplicate" if reason == "duplicate_timestamp" else "late"
            run = st.behind_run
            if kind == "late" and run is not None and behind is not None and self.settings.clock_step_s is not None:
                detail = self._late_detail(run, behind, int(block.ts_ms[0]), now_ms, detail)
            if st.last_tp is not None and rec.tp != st.last_tp:  # the likeliest cause, said first (a pipeline owner's
                # pass: keyless chunks, 76 % dead-lettered, were told "history sent again? send it as another stream")
                detail = (f"on another partition ({rec.tp[0]}-{rec.tp[1]}) than the stream's last message "
                          f"({st.last_tp[0]}-{st.last_tp[1]}): messages without a key? they are spread over the "
                          f"partitions and read out of order: key each message by its stream id; {detail}")
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
        st.windows.gap_ms = self._gap_ms(st, base, st.quality.period_to_learn(ts, st.windows.last_ts, base))
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

    def _late_detail(self, run: BehindRun, behind: int, first: int, now_ms: float, detail: str) -> str:
        """A late block's detail: how far behind, for how long, and what comes of it — a restart is promised only
        where one can come (a clock set back from a time still ahead of this host's, as far back as clock_step_s;
        a new user's second replay of a file was promised it in every dead letter), history sent again is said so
        once it has lasted that long, and a block merely late (a reordered message) gets no guess."""
        step_ms = (self.settings.clock_step_s or 0) * 1000
        lasted = run.last_ts - run.first_ts
        said = (f"{(behind - first) / 1000:.1f} s behind the stream's last sample ({iso(behind)}); behind it for "
                f"{lasted / 1000:.1f} s of their own time so far")
        if behind > now_ms and behind - run.first_ts >= step_ms:
            return (f"{said}: a clock set back? after windows.clock_step_s ({step_ms / 1000:g} s) the stream "
                    f"restarts at their time ({detail})")
        if behind <= now_ms and lasted >= step_ms:
            return (f"{said}: history sent again (a replay, a backfill)? not taken: the stream's last sample is not "
                    f"ahead of this host's clock, so this is no clock step; send it as another stream to score it "
                    f"({detail})")
        return f"{said} ({detail})"

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
        self.throttle.log(log.warning, "clock_step", stream=stream[:64], back_s=round(back_s, 3),
                          dead_lettered=refused - 1)  # a fleet's clocks corrected at once: a line each
        self._release(stream, st)
        self.save(stream)  # with the next commit, not the next snapshot: a crash before it stepped again elsewhere

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
