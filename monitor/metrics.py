"""Counters of the daemon, in a Prometheus registry of its own (one per daemon, so tests never collide).

Owns the names of what is counted. Every record ends in exactly one outcome of
``tsmon_records_total``; every dead letter, data-quality event, alert message and scored window is
counted; so are firing alerts by severity, recalibrations by outcome, operator commands and state
snapshots. Histograms time the micro-batches (size and scoring time) and the alert latency; gauges
hold the consumer lag per partition, the last state restore's duration and each stream's threshold.
The threshold gauge is capped at ``max_stream_labels`` streams (:meth:`Metrics.set_threshold`): later
streams are only counted in ``tsmon_threshold_streams_unlabelled``, so a flood of stream ids cannot
blow up the scrape. :meth:`Metrics.snapshot` gives the totals as a plain dict for logs and the demo's
summary; :meth:`Metrics.total` sums one counter.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily

from monitor.quality import KINDS as QUALITY_KINDS
from monitor.records import DEAD_LETTER_REASONS

SKIP_REASONS = ("restored", "flatline", "nonfinite_score")  # why a scored window is kept out of alerting
RETRY_CAUSES = ("sink", "broker", "input")  # why a commit was put off


class Metrics:
    def __init__(self, max_stream_labels: int = 500) -> None:
        self.registry = r = CollectorRegistry()
        # the process's own series (start time, resident memory, CPU, open files; Python's GC and version): a crash
        # loop under systemd or compose and memory nearing its limit are visible only through these
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        self.records = Counter("tsmon_records", "Input records by outcome (ok, dead_letter)", ["outcome"], registry=r)
        self.samples = Counter("tsmon_samples", "Samples accepted into windows", registry=r)
        self.overlapped = Counter("tsmon_samples_overlapped", "Samples dropped from the start of a chunk that overlaps "
                                  "its stream's last sample (the rest of the chunk taken)", registry=r)
        self.dead_letters = Counter("tsmon_dead_letters", "Records sent to the dead-letter topic", ["reason"],
                                    registry=r)
        self.windows = Counter("tsmon_windows_scored", "Windows scored", ["model"], registry=r)
        self.skipped = Counter("tsmon_windows_skipped", "Scored windows kept out of alerting", ["why"], registry=r)
        self.alerts = Counter("tsmon_alert_messages", "Alert messages published", ["status"], registry=r)
        self.quality = Counter("tsmon_data_quality_events", "Data-quality findings", ["kind"], registry=r)
        self.commits = Counter("tsmon_commits", "Offset commits", registry=r)
        self.batch_seconds = Histogram("tsmon_batch_seconds", "Scoring time of one micro-batch", registry=r,
                                       buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3))
        self.streams = Gauge("tsmon_streams", "Streams held in memory", registry=r)
        self.silenced = Gauge("tsmon_streams_silenced", "Streams held whose alerts are silenced now (ctl silence)",
                              registry=r)
        self.pinned = Gauge("tsmon_streams_pinned", "Streams held whose threshold is pinned (ctl pin)", registry=r)
        self.frozen = Gauge("tsmon_streams_frozen", "Streams held frozen by a freeze of their own (ctl freeze "
                            "--stream); see tsmon_calibration_frozen_all", registry=r)
        self.frozen_all = Gauge("tsmon_calibration_frozen_all", "1 while calibration is frozen daemon-wide "
                                "(ctl freeze --all)", registry=r)
        self.silent = Gauge("tsmon_streams_silent", "Streams reported silent (quality.silent_after_s) that have not "
                            "sent since, held here (one leaves it at its eviction)", registry=r)
        self.evicted = Counter("tsmon_streams_evicted", "Idle streams snapshotted and dropped from memory",
                               registry=r)
        self.broker_up = Gauge("tsmon_broker_up", "0 while the consumer has no open connection to any broker, or "
                               "holds partitions and has sent no group heartbeat for a session timeout, or since a commit "
                               "failed until one succeeds", registry=r)
        self.broker_up.set(1)
        self.undeliverable = Counter("tsmon_undeliverable_messages", "Output the broker can never take (too large, "
                                     "not authorised), given up and logged", ["topic"], registry=r)
        self.retries = Counter("tsmon_commit_retries", "Commits put off because the sink or the broker failed",
                               ["cause"], registry=r)
        self.loop_turned = Gauge("tsmon_loop_last_turn_timestamp_seconds", "Unix time the consuming loop last "
                                 "turned: a hung loop leaves every other series frozen, this one too", registry=r)
        self.loop_turned.set_to_current_time()
        self.paused = Gauge("tsmon_consumption_paused", "1 while input is paused because the sink or broker fails",
                            registry=r)
        self.batch_size = Histogram("tsmon_batch_size", "Windows per scored micro-batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
        self.alert_latency = Histogram("tsmon_alert_latency_seconds",
                                       "From the window entering the batcher (the record with its last sample handled) "
                                       "to its alert handed to the producer", registry=r,
                                       buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30))
        self.event_lag = Histogram("tsmon_event_lag_seconds",
                                   "Wall clock at a micro-batch's decision minus its oldest window's last sample "
                                   "timestamp (sample-to-decision latency when producers stamp wall-clock time)",
                                   registry=r, buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 1000))
        self.backpressure = Gauge("tsmon_backpressure", "1 while input is paused because scoring falls behind",
                                  registry=r)
        self.backpressure_pauses = Counter("tsmon_backpressure_pauses", "Times input was paused because scoring "
                                           "fell behind", registry=r)
        self.uncommitted = Gauge("tsmon_uncommitted_records", "Records read past the offset last committed on the "
                                 "partition: what a crash now would replay (failing commits, or a quiet stream's "
                                 "partial window, which holds it back until it is cut or the stream is evicted)",
                                 ["topic", "partition"], registry=r)
        self.lag = Gauge("tsmon_consumer_lag", "Records behind the partition's high watermark", ["topic", "partition"],
                         registry=r)
        self.alert_severity = Counter("tsmon_alerts_fired", "Alerts paged, once per episode (not while silenced), "
                                      "by severity", ["severity"], registry=r)
        self.calibrations = Counter("tsmon_calibrations", "Threshold recalibrations by outcome", ["outcome"],
                                    registry=r)
        self.refusing = Gauge("tsmon_threshold_raise_refused_streams", "Streams whose last recalibration refused "
                              "to raise their threshold to a new level (the drift guard)", registry=r)
        self.commands = Counter("tsmon_commands", "Operator commands by command and outcome", ["command", "outcome"],
                                registry=r)
        self.snapshots = Counter("tsmon_state_snapshots", "Stream states written to the changelog", registry=r)
        self.restore_seconds = Gauge("tsmon_state_restore_seconds", "Time the last state restore took", registry=r)
        self.restore_incomplete = Gauge("tsmon_state_restore_incomplete", "1 while the last state restore was cut "
                                        "short (streams it did not reach run provisionally), else 0", registry=r)
        self.documents = Gauge("tsmon_state_documents", "Changelog documents held for streams not in memory "
                               "(evicted, or not seen since the last restore)", registry=r)
        self.forgotten = Counter("tsmon_state_forgotten", "Documents of streams unseen for state.forget_after_s "
                                 "forgotten (with a tombstone for this instance's own)", registry=r)
        r.register(_Thresholds(self))  # tsmon_threshold{stream, source}, read under the lock that sets it
        self.thresholds_unlabelled = Gauge("tsmon_threshold_streams_unlabelled",
                                "Streams over the label cap, their threshold not exported", registry=r)
        self._counters = {c.describe()[0].name: c for c in (self.records, self.samples, self.overlapped, self.dead_letters,
                                                            self.windows, self.skipped, self.alerts, self.quality,
                                                            self.commits, self.alert_severity, self.calibrations,
                                                            self.commands, self.snapshots, self.evicted, self.retries,
                                                            self.undeliverable, self.forgotten)}
        # Series of a closed label set exist from the start at 0: a rule such as "no record taken in 5 m" (rate of an
        # absent series is no result, not 0) must fire for an instance stuck since it started, and increase() must
        # count an outcome's first occurrence.
        for outcome in ("ok", "dead_letter"):
            self.records.labels(outcome)
        for outcome in ("changed", "new_normal", "refused", "commanded"):
            self.calibrations.labels(outcome)
        for outcome in ("rejected", "error"):  # TsmonControlCommandsRejected must see a forged first message after a start
            self.commands.labels("unknown", outcome)
        for status in ("firing", "silenced", "resolved"):
            self.alerts.labels(status)
        for severity in ("minor", "major", "critical"):
            self.alert_severity.labels(severity)
        for counter, values in ((self.dead_letters, DEAD_LETTER_REASONS), (self.quality, QUALITY_KINDS),
                                (self.skipped, SKIP_REASONS), (self.retries, RETRY_CAUSES)):
            for value in values:
                counter.labels(value)
        self._max_stream_labels = max_stream_labels
        self._labelled: dict[str, tuple[str, float]] = {}  # stream → the source and value of its threshold series
        self._over_cap: dict[str, tuple[str, float]] = {}  # streams beyond the cap: their latest (source, value)
        self._threshold_lock = threading.Lock()  # the calibrator thread and the loop both set thresholds

    def watch_scoring_process(self, pid: Callable[[], int | None]) -> None:
        """Export the scoring process's own series (``tsmon_scoring_process_resident_memory_bytes``, CPU, open
        files, start time): it holds the models and torch's buffers, and on CPU it does the scoring, none of
        which the daemon process's series show. Nothing is exported while it is gone."""
        ProcessCollector(namespace="tsmon_scoring", pid=lambda: str(pid() or "absent"), registry=self.registry)

    def set_threshold(self, stream: str, value: float, source: str) -> None:
        """Export ``stream``'s threshold as one series ``{stream, source}``, within the label cap.

        A stream beyond the first ``max_stream_labels`` is only counted in
        ``tsmon_threshold_streams_unlabelled``; it gets a label once a slot is free again.
        """
        with self._threshold_lock:
            if stream in self._labelled or len(self._labelled) < self._max_stream_labels:
                self._over_cap.pop(stream, None)
                self._labelled[stream] = (source, value)
            else:
                self._over_cap[stream] = (source, value)
            self.thresholds_unlabelled.set(len(self._over_cap))

    def forget_threshold(self, stream: str) -> None:
        """Drop ``stream``'s threshold series (or its count over the cap), freeing its slot for the longest waiting
        stream over the cap (which got one only at its next threshold change, never for a pinned or steady one)."""
        with self._threshold_lock:
            self._over_cap.pop(stream, None)
            if self._labelled.pop(stream, None) is not None and self._over_cap:
                waiting = next(iter(self._over_cap))
                self._labelled[waiting] = self._over_cap.pop(waiting)
            self.thresholds_unlabelled.set(len(self._over_cap))

    def snapshot(self) -> dict[str, float]:
        """Totals by metric (and label values), e.g. ``{"tsmon_dead_letters_total{reason=invalid_json}": 3}``."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            if not family.name.startswith("tsmon_"):  # the process's own series
                continue
            for s in family.samples:
                if s.name.endswith(("_created", "_bucket")) or family.name == "tsmon_threshold":
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def total(self, name: str) -> float:
        """Sum of a counter over all its labels, e.g. ``total("tsmon_dead_letters_total")``.

        Collects that one counter only: loops call it on every iteration (demo, benchmark, tests).
        """
        counter = self._counters[name.removesuffix("_total")]
        return sum(s.value for family in counter.collect() for s in family.samples if s.name == name)


class _Thresholds:
    """``tsmon_threshold{stream, source}`` built at each scrape from what :meth:`Metrics.set_threshold` keeps,
    under its lock. A gauge series per source had to be removed and another made when a stream's source changed
    (a pin, a first calibration): a scrape in between, on its own thread, read the threshold as 0 or missing
    (a review: 946 of 5 780 reads while pinning and unpinning), or as two series."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        with self._m._threshold_lock:
            rows = list(self._m._labelled.items())
        for stream, (source, value) in rows:
            family.add_metric([stream, source], value)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("tsmon_threshold", "Current threshold per stream", labels=["stream", "source"])
