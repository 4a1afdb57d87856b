"""Which streams are held in memory: a stream starts (from its document or its model), is evicted when idle,
woken for a command or a page it owes, adopted after a restore, and its document is forgotten when unseen.

Documents of streams not held (:attr:`ProcessorState.restored`) are bounded by ``forget_after_s`` and
``max_documents``, never dropping one that holds commitments (a pin, a silence, an open alert) — and without a
changelog, where they are all the state there is, also by ``max_streams``, oldest first, commitments or not.
"""

from __future__ import annotations

import math
import time
from collections import deque
from functools import partial
from typing import Any

import numpy as np

from models.errors import describe
from monitor import logs, windows
from monitor.alerts import AlertState, Transition, iso
from monitor.calibrator import MAX_QUANTILE
from monitor.procstate import ProcessorState
from monitor.quality import StreamQuality
from monitor.records import MAX_TS_MS
from monitor.scorer import Served
from monitor.sink import OutMessage
from monitor.source import TP
from monitor.state import fresh_epoch
from monitor.streams import StreamState, doc_partitions, holds_commitments, open_alert_unsilenced, owes_page

log = logs.get("tsmon.processor")

SILENT_PERIODS = 10  # silent after this many of its sample periods and of its usual waits between records, at least
# a document's seen_ms is the clock of the instance that read the record: the silence it starts is counted this much
# shorter, for a clock here that is ahead of that one
SEEN_CLOCK_SKEW_S = 30.0
EPOCH_AHEAD_MS = 60_000  # a document's epoch further ahead of this clock than this: another instance's clock is ahead
WAKE_RESERVE = 0.1  # share of limits.max_streams that streams woken for a command leave to new streams


class Residency(ProcessorState):
    """Streams held in memory and the documents of those not held; see the module docstring."""

    def _new_stream(self, stream: str, served: Served) -> StreamState:
        s, det = self.settings, served.detector
        self.calibrator.register(stream, det.threshold.value, thin=served.thin,
                                 quantile=min(det.threshold.quantile, MAX_QUANTILE) if s.model_quantile else None,
                                 margin=det.threshold.margin if s.model_margin else None,
                                 basis=f"the model's: {_quantile_words(det.threshold.quantile)} of its validation "
                                       f"errors × {det.threshold.margin:g}")
        st = StreamState(
            served, windows.for_stream(det.windowing, served.window, served.hop, served.channels,
                                       self._base_gap_ms(served)),
            StreamQuality(stream, np.asarray(det.scaler.flat_scale, "float32"), det.channel_names, s.flatline_rel_std,
                          s.rate_tolerance, s.quality_cooldown_ms,
                          on_finding=lambda kind: self.metrics.quality.labels(kind).inc()),
            AlertState(stream, served.identity, self.alert_settings(served)), recent_alerts=deque(maxlen=s.recent_alerts),
            since_ms=int(self.clock() * 1000))  # a document it continues from says when it first started
        if s.state_topic is not None:  # until its first document (sent with the next commit), a replay after a
            st.doc_from_seq = 1       # crash must begin where this instance began reading it: the state it
            self.undocumented.add(stream)  # started from (restored or the artifact's) is the latest there is
            # (the commit ran past a restored document's point, and a crash then lost the windows in between,
            # their evidence and the alert ids that followed)
        replayed = stream not in self.evicted_here  # its input was released at the eviction: none comes again
        was_provisional = stream in self.provisional_evicted  # back on the epoch it had (its kept document's)
        self._unevict(stream)
        restored = self._restore(stream, st, replayed)
        provisional = replayed and self.restore_incomplete  # its latest document may be one the read did not reach
        if provisional:  # below the document it read (that owner's later ones share its epoch), and below 0 from the
            st.epoch -= 2  # artifact (an earlier version's documents have none): every one before supersedes its own
            st.provisional = True
        elif replayed:  # an owner starting the stream writes above its document's epoch and any
            now = fresh_epoch(self.clock())  # earlier start's (a previous owner's document delivered after the read)
            if st.epoch - 1 > now + EPOCH_AHEAD_MS:  # written by an instance whose clock is ahead of this one's
                self.throttle.log(log.warning, "state_epoch_ahead", stream=stream, ahead_s=(st.epoch - 1 - now) // 1000,
                                  consequence="another instance's clock is ahead of this one's: a start here that "
                                  "does not read its documents loses to them; keep the instances' clocks in step (NTP)")
            st.epoch = max(st.epoch, now)
        st.provisional = st.provisional or (was_provisional and self.restore_incomplete)  # (it said false, back)
        st.fresh = restored is None  # new: a silence of its pattern running, it starts silenced (not a provisional one)
        self.silences.apply(stream, st, self.clock() * 1000)
        if replayed and st.seen_ms is not None:  # quiet since its last new record, not since the replay re-read it:
            # restarts more often than idle_evict_s held a stopped sensor's partial window, and the commit, for good
            st.last_seen = time.monotonic() - max(0.0, self.clock() - st.seen_ms / 1000 - SEEN_CLOCK_SKEW_S)
            st.seen_from_doc = True
        state = self.calibrator.threshold(stream)
        self.throttle.log(log.info, "stream_started", stream=stream, model=served.name, window=served.window,
                          hop=served.hop, threshold=state.value, threshold_source=state.source,
                          threshold_version=state.version, restored=restored,
                          **({"provisional": True} if provisional else {}))
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
        if how != "controls" and self.data_clock is not None and isinstance(at, int | float) and abs(at) <= MAX_TS_MS:
            # (1e18: never recalibrated again; NaN fails the comparison)
            self.data_clock.next_ms[stream] = float(at)
        if st.orphan is not None:  # paged under the model version it replaced: never leave that page open
            names = doc.get("channels")  # the old model's (the new one's named another model's channels)
            names = names if isinstance(names, list) and all(isinstance(n, str) for n in names) else []
            usual = doc.get("channel_usual")  # absent from documents of earlier versions: ranked by raw error
            usual = usual if isinstance(usual, list) and all(isinstance(v, int | float) for v in usual) else None
            self.publish_alert(stream, st, Transition("resolved", st.orphan), remember=False, names=names,
                               usual=usual, reset=True, model_changed=True, model=doc["model"])  # the old model's scale
            st.orphan = None
        return how

    def evict_idle(self, now: float, input_since: float = -math.inf, caught_up: frozenset[TP] | set[TP] = frozenset()) -> int:
        """Snapshot and drop the streams silent for ``idle_evict_s`` with nothing waiting to be scored.

        Silence counts from ``input_since`` at the earliest: the daemon's input was paused before it (a failing
        sink or broker, back-pressure, a restart) and a stream cannot be heard while its records wait in the broker.
        Except for a stream restored from a document that sent nothing new since, once its partitions are
        ``caught_up`` (read to their end since input came back): it was not heard because it said nothing, and its
        silence counts from its last new record (the document's ``seen_ms``), on whichever instance that was read.

        Their documents stay at hand for when they come back (without a changelog at most ``max_streams`` of
        them), and on the changelog; the ledger stops holding their input, the sink acknowledges the document
        first.
        """
        idle = self.settings.idle_evict_s
        quiet = {n: now - (st.last_seen if st.seen_from_doc and st.home and st.home <= caught_up
                           else max(st.last_seen, input_since)) for n, st in self.streams.items() if not st.unscored}
        # counted from when input came back, not from its last record: the stream may have been quiet far longer
        from_input = {n for n, q in quiet.items() if q < now - self.streams[n].last_seen}
        self._report_silent(quiet, from_input)
        if idle is None:
            return 0
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

    def _report_silent(self, quiet: dict[str, float], from_input: set[str] | frozenset[str] = frozenset()) -> None:
        """A ``silent`` event, once, for each stream quiet for ``silent_after_s`` and for 10 of its sample periods and
        of the usual waits between its records (a meter sending every 15 minutes, a gateway uploading in bursts) —
        at its eviction at the latest, when that misses 3 of its waits; its next record brings a ``resumed`` one
        (:meth:`Ingest._resumed`). Not before it sent twice (its wait is not known). Quiet counts as for eviction:
        not while input was paused. The report is saved at once: lost in a crash, the stream (not replayed: its
        input was committed) never said it resumed."""
        after, idle, silent = self.settings.silent_after_s, self.settings.idle_evict_s, 0
        for name, q in quiet.items():
            st = self.streams[name]
            if st.silent_ts is not None:
                silent += 1
                continue
            if after is None or st.gaps_seen < 1 or q < (after if idle is None else min(after, idle)):
                continue
            wait = max(st.arrival_gap_s, (st.quality.period_ms or 0.0) / 1000)
            limit = max(after, SILENT_PERIODS * wait)
            if idle is not None and limit > idle:  # evicted first: said then, if that misses 3 of its waits (a meter
                limit = idle if idle >= 3 * wait else math.inf  # every 15 minutes); not one sending once an hour
            if q < limit:
                continue
            last = st.last_sample_ts
            if last is None:
                continue
            st.silent_ts, silent = last, silent + 1
            ep = st.alerts.episode
            held = f"; alert {ep.alert_id} stays open" if ep is not None and ep.fired is not None else ""
            # its count in the id: a silence after a resume that brought no new sample (old ones sent again, refused
            # ones) had the first one's id, and deduplicated, "resumed" stayed the last word (the observability review)
            nth, st.silences = st.silences, st.silences + 1
            # after a restart (or a pause of the input) the quiet counts from then: "for 5 s" of a stream quiet for
            # minutes read as a short gap (an on-call pass)
            since = " since this daemon's input came back after a restart or a pause" if name in from_input else ""
            how_long = ", which says how long" if since else ""
            self._quality(st.quality.event("silent", last, (
                f"no data received for {q:.0f} s{since} (its last sample is stamped {iso(last)}{how_long}){held} — is "
                "its source alive?"), nth=nth))
            self.save(name)
        self.metrics.silent.set(silent)

    def _evict(self, name: str, idle_s: float) -> None:
        """Snapshot a stream and drop it from memory, its document kept at hand (see :meth:`evict_idle`)."""
        st = self.streams[name]
        partial = max(0, st.windows.seen - st.windows.needed_from + 1)  # of a window never completed
        ep, last = st.alerts.episode, st.last_sample_ts
        # paged, then silent: a sensor gone? Said once: not again for a stream woken by a command that read nothing
        # since (each command on it sent another, its wait counted from the wake)
        if ep is not None and ep.fired is not None and last is not None and st.windows.seen:
            self._quality(st.quality.event("stale", last, (
                f"no data received for {idle_s:.0f} s (limits.idle_evict_s; its last sample is stamped {iso(last)}): alert "
                f"{ep.alert_id} stays open until the stream sends again — is its source alive?")))
        # no recalibration between its document and its drop (the scheduler's thread; a threshold it set then was
        # logged, never saved: 64 of 479 evictions under a tight schedule, the concurrency review)
        self.calibrator.leave(name)
        try:
            doc = self.save(name)
        except BaseException:
            self.calibrator.leave(name, False)
            raise
        if doc is not None:
            self.restored[name] = doc
            if st.alerts.silenced_open:
                self.owed[name] = st.silenced_until_ms
        self._drop(name)
        self.ledger.forget(name)
        self.evicted.add(name)
        if st.provisional:
            self.provisional_evicted.add(name)
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
        # a standing silence's own streams: back as new ones, silenced again — not while a restore is incomplete
        # (back then, a stream starts provisional, which no rule silences: its silence was lost)
        renews = (lambda _s, _u: False) if self.restore_incomplete else self.silences.renewer(now_ms)
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
            if holds_commitments(doc, now_ms, partial(renews, name)):  # kept, but outside the bound: counted in it, they forgot others
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
            if topic is not None and name in tombstoned and not self.restore_incomplete:  # a later document may
                # be unread: a tombstone would delete that (its pin, its open alert) whatever its epoch
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
        # past max_streams if need be (evicted again below): under a churn of new ids the streams held sit at the
        # limit, and waiting for room left every such document unresolved and unforgotten, past max_documents, for good
        if not self.wake(stream, over_limit=True):
            return
        st = self.streams[stream]
        written = doc.get("written_ms")
        unseen_s = (now_ms - written) // 1000 if isinstance(written, int) else 0
        try:
            alert_id = self._end_episode(stream, st, stream_gone=True)
            log.warning("alert_resolved_stream_gone", stream=stream[:64], alert_id=alert_id, unseen_s=unseen_s)
        finally:  # at once: woken and held for idle_evict_s, a die-off took the streams' room (and one is over it)
            self._evict(stream, unseen_s)
        if here:
            self.evicted_here.add(stream)

    def _unevict(self, stream: str) -> None:
        """Forget that ``stream`` was evicted (it is back, or its document is gone)."""
        self.evicted.discard(stream)
        self.evicted_here.discard(stream)
        self.provisional_evicted.discard(stream)
        self.owed.pop(stream, None)

    def _drop(self, stream: str) -> None:
        self.streams.pop(stream, None)
        self.calibrator.forget(stream)
        if self.data_clock is not None:
            self.data_clock.forget(stream)
        self.metrics.streams.set(len(self.streams))

    def wake(self, stream: str, reserve: bool = True, over_limit: bool = False) -> bool:
        """Bring a stream this instance evicted (or adopted: :meth:`adopt`) back from its document, for an
        operator's command that names it (it is evicted again when idle). Only since the last assignment:
        after a rebalance its partition may be another instance's, whose newer document this one must not
        overwrite. ``reserve``: leave ``WAKE_RESERVE`` of ``max_streams`` (at least one) to new streams; a
        page owed takes any room left. ``over_limit``: one past ``max_streams``, for a caller that evicts it at once."""
        served, most = self.scorer.route(stream), self.settings.max_streams
        room = over_limit or len(self.streams) < (most - max(1, math.ceil(most * WAKE_RESERVE)) if reserve else most)
        if stream not in self.evicted or stream in self.streams or served is None or not room:
            return False
        st = self._new_stream(stream, served)
        st.last_seen, st.seen_from_doc = time.monotonic(), False
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
        self.provisional_evicted.clear()
        self.owed.clear()
        self._owed_warned.clear()


def _quantile_words(q: float) -> str:
    """``q0.95``, or ``the largest`` for a model thresholded at its maximum (q1 read as a typo)."""
    return "the largest" if q >= 1.0 else f"q{q:g}"
