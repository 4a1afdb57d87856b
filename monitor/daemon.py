"""The daemon: wires config → source, processor, sink, calibrator, control, state and HTTP; runs the loop.

Wiring and the loop. The loop is single-threaded (kafka-python's consumer is not thread-safe): poll →
handle → score due batches → operator commands every ``control.poll_interval_ms`` → snapshots when due
→ commit every ``commit_interval_ms``. The calibrator runs on an apscheduler thread behind its own lock;
the snapshot job only raises a flag for the loop. The HTTP server reads immutable views the loop
refreshes. State is restored from the changelog at the first assignment (commands wait for it) and at
every later one.
While the broker is unreachable or the sink cannot get acknowledgements, commits are put off with
exponential backoff and the input is paused (``/readyz`` says why); the loop keeps turning.
SIGTERM/SIGINT set a flag; the loop then scores what waits, publishes, snapshots, commits and closes,
all within ``shutdown_timeout_s``; a second signal exits at once.

This module holds the wiring, the loop, the signals and the shutdown; :class:`Daemon`'s other parts are mixins
over :class:`monitor.daemon_state.DaemonState`: :mod:`monitor.intake` (how much input is taken, pauses, commits
with backoff), :mod:`monitor.rebalance` (assignments, the changelog restore), :mod:`monitor.recalibration`
(scheduled runs, refused raises, the threshold gauge) and :mod:`monitor.views` (what the HTTP threads read).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
from apscheduler.schedulers.background import BackgroundScheduler

from models.detector import DEFAULT_QUANTILE
from models.errors import BrokerError, ScoringStuck, SinkBackpressure, TsmonError, describe
from models.train import default_threads
from monitor import heap, logs
from monitor.alerts import AlertSettings
from monitor.batcher import Batcher
from monitor.calibrator import MAX_QUANTILE, Calibrator, CalibratorSettings, ThresholdState, unbounded_lowering
from monitor.config import Config
from monitor.controller import Controller, ControlSource
from monitor.drift import DriftSettings
from monitor.health import HealthServer
from monitor.intake import Intake
from monitor.metrics import Metrics
from monitor.processor import DataClock, Processor, Settings
from monitor.reach import Problem, wait_for_brokers
from monitor.reading import InputReader
from monitor.rebalance import Rebalance
from monitor.recalibration import Recalibration
from monitor.restoring import Restore
from monitor.scorer import Scorer, load_served
from monitor.scoring import Backend, ProcessBackend, ThreadBackend, choose
from monitor.sdnotify import Notifier
from monitor.sink import KafkaSink, OutMessage, Sink
from monitor.source import TP, KafkaSource, Source
from monitor.topics import ensure_topics, require_inputs
from monitor.views import Views

log = logs.get("tsmon.daemon")
SHUTDOWN_DRAIN_SHARE = 0.85  # of shutdown_timeout_s for draining and commits; the rest for closing processes
RESTORE_STEP_S = 0.1  # changelog reading per loop turn while a restore holds the input
FORGET_EVERY_S = 60.0  # how often the documents of long-unseen streams are looked for (state.forget_after_s)
CAUGHT_UP_AFTER_S = 5.0  # a partition at lag 0 this long after input came back is read to its end (see _caught_up)
QUICK_PROBE_S = 5.0  # the probe before the warm-up, for settings wrong for sure: one round, this long shared by
# the bootstrap addresses (at least 1 s each)
CLOCK_STEP_S = 2.0  # the wall clock moving this much against the monotonic one between turns re-bases the jobs


def scoring_threads(configured: int | None) -> int:
    """Torch CPU threads for scoring: as configured, else the usable CPUs − 1 (at least 1; as training)."""
    return configured or default_threads()


def build_scorer(cfg: Config, device: str | None = None) -> Scorer:
    """The configured routes, loaded and routed (on ``device``, else the configured one)."""
    return Scorer([load_served(r.pattern, r.path, r.name, r.hop, device or cfg.daemon.device, r.gap_ms,
                               r.for_windows, r.resolve_after, r.gap_periods) for r in cfg.require_models()],
                  cfg.daemon.precision)


def warn_unbounded_lowering(cfg: Config, scorer: Scorer) -> None:
    """Once a route at start: its overlapping windows need more recent windows than ``drift.window`` keeps for the
    scheduled recalibrations' lowerings to be bounded (README "Overlapping windows"), with the window that would."""
    for served in scorer.models.values():
        quantile = cfg.calibrator.quantile if cfg.calibrator.quantile is not None else served.detector.threshold.quantile
        if (needed := unbounded_lowering(served.thin, min(quantile, MAX_QUANTILE), cfg.drift.window)) is not None:
            log.warning("recent_windows_too_few", model=served.name, pattern=served.pattern, window=served.window,
                        hop=served.hop, quantile=quantile, drift_window=cfg.drift.window, drift_window_needed=needed,
                        consequence="scheduled recalibrations can walk its streams' thresholds below their quantile "
                                    "(W/H 16 at q0.95: 0.71-0.74 x, 37 % of windows over): set drift.window to "
                                    f"{needed} or more")


def calibrator_settings(cfg: Config) -> CalibratorSettings:
    c = cfg.calibrator
    # unset: each stream is registered at its own model's quantile and margin (processor Settings.model_quantile,
    # model_margin), so these are never used for a stream
    quantile = min(DEFAULT_QUANTILE if c.quantile is None else c.quantile, MAX_QUANTILE)
    d = cfg.drift
    margin = 1.0 if c.margin is None else c.margin
    return CalibratorSettings(quantile, margin, c.window, c.min_samples, c.max_change, c.floor, c.ceiling, c.enabled,
                              cfg.state.history, c.min_change,
                              DriftSettings(d.enabled, d.window, d.min_windows, d.alpha, d.shift_share,
                                            d.max_over_share))


def processor_settings(cfg: Config) -> Settings:
    a, q = cfg.alerts, cfg.quality
    return Settings(cfg.kafka.alerts_topic, cfg.kafka.dead_letter_topic, cfg.windows.gap_ms,
                    AlertSettings(a.for_windows, a.resolve_after, a.flap_period_ms, a.flap_max, a.major_ratio,
                                  a.critical_ratio),
                    q.flatline_rel_std, q.rate_tolerance, q.cooldown_ms, a.max_hold_windows, cfg.limits.to_limits(),
                    cfg.daemon.sink_timeout_s, scoring_timeout_s=cfg.daemon.scoring_timeout_s,
                    state_topic=cfg.state.topic if cfg.state.enabled else None,
                    recent_alerts=cfg.state.recent_alerts, max_streams=cfg.limits.max_streams,
                    idle_evict_s=cfg.limits.idle_evict_s, max_future_s=cfg.limits.max_future_s,
                    earliest_ms=cfg.limits.earliest_ms, gap_periods=cfg.windows.gap_periods,
                    model_quantile=cfg.calibrator.quantile is None,
                    model_margin=cfg.calibrator.margin is None, forget_after_s=cfg.state.forget_after_s,
                    max_documents=cfg.state.max_documents, clock_step_s=cfg.windows.clock_step_s,
                    silent_after_s=q.silent_after_s)


def client_classes(cfg: Config, need: bool) -> tuple[Any, Any]:
    """The sink and source classes of ``kafka.client``; ``need``: they will be built, so a missing librdkafka
    binding is a clear one-line error now, before anything starts."""
    if cfg.kafka.client != "confluent":
        return KafkaSink, KafkaSource
    from monitor import confluent as rdkafka

    if need:
        rdkafka.require()
    return rdkafka.ConfluentSink, rdkafka.ConfluentSource


class Daemon(Views, Intake, Rebalance, Recalibration):
    """One tsmon consumer. ``source``/``sink`` default to Kafka; tests may pass doubles for unit work."""

    def __init__(self, cfg: Config, source: Source | None = None, sink: Sink | None = None,
                 scorer: Scorer | None = None) -> None:
        self.cfg = cfg
        # The forward pass runs beside the consuming thread: leave that thread a core of its own
        # (measured on 2 cores, `tsmon bench pipeline`: 1 torch thread 241k samples/s, 2 threads 200k).
        threads = scoring_threads(cfg.daemon.torch_threads)
        torch.set_num_threads(threads)
        self.metrics = Metrics(cfg.http.max_stream_labels)
        outputs = (cfg.kafka.alerts_topic, cfg.kafka.dead_letter_topic, cfg.control.audit_topic,
                   *([cfg.state.topic] if cfg.state.enabled else []))
        for topic in outputs:  # at 0: the first loss is an increase()
            self.metrics.undeliverable.labels(topic)
        self.scorer = scorer or build_scorer(cfg)
        warn_unbounded_lowering(cfg, self.scorer)
        self.scoring = choose(cfg.daemon.scoring, cfg.daemon.device)
        backend = self._backend(threads)
        self.calibrator = Calibrator(calibrator_settings(cfg), on_change=self._threshold_metric)
        self.stop_event = threading.Event()
        self.final_thresholds: dict[str, dict[str, Any]] = {}  # calibrator snapshot taken at shutdown
        # called on every threshold change, whatever made it (replay-eval draws them on data time), under the
        # calibrator's lock, on the thread that changed it: a listener must not call the calibrator (a deadlock)
        self.threshold_listeners: list[Callable[[str, ThresholdState], None]] = []
        self._started = time.monotonic()
        self._stop_at: float | None = None  # monotonic time of the stopping signal
        self.exit_now: Callable[[int], Any] = os._exit  # a second signal: no drain, no commit, no close
        self._signal: str | None = None  # the stopping signal's name (logged by the loop, not the handler)
        sink_class, source_class = client_classes(cfg, need=source is None or sink is None)
        b = cfg.batch
        batcher = Batcher(b.max_batch, b.max_delay_ms, latency_target_ms=b.latency_target_ms)
        try:
            if source is None:  # a setting wrong for sure (TLS) is said at once, not after the warm-up (27 s into
                self._wait_for_brokers(lasting_only=True)  # a start on busy cores); a broker away is waited for
            if cfg.daemon.warmup:  # after it: a wrong precision is said first (before any client exists: a refused
                self._warm_up(backend, batcher)  # precision leaves nothing open)
            if source is None:  # a real broker: one that cannot be reached is named now, not as the clients'
                self._wait_for_brokers()  # "Unable to bootstrap" 30 s later (or never: a TLS handshake hung)
                existing = self._ensure_topics()
                if not cfg.kafka.topic_pattern:
                    require_inputs(list(cfg.kafka.topics), existing, ",".join(cfg.kafka.bootstrap_servers))
            self.sink = sink or sink_class(cfg.kafka.producer_kwargs(), on_undeliverable=self._undeliverable)
        except BaseException:
            backend.close()  # a scoring process must not outlive a start that failed
            raise
        self.processor = Processor(self.scorer, self.calibrator, batcher, self.sink, self.metrics,
                                   processor_settings(cfg), backend)
        k, c = cfg.kafka, cfg.control
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self.controller = Controller(self.processor, c.key.get_secret_value() if c.key else None, c.audit_topic,
                                     self.instance, c.max_age_s, c.remember)
        self._kafka = source is None  # control topic and changelog only with a real broker
        try:
            self.source = source or source_class(k.consumer_kwargs(), list(k.topics), k.topic_pattern,
                                                 self._on_revoke, self._on_assign)
            self.control = ControlSource(k.client_kwargs(), c.topic) if self._kafka else None
        except BaseException:  # the clients made so far, and the scoring process, must not outlive the start
            for close in (lambda: self.source.close(1.0) if hasattr(self, "source") else None,
                          lambda: self.sink.close(1.0), backend.close):
                with contextlib.suppress(Exception):
                    close()
            raise
        self.controller.inputs = self._inputs
        self._schedule()
        self._init_views()
        self._init_intake()
        self._init_rebalance()
        self._init_recalibration()
        self._forgot_at = time.monotonic()  # the last look for documents to forget (state.forget_after_s)
        self._last_commit = self._last_control = time.monotonic()  # the loop's last commit, last control poll
        self._commands: deque[Any] = deque()  # control messages polled, not handled yet (a recalibration ran)
        self.notifier = Notifier()  # systemd's ready / watchdog / stopping, under Type=notify only
        # the changelog read at each assignment, while the assigned partitions wait for it
        self.restorer = Restore(cfg, self.processor, self.controller, self.source, self.metrics, self.calibrator)
        # polls, retrying a failed one, and a partition whose fetch failed apart from the others
        self.input_reader = InputReader(self.source, self.metrics, cfg.daemon.commit_interval_ms / 1000,
                                        cfg.daemon.retry_max_s,
                                        lambda tp: tp in self._paused or tp in self.restorer.waits or self._holding)
        h = cfg.http
        self.http = HealthServer(h.host, h.port, self.metrics.registry, self._health, self._readiness,
                                 self._streams_view) if h.enabled else None

    def _readiness(self) -> tuple[bool, str]:
        """/readyz: "stopping" from the signal on — the loop's own answer came only once the shutdown had waited
        for a running recalibration, and /readyz said 200 "1 partition(s) assigned" for 2.35 s after SIGTERM."""
        return (False, "stopping") if self.stop_event.is_set() else self._ready

    def _backend(self, threads: int) -> Backend:
        """Where the forward pass runs: a scoring process of its own, or a thread of this one."""
        if self.scoring == "process":
            cfg = self.cfg
            process = ProcessBackend([(r.pattern, str(r.path), r.name, r.hop) for r in cfg.require_models()],
                                     cfg.daemon.device, threads, precision=cfg.daemon.precision,
                                     versions={m.name: m.version for m in self.scorer.models.values()})
            self.metrics.watch_scoring_process(lambda: process.pid)
            return process
        # The CPU LSTM steps its layers from Python, taking the GIL between ops; with the default 5 ms
        # switch interval it waits behind the parsing thread (193k → 223k samples/s at 0.2 ms).
        sys.setswitchinterval(0.0002)
        return ThreadBackend(self.scorer)

    def _schedule(self) -> None:
        """Recalibration every ``calibrator.interval_s`` (of wall time, or of the data's own) and the snapshot flag."""
        cfg = self.cfg
        self._scheduler = BackgroundScheduler(daemon=True)
        # misfire_grace_time None: a run that starts late runs (once: coalesce) — apscheduler's default of 1 s skipped
        # it, as "missed", to the next interval whenever the process was held up a second (a VM paused, a stall)
        if cfg.calibrator.clock == "wall":
            self._scheduler.add_job(self.recalibrate, "interval", seconds=cfg.calibrator.interval_s,
                                    id="recalibrate", max_instances=1, coalesce=True, misfire_grace_time=None)
        else:  # every interval of the data's own time, between the windows it is decided on
            self.processor.data_clock = DataClock(cfg.calibrator.interval_s * 1000, self.recalibrate)
        self._snapshot_due = threading.Event()
        self._scheduler.add_job(self._snapshot_due.set, "interval", seconds=cfg.state.snapshot_interval_s,
                                id="snapshot", max_instances=1, coalesce=True, misfire_grace_time=None)
        self._clock_offset = time.time() - time.monotonic()

    def _check_clock(self) -> None:
        """Re-base the scheduled jobs after the wall clock stepped. apscheduler's interval jobs run at wall-clock
        times: after a step back of an hour (a VM resumed, NTP's first correction) recalibrations and snapshots
        stopped for that hour; after a step forward the missed run was dropped as a misfire. Each job now runs
        next one interval after the step."""
        offset = time.time() - time.monotonic()
        step, self._clock_offset = offset - self._clock_offset, offset
        if abs(step) <= CLOCK_STEP_S:
            return
        jobs = self._scheduler.get_jobs()
        for job in jobs:
            self._scheduler.reschedule_job(job.id, trigger="interval", seconds=job.trigger.interval.total_seconds())
        log.warning("wall_clock_stepped", seconds=round(step, 3), rescheduled=sorted(j.id for j in jobs))

    def _inputs(self) -> dict[str, list[int]]:
        """The input partitions this instance holds, by topic; a configured topic it holds none of is listed
        empty (tsmon ctl then still expects that topic's partitions to be answered for by someone)."""
        held: dict[str, list[int]] = {t: [] for t in self.cfg.kafka.topics} if not self.cfg.kafka.topic_pattern else {}
        for topic, partition in sorted(self.source.assignment()):
            held.setdefault(topic, []).append(partition)
        return held


    def _warm_up(self, backend: Backend, batcher: Batcher) -> None:
        """Score each batch size once per model before consuming; the timings seed the batcher's cost model.
        A reduced precision whose scores move off float32 stops the start here (ConfigError)."""
        d, t0 = self.cfg.daemon, time.monotonic()
        sizes = sorted({1, max(1, batcher.max_batch // 8), batcher.max_batch})
        timings = backend.warm_up(sizes, d.precision_tolerance)
        for model, passes in timings.items():
            for n, seconds in passes:
                batcher.observed(model, n, seconds)
        log.info("models_warmed", seconds=round(time.monotonic() - t0, 3),
                 precision={m: self.scorer.precision_of(m) for m in self.scorer.models},
                 ms_per_batch={m: {n: round(s * 1000, 2) for n, s in p} for m, p in timings.items()},
                 batch_limit={m: batcher.limit(m) for m in timings})

    def _wait_for_brokers(self, lasting_only: bool = False) -> None:
        throttle = logs.Throttle(burst=1, period_s=30.0)  # a new problem at once, the same one every 30 s

        def unreachable(problems: list[Problem]) -> None:
            said = [str(p) for p in problems]
            if (extra := throttle("; ".join(said))) is not None:
                log.warning("broker_unreachable", problems=said, retrying=True, **extra)

        k = self.cfg.kafka
        limit_s = min(k.bootstrap_timeout_ms / 1000, QUICK_PROBE_S) if lasting_only else k.bootstrap_timeout_ms / 1000
        wait_for_brokers(k, limit_s, on_problems=unreachable, lasting_only=lasting_only)

    def _ensure_topics(self) -> set[str]:
        """Create the alerts, dead-letter, control, audit and state topics that are missing; returns the topics that
        existed. The alerts and dead-letter topics too: on a cluster that does not auto-create topics a missing one
        stalled the sink (each send waited for metadata that never came, and the input paused) instead of stopping
        the start with one line."""
        k, c, st = self.cfg.kafka, self.cfg.control, self.cfg.state
        topics = {k.alerts_topic: 1, k.dead_letter_topic: 1, c.topic: 1, c.audit_topic: 1,
                  **({st.topic: 1} if st.enabled else {})}
        client = k.client_kwargs()
        return ensure_topics(client.pop("bootstrap_servers"), topics, {st.topic: {"cleanup.policy": "compact"}},
                             replication_factor=k.replication_factor, **client)

    def _undeliverable(self, msg: OutMessage, _why: str) -> None:
        self.metrics.undeliverable.labels(msg.topic).inc()

    def caught_up(self, samples: int) -> bool:
        """Has it taken ``samples`` samples and scored every window they made? (demo, benchmark, tests)"""
        return self.metrics.total("tsmon_samples_total") >= samples and self.processor.pending == 0

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            # No structlog call in here: its printer's lock may be held by the very code this interrupted (the
            # loop in a log write), and the handler then waited for itself for ever. The loop logs "stopping".
            if self.stop_event.is_set():  # at once: raised as SystemExit it went through run()'s shutdown (the drain,
                # the snapshot, the final commit, then a false scoring_stuck and exit 1; a daemon review)
                logs.from_signal_handler("second_signal_exit_now", "error", signal=signal.Signals(signum).name)
                self.exit_now(128 + signum)
            self._signal = signal.Signals(signum).name
            # The budget counts from here. A commit waiting on a stalled sink meanwhile (the loop's, a revoke's)
            # ends by the share of it the final commit would get (see _shutdown), not after its own timeout.
            now = time.monotonic()
            cut = now + self.cfg.daemon.shutdown_timeout_s * SHUTDOWN_DRAIN_SHARE * 0.3
            self._stop_at, self.processor.deadline = now, min(cut, self.processor.deadline or cut)
            # and a forced drain under way (a revoke's, a reset's) scores no batch past the shutdown's drain: it ran
            # 2.6 s for a 1 s budget, each batch bounded only by scoring_timeout_s (what it leaves is not committed)
            drain = now + self.cfg.daemon.shutdown_timeout_s * SHUTDOWN_DRAIN_SHARE
            self.processor.scoring_deadline = min(drain, self.processor.scoring_deadline or drain)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self, until: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Run until stopped (signal, :attr:`stop_event` or ``until()``); returns the metrics snapshot."""
        log.info("daemon_starting", models={n: m.describe() for n, m in self.scorer.models.items()},
                 scoring=self.scoring,
                 config=self.cfg.redacted())
        if self.cfg.control.key is None:  # "" from a missing secret unsets it too: say so, once, at start
            log.warning("control_key_unset", consequence="every operator command is refused (pin, silence, "
                        "freeze, recalibrate)", fix="set TSMON_CONTROL__KEY")
        self._started = self._last_commit = self._last_control = time.monotonic()
        try:  # whatever fails from here on, _shutdown closes what was opened (and the heap is thawed)
            log.info("heap_frozen", objects=heap.freeze())  # start-up's objects: out of every collection
            if self.http is not None:
                self.http.start()
            self._scheduler.start()
            self.notifier.ready("started")  # models loaded, clients open (partitions come with the group's join)
            while not self.stop_event.is_set() and not (until and until()):
                self._beat = time.monotonic()
                self._check_clock()
                # every turn, as /healthz's stamp: at the commit interval a long commit_interval_ms would have the
                # watchdog kill a healthy daemon and TsmonLoopStalled fire
                self.metrics.loop_turned.set_to_current_time()
                self.notifier.watchdog()  # at most once a second
                if self._rows_asked:  # a /streams request waits (rows are not built for nobody)
                    self._build_rows()
                timeout = self._poll_timeout()
                if self.restoring:  # the input waits for it: read on instead of waiting in poll
                    self._restore_step(RESTORE_STEP_S)
                    timeout = 0
                self._take_input(timeout)
                self.processor.score_ready()  # never blocks: what waits is bounded by _hold_input
                self.processor.check_stuck()  # a call that never returns: ScoringStuck, nothing committed past it
                if self.processor.failed is not None:  # raised where something caught it: never run on without scoring
                    raise (ScoringStuck if self.processor.stuck else TsmonError)(self.processor.failed)
                self._hold_input()
                self._apply_commands()
                if self._snapshot_due.is_set():
                    self._snapshot_due.clear()
                    self.processor.save_changed()
                if self.stop_event.is_set():  # a signal came during this turn: the shutdown commits
                    break
                self._commit_when_due()
        finally:
            try:
                self._shutdown()
            finally:
                heap.thaw()
        return self.metrics.snapshot()

    def _poll_timeout(self) -> int:
        """Milliseconds the next poll may wait: at most until the batcher's next batch is due."""
        d = self.cfg.daemon
        wait = self.processor.batcher.wait_s()
        timeout = d.poll_timeout_ms if wait is None else min(d.poll_timeout_ms, int(wait * 1000))
        if self.processor.scoring_busy:  # results in flight: come back soon, but do not spin
            timeout = min(max(timeout, 2), 5)
        elif (idle := self.processor.batcher.idle_wait_s()) is not None:  # an idle scorer takes it soon
            timeout = min(timeout, int(idle * 1000))
        return timeout

    def _take_input(self, timeout: int) -> None:
        """Hand the processor the backlog, or what a poll brings, as much as fits; else wait for the scorer."""
        room = self._poll_room()
        if self._backlog:  # what the last poll brought and did not fit, before anything new
            if self.processor.pending < self.cfg.batch.pending_limit:
                self._handle([])
            else:
                self.processor.wait_scored(timeout / 1000)
        elif room and not self.processor.scoring_busy:
            self._handle(self.input_reader.poll(max(timeout, 0), room))
        else:  # a result is on its way (it wakes us), or no record fits: wait for the scorer first,
            self.processor.wait_scored(timeout / 1000)  # the records stay in the client meanwhile
            if room:
                self._handle(self.input_reader.poll(0, room))

    def _apply_commands(self) -> None:
        """Operator commands, every ``control.poll_interval_ms`` once the state is restored and partitions held."""
        if (self.control is not None and self._restored and not self.restoring and not self._unassigned
                and (self._commands or time.monotonic() - self._last_control >= self.cfg.control.poll_interval_ms / 1000)):
            if not self._commands:
                self._last_control = time.monotonic()
                self._commands.extend(self.control.poll())
            # none while a scheduled recalibration runs (checked before each): a `recalibrate` waited for the rest of
            # it on the loop's thread (2.2 s over 5 000 streams, no input read meanwhile; the concurrency review)
            while self._commands and not self.calibrator.recalibrating.locked():
                raw = self._commands.popleft()
                try:
                    self.controller.handle(raw)
                except Exception as exc:  # noqa: BLE001 — one control message must never stop the daemon
                    log.error("control_message_failed", error=describe(exc)[:300],
                              consequence="its handling stopped part way: it may be applied in part, and it may be "
                                          "unacknowledged (tsmon ctl then reports no answer); the daemon goes on")
                    self.metrics.commands.labels("unknown", "error").inc()
                self._last_commit = -math.inf  # its documents, then its acknowledgement, go with a commit: now

    def _commit_when_due(self) -> None:
        """Every ``commit_interval_ms`` (sooner when output piles up): pages, idle streams, forgotten documents,
        the commit and the views."""
        d = self.cfg.daemon
        if (time.monotonic() - self._last_commit >= d.commit_interval_ms / 1000
                or (self._problem is None  # output piles up: flush now (a failing sink waits its retry)
                    and getattr(self.sink, "pending", 0) >= d.max_unacked)):
            self._last_commit = now = time.monotonic()
            self.processor.page_unsilenced()
            if not self._paused and not self._holding:  # a stream is not idle while its input waits
                self.processor.evict_idle(now, self._input_since, self._caught_up())
                if now - self._forgot_at >= FORGET_EVERY_S:
                    self._forgot_at = now
                    self.processor.forget_dormant(self.source.assignment())
            self._commit()
            self._refresh_views()

    def _caught_up(self) -> set[TP]:
        """The partitions read to their end: at lag 0 in the last refresh of the views, made ``CAUGHT_UP_AFTER_S``
        or more after input came back (the high watermark of a partition paused until then is the one before the
        pause, until a fetch); none while a restore holds the input (paused, their lags are the ones before). The
        refresh's lags, not asked of the client a second time each commit interval."""
        if self.restoring or self._lags_at - self._input_since < CAUGHT_UP_AFTER_S:
            return set()
        return {tp for tp, lag in self._lags.items() if lag == 0}

    def _shutdown(self) -> None:
        """Score, publish, snapshot, commit and close, all within ``shutdown_timeout_s``: every commit asked
        for meanwhile (the final one, the revoke's) ends by ``processor.deadline``."""
        t0 = time.monotonic() if self._stop_at is None else self._stop_at  # from the signal, when one came
        if self._signal is not None:
            log.info("stopping", signal=self._signal, since_signal_s=round(time.monotonic() - t0, 3))
        budget = self.cfg.daemon.shutdown_timeout_s
        end = t0 + budget * SHUTDOWN_DRAIN_SHARE  # the rest is for stopping the scoring process and HTTP

        def left(share: float = 1.0) -> float:
            return max(0.05, (end - time.monotonic()) * share)

        self.processor.scoring_deadline = end  # a batch not back by then is stuck: never wait past the budget
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        # a recalibration running on the scheduler's thread: its changes must be in the final documents (they
        # came after them, logged as threshold_changed, and the next owner resumed from the older versions)
        if self.calibrator.recalibrating.acquire(timeout=left(0.2)):
            self.calibrator.recalibrating.release()
        else:
            log.warning("recalibration_still_running", consequence="thresholds it sets now are not in the final "
                        "state documents: the next owner starts from the ones before")
        if self._backlog:  # polled, never consumed: the next start reads them from the commit
            log.info("records_left_for_replay", records=len(self._backlog))
            self._backlog = []
        self.restorer.cancel()
        self._ready = (False, "stopping")
        self.notifier.stopping()
        try:
            self.processor.score_ready(force=True)
            self.processor.save_changed(every=True)
            self.processor.deadline = time.monotonic() + left(0.3)
            self._commit_now()
            if self.processor.failed is None:  # else nothing was committed past the failed batch (said as it failed)
                log.info("final_commit", offsets={f"{t}-{p}": o for (t, p), o in
                                                  sorted(self.processor.committed_offsets().items())})
        except (SinkBackpressure, BrokerError) as exc:
            log.error("final_commit_failed", error=str(exc),
                      consequence="input since the last commit is replayed at the next start")
        finally:
            self.final_thresholds = self.calibrator.snapshot()  # before close() revokes and forgets streams
            # leaving the group revokes (kafka-python: on this thread, its commit a no-op after the final one,
            # sharing this step's time; librdkafka: only unassigns, on a thread of its own): the sink is still open
            self.processor.deadline = time.monotonic() + left(0.4)
            steps: list[tuple[str, Callable[[], None] | None]] = [
                ("source", lambda: self.source.close(left(0.5))),
                ("control", self.control.close if self.control is not None else None),
                ("sink", lambda: self.sink.close(left())),
                ("scoring", self.processor.close),
                ("http", self.http.close if self.http is not None else None)]
            for name, close in steps:  # one that fails must not keep the others open
                try:
                    if close is not None:
                        close()
                except Exception as exc:  # noqa: BLE001
                    log.error("close_failed", part=name, error=describe(exc))
        self.notifier.close()
        log.info("daemon_stopped", uptime_s=round(time.monotonic() - self._started, 1),
                 shutdown_s=round(time.monotonic() - t0, 3), **_summary(self.metrics))


def _summary(m: Metrics) -> dict[str, int]:
    return {k: int(m.total(f"tsmon_{k}_total")) for k in ("records", "windows_scored", "alert_messages",
                                                            "dead_letters", "data_quality_events", "commits")}
