"""The state of one stream inside the daemon, and its persisted form (the changelog document).

Owns what tsmon knows about a stream besides its threshold (which the calibrator owns): its windows,
data-quality tracker, alert state machine, operator controls (silence), on-call feedback, counters for
``/streams`` — and the JSON document that carries all of it, with the calibrator's part, across a restart
or a rebalance. ``applied_until_ts`` is the end time of the last window the state includes: after a
restore, replayed windows up to it are scored again but not applied twice.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.alerts import AlertState, Episode, generation_of, iso
from monitor.calibrator import EMPTY_ERRORS, Calibrator
from monitor.quality import StreamQuality
from monitor.records import MAX_TS_MS
from monitor.scorer import Served
from monitor.source import TP
from monitor.state import doc_epoch
from monitor.windows import BeatWindows, StreamWindows

DOC_VERSION = 1
COMMANDS_KEPT = 32  # ids of the operator commands applied to a stream that its document keeps (newest)
NO_FEEDBACK = {"confirmed": 0, "false_positive": 0}
MAX_SKIP = 2**31  # window_from_skip: samples before the next window's start, never more than a hop


@dataclass
class RecentAlert:
    """An alert the stream raised, remembered for on-call feedback."""

    alert_id: str
    scores: np.ndarray  # its over-threshold window errors, float64 exactly as the calibrator was fed them (feedback
    verdict: str | None = None  # takes them back by value); an array: as Python floats 20 × 64 held 41 kB a stream

    def to_doc(self) -> dict[str, Any]:
        return {"alert_id": self.alert_id, "scores": self.scores.tolist(), "verdict": self.verdict}


@dataclass(frozen=True, slots=True)
class BehindRun:
    """New records refused as behind the stream's last sample, in a row and in order among themselves: held for
    ``windows.clock_step_s``, they are its clock set back."""

    first_ts: int  # the first one's first sample
    last_ts: int  # the last one's last sample
    records: int
    first_produced: int  # the first one's Kafka timestamp (ms)
    first_read: float  # this host's clock (ms) when the first one was taken
    produce_times: bool  # every one's Kafka timestamp is a time of production (set, and not its first sample's)


@dataclass
class StreamState:
    served: Served
    windows: StreamWindows | BeatWindows
    quality: StreamQuality
    alerts: AlertState
    unscored: deque[tuple[int, int]] = field(default_factory=deque)  # (first sample number, its time) of each
    # window waiting in the batcher
    scored: int = 0  # windows applied to the alert state
    last_window_ts: int = -1  # end time of the last applied window
    applied_until_ts: int = -1  # restored state already includes windows ending at or before this
    silenced_until_ms: int = 0  # epoch ms; alerts are recorded as silenced, not published as firing
    recent_alerts: deque[RecentAlert] = field(default_factory=lambda: deque(maxlen=20))
    feedback: dict[str, int] = field(default_factory=lambda: dict(NO_FEEDBACK))
    dirty: bool = True  # changed since its last snapshot
    # the threshold version its last document holds: a scheduled recalibration (another thread) changes it alone
    saved_version: int = -1
    last_seen: float = 0.0  # monotonic time of its last new record (idle eviction), or its document's seen_ms
    seen_ms: int | None = None  # wall-clock ms of its last new record, kept in its documents (None: not known)
    # last_seen is its document's: no new record since a restore for a replay (see Residency.evict_idle)
    seen_from_doc: bool = False
    doc_from_seq: int | None = None  # the replay point of the last document sent: input from it stays held
    orphan: Episode | None = None  # a fired episode restored for another model version, to resolve
    # the last sample of the document it continued from: new input must follow it (the order rule across an eviction
    # or a restore — passed over as a replay, a clock set back went unscored); which input is new: see replay_until
    doc_last_ts: int | None = None
    home: frozenset[TP] = frozenset()  # the input partitions its records came from (stored in its document)
    last_tp: TP | None = None  # the partition of its latest record taken (messages on several: keyless)
    read_until: dict[TP, int] = field(default_factory=dict)  # per partition, the offset of the last record taken
    # restored for a replay: records at or before these offsets come again, later ones are new; None: every one is
    # new (back from an eviction here, or never restored)
    replay_until: dict[TP, int] | None = None
    epoch: int = 0  # a fencing token, above its document's and at least the clock at its start: see state.fresh_epoch
    fresh: bool = False  # started here without a document (new): a standing silence's rule may apply to it
    provisional: bool = False  # started while the changelog was not read to its end: later documents supersede its
    behind_run: BehindRun | None = None  # new records refused as behind its last sample (Processor._set_back)
    # per partition, the offset of the record its clock step restarted it at: a replay of those before it (old time,
    # which the state no longer windows) is passed over, not windowed anew into the new time's alert state
    time_from: dict[TP, int] = field(default_factory=dict)
    silent_ts: int | None = None  # its last sample when it was reported silent, until it sends again (``resumed``)
    silences: int = 0  # ``silent`` events it had: a second one with no new sample since had the first one's id
    # the operator commands applied to it: a command is applied once to each stream, wherever it is held when the
    # command is read (``Controller``), not once per instance
    commands: deque[str] = field(default_factory=lambda: deque(maxlen=COMMANDS_KEPT))
    since_ms: int = 0  # wall-clock ms it first started (on any instance; 0: before documents kept it)
    arrival_gap_s: float = 0.0  # the usual longest wait between its records here (a decaying maximum)
    gaps_seen: int = 0  # waits between its records measured here

    @property
    def precision(self) -> float | None:
        """Live precision estimate from on-call verdicts (None before the first one)."""
        n = self.feedback["confirmed"] + self.feedback["false_positive"]
        return self.feedback["confirmed"] / n if n else None

    def reset(self, alerts: AlertState) -> None:
        """Forget windows, alert state and feedback (an operator's reset); sample numbers go on, and so does a
        silence (silenced for maintenance, then reset for the sensor replaced in it: the next alert paged)."""
        self.alerts = alerts
        self.windows.restart()
        self.recent_alerts.clear()
        self.feedback = dict(NO_FEEDBACK)

    def remember(self, alert_id: str, scores: list[float]) -> None:
        """Keep an alert for feedback, with the errors of its over-threshold windows so far (called when it
        fires, and again when it resolves: a verdict then covers the whole episode, up to 64 windows)."""
        known = next((a for a in self.recent_alerts if a.alert_id == alert_id), None)
        if known is None:
            self.recent_alerts.append(RecentAlert(alert_id, np.array(scores, dtype="float64")))
        elif known.verdict is None:  # a verdict already given fed or took back the errors it had then
            known.scores = np.array(scores, dtype="float64")

    def replay_point(self) -> tuple[int, int, int] | None:
        """Where a replay's sliding windows must start, as ``(seq, ts, skip)`` (see ``StreamWindows.phase``):
        the first window not yet applied — of a pending episode, waiting in the batcher, or still to be cut.
        None for beat windows, which a replay finds again by their R peaks."""
        nxt = self.windows.phase()
        if nxt is None:
            return None
        points = [nxt]
        if self.unscored:
            points.append((self.unscored[0][0], self.unscored[0][1], 0))
        if (ep := self.alerts.pending) is not None:
            points.append((ep.start.start_seq, ep.start.start_ts, 0))
        return min(points)

    def resume_seq(self, point: tuple[int, int, int] | None) -> int:
        """The sample a replay after a crash must read from to rebuild what a document written now (at
        ``point``, :meth:`replay_point`) does not hold: that point's; for beat windows, which have none, the
        first sample a window not yet applied needs — to be cut, waiting to be scored, or of a pending episode
        (without it the commit passed every snapshot, and a crash lost the beats scored since the last one)."""
        if point is not None:
            return point[0]
        seqs = [self.windows.needed_from]
        if self.unscored:
            seqs.append(self.unscored[0][0])
        if (ep := self.alerts.pending) is not None:
            seqs.append(ep.start.start_seq)
        return min(seqs)

    @property
    def last_sample_ts(self) -> int | None:
        """The time of its last sample: the later of the one taken here and the one its document had (a stream restored
        or woken for a command and saved before any input: its document lost it, and with it the order rule at the
        next restore)."""
        ts = [t for t in (self.windows.last_ts, self.doc_last_ts) if t is not None]
        return max(ts) if ts else None  # mid-replay the windows are behind the document's

    def is_new(self, rec_tp: TP, offset: int) -> bool:
        """Is the record at ``offset`` of ``rec_tp`` new input (held to the order rule against :attr:`doc_last_ts`),
        not a replay of what the document includes? A partition the document records no offset for (earlier
        versions): every record is taken as a possible replay."""
        if self.replay_until is None:
            return True
        until = self.replay_until.get(rec_tp)
        return until is not None and offset > until

    def heard(self, now: float, now_ms: int) -> None:
        """It sent a new record (monotonic ``now``, wall-clock ``now_ms``): its idle clock starts again here."""
        self.last_seen, self.seen_ms, self.seen_from_doc = now, now_ms, False

    def read_before(self, rec_tp: TP, offset: int) -> bool:
        """Was the record at ``offset`` of ``rec_tp`` read before, by the owner whose document this stream continued
        from (a replay)? Not when the document lists no offset for the partition (a partition the stream had not
        used, more partitions, documents of earlier versions): taken as new, so that its idle clock never stops
        for a stream that sends (unlike :meth:`is_new`, which holds such records to no order rule)."""
        until = None if self.replay_until is None else self.replay_until.get(rec_tp)
        return until is not None and offset <= until

    def read_offsets(self) -> dict[TP, int]:
        """Per partition, the offset of the last record its state includes: read here, or included by the document
        it was restored from — the later of the two (mid-replay, the offsets read so far are below the document's:
        taken instead, the next restore held the records between to the order rule, as new input)."""
        out = dict(self.replay_until or {})
        for tp, offset in self.read_until.items():
            out[tp] = max(offset, out.get(tp, -1))
        return out

    def to_doc(self, stream: str, calibrator: Calibrator, written_ms: int,
               point: tuple[int, int, int] | None = None) -> dict[str, Any]:
        """The changelog document (``point``: :meth:`replay_point`, when the caller has it). A pending episode
        is not stored (see :meth:`AlertState.to_doc`): the windows from its first one on count as not applied,
        so the replay — which the ledger holds the input for — rebuilds it, and ``window_from_ts`` makes the
        replay cut the same windows (same alert id)."""
        applied, replayed = max(self.last_window_ts, self.applied_until_ts), 0
        if (ep := self.alerts.pending) is not None:
            applied, replayed = min(applied, ep.start.end_ts - 1), ep.windows_over
        point = point or self.replay_point()
        return {"type": "stream_state", "v": DOC_VERSION, "stream": stream, "model": self.served.describe(),
                "artifact_threshold": self.served.detector.threshold.value,
                "written_ms": written_ms, "applied_until_ts": applied,
                "window_from_ts": point[1] if point else None, "window_from_skip": point[2] if point else 0,
                "last_sample_ts": self.last_sample_ts, "silent_reported_ts": self.silent_ts, "silences": self.silences,
                "commands": list(self.commands), "since_ms": self.since_ms,
                "arrival_gap_s": round(self.arrival_gap_s, 3) if self.gaps_seen else None, "seen_ms": self.seen_ms,
                "sample_periods_ms": list(self.quality.periods()),
                "quality_cooldowns": self.quality.cooldowns(),
                "channels": list(self.served.detector.names), "channel_usual": list(self.served.detector.channel_usual),
                "calibrator": calibrator.export(stream, replayed), "alerts": self.alerts.to_doc(),
                "silenced_until_ms": self.silenced_until_ms, "feedback": dict(self.feedback),
                "recent_alerts": [a.to_doc() for a in self.recent_alerts],
                "partitions": [[t, p] for t, p in sorted(self.home)],
                "read_offsets": [[t, p, o] for (t, p), o in sorted(self.read_offsets().items())],
                "epoch": self.epoch,
                "time_from_offsets": [[t, p, o] for (t, p), o in sorted(self.time_from.items())]}

    def restore(self, stream: str, doc: dict[str, Any], calibrator: Calibrator, replayed: bool = True) -> str:
        """Continue from a changelog document; returns what was restored (``full``, ``controls``, or
        ``evidence_unreadable``: all but the calibrator's evidence, which this version cannot read).

        ``replayed``: input the document already includes may come again (a new owner replays from the commit),
        so the windows align on the stored point and pass over what precedes it. A stream this instance evicted
        comes back with new input only: it continues after its last sample, and older input is refused by the
        order rule as it would have been without the eviction (passed over as a replay, a day of data from a
        clock set back went unscored, uncounted and not dead-lettered).

        A document written for another model version — or for the same weights with another artifact
        threshold (retrained with ``--threshold-quantile``: its threshold was ignored, even by reset-stream) —
        restores only the operator's controls (silence, freeze) and the feedback: thresholds, a pin and alert
        state belong to the model that produced them.
        """
        # first, whatever fails after: a stream that starts afresh from a document it cannot read must still write
        # past it (at epoch 0 its documents lost to that one at every restore). An owner continuing from a changelog
        # read is the next owner; back from an eviction here, or woken, it is the same one (counting those, its late
        # document tied with the next owner's, and the later offset won)
        self.epoch = doc_epoch(doc) + (1 if replayed else 0)
        if doc.get("v") != DOC_VERSION:
            raise ValueError(f"unknown state document version {doc.get('v')!r}")
        silenced = int(doc["silenced_until_ms"])
        feedback = {k: int(doc["feedback"][k]) for k in NO_FEEDBACK}
        if not 0 <= silenced < MAX_TS_MS or min(feedback.values()) < 0:  # a silence to 1e20 ms restored, then
            # stopped the daemon at the first /streams (no date that far)
            raise ValueError(f"silenced_until_ms must be a time below {MAX_TS_MS} ms and feedback counts >= 0, got "
                             f"{silenced!r} and {feedback!r}")
        last_sample = doc.get("last_sample_ts")  # absent from documents of earlier versions
        if last_sample is not None and (isinstance(last_sample, bool) or not isinstance(last_sample, int)
                                        or abs(last_sample) > MAX_TS_MS):
            raise TypeError(f"last_sample_ts must be an integer time, got {last_sample!r}")
        silent = doc.get("silent_reported_ts")  # absent from documents of earlier versions
        if silent is not None and (isinstance(silent, bool) or not isinstance(silent, int) or abs(silent) > MAX_TS_MS):
            raise TypeError(f"silent_reported_ts must be an integer time, got {silent!r}")
        periods = doc.get("sample_periods_ms", [None, None])  # absent from documents of earlier versions
        if not (isinstance(periods, list) and len(periods) == 2
                and all(p is None or (isinstance(p, int | float) and not isinstance(p, bool) and math.isfinite(p)
                                      and p > 0) for p in periods)):
            raise TypeError(f"sample_periods_ms must be two periods (ms > 0) or null, got {periods!r}")
        periods = [None if p is None else float(p) for p in periods]
        artifact = self.served.detector.threshold.value  # absent from documents of earlier versions: the same
        retrained = doc.get("artifact_threshold", artifact) != artifact  # same weights, a new threshold
        if doc["model"] != self.served.describe() or retrained:
            frozen = doc["calibrator"]["frozen"] is True  # a pinned value is on the old model's scale
            generation = generation_of(doc["alerts"]) + 1
            old = None
            if doc["alerts"].get("episode"):  # paged under the old model: the processor resolves it
                old = AlertState(self.alerts.stream, str(doc["model"].get("name", "")), self.alerts.settings)
                old.restore(doc["alerts"], self.windows.seen)  # checked before anything is applied
            self._continue_from(doc, silent, last_sample, replayed)
            self.silenced_until_ms, self.feedback = silenced, feedback
            self.quality.resume(*periods)  # the stream's rate, whatever model scores it
            self.quality.resume_cooldowns(doc.get("quality_cooldowns"))
            if not replayed:  # the order rule is the stream's, whatever model scores it
                self.doc_last_ts = last_sample
            calibrator.set_frozen(stream, frozen)
            self.alerts.generation = generation
            self.orphan = old.episode if old is not None else None
            return "controls"
        alerts = AlertState(self.alerts.stream, self.alerts.model, self.alerts.settings)
        alerts.restore(doc["alerts"], self.windows.seen)
        recent = [RecentAlert(str(a["alert_id"]), np.array([float(x) for x in a["scores"]], dtype="float64"), a["verdict"])
                  for a in doc["recent_alerts"]]
        applied = int(doc["applied_until_ts"])
        if abs(applied) > MAX_TS_MS:  # every window at or before it is skipped as restored: 1e18 stopped the stream
            raise ValueError(f"applied_until_ts must be a time within {MAX_TS_MS} ms, got {applied!r}")
        window_from = doc.get("window_from_ts")  # absent from documents of earlier versions
        window_from = None if window_from is None else (int(window_from), int(doc.get("window_from_skip", 0)))
        if window_from is not None and not (abs(window_from[0]) <= MAX_TS_MS and 0 <= window_from[1] <= MAX_SKIP):
            raise ValueError(f"window_from_ts must be a time within {MAX_TS_MS} ms and window_from_skip a count in "
                             f"0..{MAX_SKIP}, got {window_from!r}")  # 1e18 of either: no sample ever cut a window
        how = "full"
        try:
            calibrator.restore(stream, doc["calibrator"])  # validated whole; the last step that can fail
        except (KeyError, TypeError, ValueError):  # evidence in an encoding this version cannot read (another
            # version's): the threshold, its versions, the pin and freeze, the silence and the open alert still hold
            # (refused whole, a mixed-version group lost them and paged the open alert again under a new id)
            calibrator.restore(stream, {**doc["calibrator"], "normal": EMPTY_ERRORS, "recent": EMPTY_ERRORS,
                                        "recent_frozen": 0})
            how = "evidence_unreadable"
        self._continue_from(doc, silent, last_sample, replayed)
        self.silenced_until_ms, self.feedback, self.alerts, self.applied_until_ts = silenced, feedback, alerts, applied
        self.quality.resume(*periods)
        self.quality.resume_cooldowns(doc.get("quality_cooldowns"))
        self.recent_alerts.extend(recent)
        if not replayed:  # no window restart, no gap event for the eviction's silence: the order rule only
            self.doc_last_ts = last_sample
        elif window_from is not None:
            self.windows.align(*window_from)
        return how

    def _continue_from(self, doc: dict[str, Any], silent: int | None, last_sample: int | None, replayed: bool) -> None:
        """What the stream takes from a document whatever model scores it, once nothing in it can fail: taken
        before a check that failed, a rejected document's command ids stayed recorded as applied (the controller
        then skipped the pin they made) and its offsets ruled the replay."""
        self.home = self.home or doc_partitions(doc)
        self.time_from = doc_offsets(doc, "time_from_offsets")
        self.silent_ts = silent  # the stream's, whatever model scores it: its next data says it resumed
        silences = doc.get("silences", 0)  # absent from documents of earlier versions
        self.silences = silences if isinstance(silences, int) and not isinstance(silences, bool) and silences >= 0 else 0
        self.commands.extend(doc_commands(doc))
        self.since_ms = doc_since_ms(doc)
        gap = doc.get("arrival_gap_s")  # its usual wait: a restart did not make a gateway's next upload a silence
        if isinstance(gap, int | float) and not isinstance(gap, bool) and math.isfinite(gap) and gap >= 0:
            self.arrival_gap_s, self.gaps_seen = float(gap), 1
        for key in ("seen_ms", "written_ms"):  # absent from documents of earlier versions: when it was written,
            seen = doc.get(key)  # after its last record (kept from then on: not a silence restarted at each restore)
            if isinstance(seen, int) and not isinstance(seen, bool) and seen > 0:
                self.seen_ms = seen
                break
        if replayed:
            self.replay_until, self.doc_last_ts = doc_offsets(doc), last_sample
        else:  # its records since were taken here: kept for its next document (woken, it wrote none)
            self.read_until = doc_offsets(doc)

    def status(self, stream: str, calibrator: Calibrator, lag: int | None, now_ms: int,
               holding: int) -> dict[str, Any]:
        """One row of ``/streams`` and ``tsmon status``; ``holding``: records it keeps from being committed."""
        th, controls = calibrator.threshold(stream), calibrator.controls(stream)
        source = "pinned" if controls["pinned"] else "frozen" if controls["frozen"] else th.source
        ep = self.alerts.episode
        # "silenced": fired while the stream was silenced and never paged since (an on-call pass read "firing")
        state = "ok" if ep is None else "pending" if ep.fired is None else "silenced" if ep.silenced else \
            "flapping" if ep.flapping else "firing"
        silenced = self.silenced_until_ms > now_ms
        last = self.last_sample_ts  # its document's too: a stream woken by a command showed none, "silent" or not
        return {"stream": stream, "model": self.served.name, "last_sample_ts": last,
                "last_sample_time": iso(last) if last is not None else None, "windows_scored": self.scored,
                "threshold": th.value, "threshold_source": source, "threshold_version": th.version,
                "alert_state": state, "alert_id": ep.alert_id if ep and ep.fired else None,
                "silenced_until_ms": self.silenced_until_ms if silenced else None,
                "silenced_until_time": iso(self.silenced_until_ms) if silenced else None, "lag": lag,
                "holding_back": holding, "silent": self.silent_ts is not None, "precision": self.precision,
                "feedback": dict(self.feedback), "provisional": self.provisional,
                "threshold_held": calibrator.lowering_held(stream)}


def doc_commands(doc: dict[str, Any]) -> list[str]:
    """The ids of the operator commands a document says were applied to its stream (none in documents of earlier
    versions)."""
    ids = doc.get("commands")
    return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


def doc_since_ms(doc: dict[str, Any]) -> int:
    """When a document's stream first started (0 in documents of earlier versions: as if always there)."""
    since = doc.get("since_ms")
    return since if isinstance(since, int) and not isinstance(since, bool) else 0


def doc_partitions(doc: dict[str, Any]) -> frozenset[TP]:
    """The input partitions a changelog document says its stream came from (none if it does not say:
    documents of earlier versions)."""
    tps = doc.get("partitions")
    if not isinstance(tps, list):
        return frozenset()
    return frozenset((t, p) for t, p in (x for x in tps if isinstance(x, list) and len(x) == 2)
                     if isinstance(t, str) and isinstance(p, int) and not isinstance(p, bool))


def doc_offsets(doc: dict[str, Any], key: str = "read_offsets") -> dict[TP, int]:
    """Per input partition, the offset of the last record a changelog document's state includes (malformed entries
    are left out: their records are taken as possible replays, as before documents recorded them); with ``key`` =
    ``time_from_offsets``, of the record its stream's time restarted at (a clock set back)."""
    rows = doc.get(key)
    if not isinstance(rows, list):
        return {}
    return {(r[0], r[1]): r[2] for r in rows if isinstance(r, list) and len(r) == 3 and isinstance(r[0], str)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in r[1:])}


def _fired(doc: dict[str, Any]) -> bool:
    """Does the document hold an alert fired and not resolved?"""
    alerts = doc.get("alerts")
    return isinstance(alerts, dict) and alerts.get("episode") is not None


def _silence_running(doc: dict[str, Any], now_ms: int) -> bool:
    until = doc.get("silenced_until_ms")
    return isinstance(until, int) and until > now_ms


def holds_commitments(doc: dict[str, Any], now_ms: int, renewed: Callable[[int], bool] = lambda _until: False) -> bool:
    """Does the document hold what forgetting it would silently undo: an operator's pin or freeze, a silence
    still running, or an alert fired and not resolved (its page would stay open for good)? ``renewed``: would a
    standing silence give the stream, back as a new one, a silence running at least this long (then forgetting its
    own undoes nothing: under ``silence 'sess-*'`` every churned id's document was kept, past max_documents)?"""
    cal = doc.get("calibrator")
    controls = isinstance(cal, dict) and (cal.get("pinned") is True or cal.get("frozen") is True)
    silence = _silence_running(doc, now_ms) and not renewed(doc["silenced_until_ms"])
    return controls or _fired(doc) or silence


def open_alert_unsilenced(doc: dict[str, Any], now_ms: int) -> bool:
    """Does the document hold a fired alert that no silence holds back (what :meth:`Processor.forget_dormant`
    resolves once its stream is unseen for ``forget_after_s``)?"""
    return _fired(doc) and not _silence_running(doc, now_ms)


def owes_page(doc: dict[str, Any]) -> bool:
    """Does the document hold a fired episode recorded as silenced (its page is owed when the silence ends)?"""
    alerts = doc.get("alerts")
    episode = alerts.get("episode") if isinstance(alerts, dict) else None
    return isinstance(episode, dict) and episode.get("silenced") is True
