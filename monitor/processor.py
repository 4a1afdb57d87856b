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

:class:`Processor` is written in parts, one module each, over the state they share
(:mod:`monitor.procstate`): rule 1 in :mod:`monitor.ingest`, the scoring backend's batches in
:mod:`monitor.inflight`, rule 3 and rebalances in :mod:`monitor.committing`, which streams are held in memory
in :mod:`monitor.residency`. This module applies the results: alert transitions, pages, state documents,
stream resets, and the ``/streams`` rows.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from models.errors import describe
from monitor import logs
from monitor.alerts import UNKNOWN_SOURCE, AlertState, Observation, Step, Transition, alert_doc
from monitor.batcher import Batch
from monitor.calibrator import Calibrator
from monitor.committing import Committing
from monitor.inflight import InFlight
from monitor.ingest import Ingest
from monitor.outbox import STATE_HEADER
from monitor.procstate import DataClock, Settings
from monitor.quality import flat_channels
from monitor.residency import Residency
from monitor.sink import json_message
from monitor.source import TP
from monitor.streams import StreamState

__all__ = ["DataClock", "Processor", "Settings", "learn"]

log = logs.get("tsmon.processor")


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


class Processor(Ingest, InFlight, Residency, Committing):
    """One consumer's data path, records to committed offsets (see the module docstring)."""

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
                ep = st.alerts.episode
                self._quality(st.quality.flat_events(flat[i : i + 1], batch.end_ts[i : i + 1],
                                                     ep.alert_id if ep is not None and ep.fired is not None else None))
                self._unscored(stream, st, normal)
                continue
            score = float(window_err[i])
            if not np.isfinite(score):  # not "normal": no calibration, no progress towards resolving
                self.metrics.skipped.labels("nonfinite_score").inc()
                self.throttle.log(log.error, "nonfinite_score", stream=stream, model=batch.model,
                                  end_ts=int(batch.end_ts[i]))
                self._quality(st.quality.unscorable(batch.values[i], channel_err[i], score, int(batch.end_ts[i])))
                self._unscored(stream, st, normal)
                continue
            every.setdefault(stream, []).append(score)
            normal.setdefault(stream, [])
            if self._observe(stream, st, batch, i, score, channel_err[i], normal[stream]):
                self._feed_calibrator(normal, every)  # the evidence of every window the document says applied
                self.save(stream)
        self._feed_calibrator(normal, every)
        for stream, st in touched.items():
            self._release(stream, st)

    def _unscored(self, stream: str, st: StreamState, normal: dict[str, list[float]]) -> None:
        """A window kept out of alerting (flat-lined, or a non-finite score) ends a pending run as a gap does: one
        transient over the threshold before a lead-off and one after it made two windows in a row, and paged under
        ``for`` = 2 an incident of two unrelated windows. A fired episode stays open (:meth:`AlertState.cut`)."""
        if st.alerts.pending is not None or st.alerts.run:
            learn(self.calibrator, stream, st.alerts.cut(), 0.0, normal.setdefault(stream, []))
            st.dirty = True

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
                      remember: bool = True, names: list[str] | None = None, usual: list[float] | None = None,
                      **extra: Any) -> None:
        """Send a transition: a firing one carries its picture; while silenced it is recorded, not paged.
        ``names`` and ``usual``: the channels of the model that scored it and their usual errors, when not the
        stream's model now."""
        ep = t.episode
        status = t.status
        if t.escalation and self.silenced(st):  # a silence set after the page: its update waits for the silence's end
            return
        if status == "firing":
            if not ep.paged:  # a page that went out stays one: a silence set later does not relabel its repeats
                owed, ep.silenced = ep.silenced, self.silenced(st)
                if owed and not ep.silenced:  # recorded as silenced, paged now (also where the window after the
                    extra = {**extra, "after_silence": True}  # silence turned it flapping: a review)
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
        if first and last and last[0] != first[0]:  # a stream whose (keyless) messages came on several partitions
            source.update(last_topic=last[0][0], last_partition=last[0][1])
        det = st.served.detector
        doc = alert_doc(stream, t, st.served.describe(), det.channel_names if names is None else names,
                        source, self.settings.alerts, {"status": status, "silenced": ep.silenced,
                                                       "published_ts": int(self.clock() * 1000), **extra},
                        det.channel_usual if names is None else usual)
        if status == "firing":  # the page, or an update of it (a higher severity, the flapping mark)
            ep.severity_sent, ep.flapping_sent = doc["severity"], ep.flapping
        if t.status == "firing":  # a restored peak has no samples: a silenced episode keeps its picture for its page
            doc["explain"] = self._explain(st, ep.peak) or ep.explain
            ep.explain = doc["explain"] if status == "silenced" else None
        if status == "firing" and not ep.paged:  # once per episode: not a silenced one, not a flapping repeat
            ep.paged = True
            self.metrics.alert_severity.labels(doc["severity"]).inc()
        if remember:  # firing, then resolved: with all its over-threshold windows
            st.remember(ep.alert_id, ep.scores)
        # status and severity as headers too: a pager bridge can drop silenced messages without parsing the body
        headers = [("tsmon.type", b"anomaly"), ("tsmon.status", status.encode()),
                   ("tsmon.severity", str(doc["severity"]).encode()),  # and the resolve of one never paged: dropped too
                   ("tsmon.silenced", b"true" if doc["silenced"] else b"false"),
                   # and where it stands in its incident (a pager-bridge pass: following updates needed the body)
                   ("tsmon.revision", str(doc["revision"]).encode()),
                   ("tsmon.flapping", b"true" if doc["flapping"] else b"false")]
        self.sink.send(json_message(self.settings.alerts_topic, stream, doc, headers))
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
            self.outbox.document(stream, json_message(topic, stream, doc, [STATE_HEADER]), st.home)
            self.undocumented.discard(stream)
            st.doc_from_seq = st.resume_seq(point)  # a replay after a crash must reach this document's
            self._release(stream, st)  # the older document's hold ends now (a shutdown sends no more records)
            st.dirty, st.saved_version = False, int(doc["calibrator"]["versions"][-1]["version"])
        return doc

    def save_changed(self, every: bool = False) -> int:
        """Snapshot the streams that changed since their last one (all of them with ``every``): new windows,
        commands, or a threshold the wall-clock recalibration changed (a stream no window came to since kept its
        new version out of the changelog until one did, and lost it at a crash). Without a changelog, none: every
        snapshot tick built every stream's document and threw it away, on the loop's thread."""
        if self.settings.state_topic is None:
            return 0
        names = [n for n, st in self.streams.items()
                 if every or st.dirty or self.calibrator.threshold(n).version != st.saved_version]
        for name in names:
            self.save(name)
        return len(names)

    def status_rows(self, lags: dict[TP, int]) -> list[dict[str, Any]]:
        now_ms = int(self.clock() * 1000)
        rows = []
        for name, st in self.streams.items():
            tps = self.ledger.partitions_of(name)
            lag = sum(lags[tp] for tp in tps if tp in lags) if any(tp in lags for tp in tps) else None
            rows.append(st.status(name, self.calibrator, lag, now_ms, self.ledger.holding(name)))
        return rows
