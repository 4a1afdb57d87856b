"""What one :class:`monitor.processor.Processor` holds, and the helpers every part of it shares.

The processor is one object written in five modules, one per part of its work: :mod:`monitor.ingest` (records →
windows), :mod:`monitor.inflight` (batches on the scoring backend, results taken in order), :mod:`monitor.processor`
(results → alerts, state documents, ``/streams`` rows), :mod:`monitor.residency` (which streams are held in memory) and
:mod:`monitor.committing` (the commit order and rebalances). Each is a mixin over :class:`ProcessorState`, which
owns the state they share, the settings, and the side outputs every part sends: dead letters and data-quality
events.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from monitor import logs
from monitor.alerts import AlertSettings, Transition, iso
from monitor.batcher import Batch, Batcher
from monitor.calibrator import Calibrator
from monitor.ledger import OffsetLedger
from monitor.metrics import Metrics
from monitor.outbox import Outbox
from monitor.quality import QualityEvent
from monitor.records import BadRecord, Limits
from monitor.scorer import Scorer, Served
from monitor.scoring import Backend, Result, ThreadBackend
from monitor.silences import StandingSilences
from monitor.sink import OutMessage, Sink, json_message
from monitor.source import TP, InRecord
from monitor.streams import StreamState

log = logs.get("tsmon.processor")

DEAD_LETTER_HEADERS = 64 * 1024  # of the producer's headers a dead letter carries on, at most
HEADER_OVERHEAD = 10  # bytes a header costs on the wire beside its name and value (two varints of up to 5 bytes)
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
    model_margin: bool = False  # and × its model's threshold margin (no margin configured)
    forget_after_s: float | None = None  # a document not written for this long is forgotten (:meth:`forget_dormant`)
    max_documents: int | None = None  # documents of streams not held kept at most (the least recently written go)
    clock_step_s: float | None = None  # new input behind the stream this long (its own time): its clock was set back
    silent_after_s: float | None = None  # no input from a stream this long: a ``silent`` event (daemon: 600 s)


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


class ProcessorState:
    """The state the processor's parts share (see the module docstring)."""

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
        # the last changelog read stopped short of its end: streams that start now may have a later document unread
        self.restore_incomplete = False
        self.metrics.documents.set_function(lambda: len(self.restored))  # as it is when scraped (replaced whole too)
        self.read_ts: dict[TP, int] = {}  # per partition, the newest timestamp of the records taken (_moved_on)
        self.knocked: dict[str, int] = {}  # streams with a document refused for want of room: when, last (epoch ms)
        self.evicted: set[str] = set()  # streams this instance evicted since its last assignment (see wake)
        self.provisional_evicted: set[str] = set()  # evicted while provisional: still so when back (same restore)
        self.evicted_here: set[str] = set()  # those of them evicted by evict_idle (not adopted): no input replayed
        self.owed: dict[str, int] = {}  # evicted with a silenced alert open: silence end (epoch ms), page owed
        self.undocumented: set[str] = set()  # started since the last commit: their first document goes with it
        self.outbox = Outbox()  # state documents, then operators' acknowledgements: sent by the next commit
        self.silences = StandingSilences()  # operators' silences for the streams that start while they run
        self.unpersisted: set[str] = set()  # ids of commands whose documents a failed revoke dropped (see revoke)
        self._owed_warned: set[str] = set()
        self.throttle = logs.Throttle()  # per-record, per-window and per-stream events: a sample in the log
        self.clock = time.time  # wall clock: silences and state timestamps
        # monotonic: the daemon's input last came back from a pause (Intake); never paused: none (0.0 was a time,
        # the machine's boot: a wait longer than its uptime was cut to it)
        self.input_since = -math.inf
        self.deadline: float | None = None  # monotonic time by which commits must be done (set at shutdown)
        self.scoring_deadline: float | None = None  # by which scoring must be done (the shutdown's drain)
        # windows a good record makes (samples / hop; decays slowly from the largest seen): sizes the next
        # poll. None until a record told (the daemon's first polls take one record each).
        self.windows_per_record: float | None = None
        # records the next poll may take while that is unknown: doubled by every record dead-lettered meanwhile (a
        # start on a backlog of bad input read it one record per loop turn until a good record came). Safe: until
        # a good record tells its size, the records polled are handed over one at a time (Intake._hand_over)
        self.unsized_room = 1
        # the same per byte of message: messages of another size make windows in proportion to their bytes, not
        # their number (hands a poll's records over in slices that fit, see Daemon._hand_over)
        self.windows_per_byte: float | None = None
        self.data_clock: DataClock | None = None  # calibrator.clock = "data": recalibrations between windows
        self.peak_pending = 0  # most windows waiting right after a poll was handled (benchmarks, tests)
        # called after each batch is applied: (batch, wall-clock ms of the decision, scoring seconds)
        self.on_decided: Callable[[Batch, float, float], None] | None = None

    if TYPE_CHECKING:  # implemented by the other parts (see the module docstring)
        def score_ready(self, force: bool = False) -> int: ...
        def _after_scoring(self, batch: Batch, window_err: np.ndarray, channel_err: np.ndarray) -> None: ...
        def publish_alert(self, stream: str, st: StreamState, t: Transition, arrived: float | None = None,
                          remember: bool = True, names: list[str] | None = None, usual: list[float] | None = None,
                          **extra: Any) -> None: ...
        def _end_episode(self, stream: str, st: StreamState, **why: Any) -> str | None: ...
        def save(self, stream: str) -> dict[str, Any] | None: ...
        def _new_stream(self, stream: str, served: Served) -> StreamState: ...
        def _drop(self, stream: str) -> None: ...
        def wake(self, stream: str, reserve: bool = True) -> bool: ...
        def forget_evicted(self) -> None: ...

    @property
    def pending(self) -> int:
        """Windows not yet scored and applied (waiting in the batcher or on the scoring thread)."""
        return self.batcher.size + sum(len(b) for b, _, _ in self._inflight)

    def _release(self, stream: str, st: StreamState) -> None:
        """Let the ledger forget input that no future window and no open episode needs."""
        point = st.windows.phase()  # the next window's start, or for hop ≥ window the last sample (its phase)
        seqs = [point[0] if point is not None else st.windows.needed_from]
        if st.unscored:
            seqs.append(st.unscored[0][0])
        # max_hold_windows windows after the first one, and never fewer than `for`, which a pending episode (left to
        # the replay by the state document) needs: counted from its first sample with no room for the window itself,
        # at W/H ≥ max_hold_windows a one-window pending episode was "too long", its input committed past, and a
        # crash re-fired it under a new id. Bounded all the same: windows that stop reaching the alert state (flat,
        # non-finite) end a pending run but leave a fired episode open for good, and the partition's commit with it
        limit = st.served.window + max(self.settings.max_hold_windows, st.alerts.settings.for_windows) * st.served.hop
        if (hold := st.alerts.hold_seq) is not None and st.windows.seen - hold <= limit:  # an open episode
            seqs.append(hold)
        if st.doc_from_seq is not None:  # where the stored state resumes: held whatever its age (dropped past the
            seqs.append(st.doc_from_seq)  # limit, the commit passed it, and a crash replayed on another window grid:
            if st.windows.seen - st.doc_from_seq > limit:  # an incident paged again under another id); a document
                self.undocumented.add(stream)  # that far behind is replaced at the next commit, which moves the hold
        self.ledger.release(stream, min(seqs))

    def _base_gap_ms(self, served: Served) -> float | None:
        """The route's ``gap_ms``, else the daemon's."""
        return served.gap_ms if served.gap_ms is not None else self.settings.gap_ms

    def alert_settings(self, served: Served) -> AlertSettings:
        """The daemon's alert settings with the route's own debounce, where it sets one."""
        a = self.settings.alerts
        return replace(a, for_windows=served.for_windows or a.for_windows,
                       resolve_after=served.resolve_after or a.resolve_after)

    def silenced(self, st: StreamState) -> bool:
        return st.silenced_until_ms > self.clock() * 1000

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
        headers = [*_producers_headers(rec), ("tsmon.reason", bad.reason.encode()),
                   ("tsmon.detail", bad.detail.encode()[:1000]),
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


def _producers_headers(rec: InRecord) -> list[tuple[str, bytes]]:
    """The producer's own headers a dead letter carries on (a trace id: a pipeline owner's pass found them dropped),
    up to DEAD_LETTER_HEADERS bytes; none named ``tsmon.*``, which are tsmon's (a producer could not fake a reason)."""
    kept, size, dropped = [], 0, 0
    for name, value in rec.headers:
        if not isinstance(name, str) or name.lower().startswith("tsmon.") or not isinstance(value, bytes | None):
            continue
        # each header's own cost counted: 268 150 empty ones counted 0 and made a dead letter over the producer's
        # max_request_size from an input record under it (undeliverable: the bad record not on the dead-letter topic)
        cost = HEADER_OVERHEAD + len(name.encode("utf-8", "replace")) + len(value or b"")
        if size + cost > DEAD_LETTER_HEADERS:  # one too large: those after it still go
            dropped += 1
            continue
        size += cost
        kept.append((name, value or b""))
    return kept + ([("tsmon.headers_dropped", str(dropped).encode())] if dropped else [])
