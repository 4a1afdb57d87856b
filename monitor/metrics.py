"""Counters of the daemon, in a Prometheus registry of its own (one per daemon, so tests never collide).

Owns the names of what is counted. Every record ends in exactly one outcome of
``tsmon_records_total``; every dead letter, data-quality event, alert message and scored window is
counted; :meth:`Metrics.snapshot` gives the totals as a plain dict for logs and the demo's summary.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.records = Counter("tsmon_records", "Input records by outcome (ok, dead_letter)", ["outcome"], registry=r)
        self.samples = Counter("tsmon_samples", "Samples accepted into windows", registry=r)
        self.dead_letters = Counter("tsmon_dead_letters", "Records sent to the dead-letter topic", ["reason"],
                                    registry=r)
        self.windows = Counter("tsmon_windows_scored", "Windows scored", ["model"], registry=r)
        self.skipped = Counter("tsmon_windows_skipped", "Scored windows kept out of alerting", ["why"], registry=r)
        self.alerts = Counter("tsmon_alert_messages", "Alert messages published", ["status"], registry=r)
        self.quality = Counter("tsmon_data_quality_events", "Data-quality findings", ["kind"], registry=r)
        self.commits = Counter("tsmon_commits", "Offset commits", registry=r)
        self.batch_seconds = Histogram("tsmon_batch_seconds", "Scoring time of one micro-batch", registry=r,
                                       buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3))
        self.thresholds = Gauge("tsmon_threshold", "Current threshold per stream", ["stream", "source"], registry=r)
        self._counters = {c.describe()[0].name: c for c in (self.records, self.samples, self.dead_letters,
                                                            self.windows, self.skipped, self.alerts, self.quality,
                                                            self.commits)}

    def snapshot(self) -> dict[str, float]:
        """Totals by metric (and label values), e.g. ``{"tsmon_dead_letters_total{reason=invalid_json}": 3}``."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
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
