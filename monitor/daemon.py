"""The daemon: wires config → source, processor, sink, calibrator schedule; runs the loop; stops cleanly.

A thin wiring layer. The loop is single-threaded (kafka-python's consumer is not thread-safe): poll →
handle → score due batches → commit every ``commit_interval_ms``. Only the calibrator runs on an
apscheduler thread, behind its own lock. SIGTERM/SIGINT set a flag; the loop then scores what waits,
publishes, commits and closes, each step bounded by ``shutdown_timeout_s``; a second signal exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
from apscheduler.schedulers.background import BackgroundScheduler

from models.detector import DEFAULT_QUANTILE
from models.errors import SinkBackpressure
from monitor import logs
from monitor.alerts import AlertSettings
from monitor.batcher import Batcher
from monitor.calibrator import Calibrator, CalibratorSettings
from monitor.config import Config
from monitor.metrics import Metrics
from monitor.processor import Processor, Settings
from monitor.scorer import Scorer, load_served
from monitor.scoring import Backend, ProcessBackend, ThreadBackend, choose
from monitor.sink import KafkaSink, Sink
from monitor.source import TP, KafkaSource, Source

log = logs.get("tsmon.daemon")


def scoring_threads(configured: int | None) -> int:
    """Torch CPU threads for scoring: as configured, else cores − 1 (at least 1)."""
    return configured or max(1, (os.cpu_count() or 2) - 1)


def build_scorer(cfg: Config) -> Scorer:
    return Scorer([load_served(r.pattern, r.path, r.name, r.hop, cfg.daemon.device) for r in cfg.require_models()])


def calibrator_settings(cfg: Config, scorer: Scorer) -> CalibratorSettings:
    c = cfg.calibrator
    quantile = c.quantile
    if quantile is None:  # the artifacts' own quantile, when they agree
        found = {m.detector.threshold.quantile for m in scorer.models.values()}
        quantile = found.pop() if len(found) == 1 else DEFAULT_QUANTILE
    quantile = min(quantile, 0.999)  # an artifact thresholded at its maximum (q = 1) still calibrates
    return CalibratorSettings(quantile, c.margin, c.window, c.min_samples, c.max_change, c.floor, c.ceiling,
                              c.enabled)


def processor_settings(cfg: Config) -> Settings:
    a, q = cfg.alerts, cfg.quality
    return Settings(cfg.kafka.alerts_topic, cfg.kafka.dead_letter_topic, cfg.windows.gap_ms,
                    AlertSettings(a.for_windows, a.resolve_after, a.flap_period_ms, a.flap_max, a.major_ratio,
                                  a.critical_ratio),
                    q.flatline_rel_std, q.rate_tolerance, q.cooldown_ms, a.max_hold_windows, cfg.limits.to_limits(),
                    cfg.daemon.shutdown_timeout_s)


class Daemon:
    """One tsmon consumer. ``source``/``sink`` default to Kafka; tests may pass doubles for unit work."""

    def __init__(self, cfg: Config, source: Source | None = None, sink: Sink | None = None,
                 scorer: Scorer | None = None) -> None:
        self.cfg = cfg
        # The forward pass runs beside the consuming thread: leave that thread a core of its own
        # (measured on 2 cores, `tsmon bench pipeline`: 1 torch thread 241k samples/s, 2 threads 200k).
        threads = scoring_threads(cfg.daemon.torch_threads)
        torch.set_num_threads(threads)
        self.metrics = Metrics()
        self.scorer = scorer or build_scorer(cfg)
        self.scoring = choose(cfg.daemon.scoring, cfg.daemon.device)
        if self.scoring == "process":
            backend: Backend = ProcessBackend([(r.pattern, str(r.path), r.name, r.hop) for r in cfg.require_models()],
                                              cfg.daemon.device, threads)
        else:
            # The CPU LSTM steps its layers from Python, taking the GIL between ops; with the default 5 ms
            # switch interval it waits behind the parsing thread (193k → 223k samples/s at 0.2 ms).
            sys.setswitchinterval(0.0002)
            backend = ThreadBackend(self.scorer)
        self.calibrator = Calibrator(calibrator_settings(cfg, self.scorer))
        self.stop_event = threading.Event()
        self.final_thresholds: dict[str, dict[str, Any]] = {}  # calibrator snapshot taken at shutdown
        self._started = time.monotonic()
        self.sink = sink or KafkaSink(cfg.kafka.producer_kwargs())
        self.processor = Processor(self.scorer, self.calibrator, Batcher(cfg.batch.max_batch, cfg.batch.max_delay_ms),
                                   self.sink, self.metrics, processor_settings(cfg), backend)
        k = cfg.kafka
        self.source = source or KafkaSource(k.consumer_kwargs(), list(k.topics), k.topic_pattern,
                                            self._on_revoke, self._on_assign)
        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(self.recalibrate, "interval", seconds=cfg.calibrator.interval_s,
                                id="recalibrate", max_instances=1, coalesce=True)

    # rebalance callbacks (called from inside poll, on the loop's thread)
    def _on_revoke(self, tps: list[TP]) -> None:
        log.info("partitions_revoked", partitions=[f"{t}-{p}" for t, p in tps])
        self.processor.revoke(self.source, set(tps))

    def _on_assign(self, tps: list[TP]) -> None:
        # Nothing to restore: every sample a future window or an open episode needs lies after the
        # committed offset, so the stream state rebuilds itself from the replay.
        log.info("partitions_assigned", partitions=[f"{t}-{p}" for t, p in tps])

    def recalibrate(self) -> None:
        for stream, (old, new) in self.calibrator.recalibrate().items():
            self.metrics.thresholds.labels(stream, new.source).set(new.value)
            log.info("threshold_changed", stream=stream, old=round(old.value, 6), new=round(new.value, 6),
                     source=new.source, samples=new.samples)

    def caught_up(self, samples: int) -> bool:
        """Has it taken ``samples`` samples and scored every window they made? (demo, benchmark, tests)"""
        return self.metrics.total("tsmon_samples_total") >= samples and self.processor.pending == 0

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            if self.stop_event.is_set():
                log.error("second_signal_exit_now", signal=signum)
                raise SystemExit(128 + signum)
            log.info("stopping", signal=signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self, until: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Run until stopped (signal, :attr:`stop_event` or ``until()``); returns the metrics snapshot."""
        d = self.cfg.daemon
        log.info("daemon_starting", models={n: m.describe() for n, m in self.scorer.models.items()},
                 scoring=self.scoring,
                 config=self.cfg.redacted())
        self._scheduler.start()
        self._started = last_commit = time.monotonic()
        try:
            while not self.stop_event.is_set() and not (until and until()):
                wait = self.processor.batcher.wait_s()
                timeout = d.poll_timeout_ms if wait is None else min(d.poll_timeout_ms, int(wait * 1000))
                if self.processor.pending > self.processor.batcher.size:  # results in flight: come back soon
                    timeout = min(timeout, 5)
                self.processor.handle(self.source.poll(max(timeout, 0)))
                self.processor.score_ready()  # memory stays bounded: at most max_inflight batches wait
                if time.monotonic() - last_commit >= d.commit_interval_ms / 1000:
                    last_commit = time.monotonic()
                    self._commit()
        finally:
            self._shutdown()
        return self.metrics.snapshot()

    def _commit(self) -> None:
        try:
            self.processor.commit(self.source)
        except SinkBackpressure as exc:  # nothing committed; input is replayed if we die now
            log.warning("commit_deferred", error=str(exc), retry_after=exc.retry_after)

    def _shutdown(self) -> None:
        t0 = time.monotonic()
        self._scheduler.shutdown(wait=False)
        try:
            self.processor.score_ready(force=True)
            self.processor.commit(self.source)
        except SinkBackpressure as exc:
            log.error("final_commit_failed", error=str(exc))
        finally:
            self.final_thresholds = self.calibrator.snapshot()  # before close() revokes and forgets streams
            self.source.close()  # leaving the group revokes: nothing waits by now, the sink is still open
            try:
                self.sink.close(self.cfg.daemon.shutdown_timeout_s)
            except SinkBackpressure as exc:
                log.error("sink_close_failed", error=str(exc))
            self.processor.close()
        log.info("daemon_stopped", uptime_s=round(time.monotonic() - self._started, 1),
                 shutdown_s=round(time.monotonic() - t0, 3), **_summary(self.metrics))


def _summary(m: Metrics) -> dict[str, int]:
    return {k: int(m.total(f"tsmon_{k}_total")) for k in ("records", "windows_scored", "alert_messages",
                                                            "dead_letters", "data_quality_events", "commits")}
