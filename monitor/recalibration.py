"""Scheduled recalibration (every stream on the wall clock, one at a time on the data clock), the streams whose
threshold raise is refused and why, and ``tsmon_threshold`` kept equal to the calibrator's state.

A failed run is logged, never raised: the next scheduled run tries again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from models.errors import describe
from monitor import logs
from monitor.calibrator import ThresholdState
from monitor.daemon_state import DaemonState

log = logs.get("tsmon.daemon")


class Recalibration(DaemonState):
    """See the module docstring."""

    def _init_recalibration(self) -> None:
        self._refusing = {}  # streams whose last recalibration refused a raise → why
        self._refusing_lock = threading.Lock()

    def recalibrate(self, streams: list[str] | None = None) -> None:
        """Scheduled recalibration of every stream (wall clock) or of ``streams`` (data clock: one at a time). A
        failure is logged, never raised: into apscheduler it printed a plain-text traceback amid the JSON log
        and lost the run's counts and warnings; on the data clock it would stop the loop."""
        try:
            self._recalibrate(streams)
        except Exception as exc:  # noqa: BLE001 — the next scheduled run tries again
            log.error("recalibration_failed", error=describe(exc)[:500])

    def _recalibrate(self, streams: list[str] | None) -> None:
        refused: dict[str, str] = {}
        changed = self.calibrator.recalibrate(streams, refused=refused)
        done = set(streams or ())  # a run over every stream (None) settles every earlier refusal
        self._note_refusals(lambda s: streams is not None and s not in done, refused)
        for stream, (old, new) in changed.items():
            outcome = "new_normal" if new.reason.startswith("new normal") else "changed"
            self.metrics.calibrations.labels(outcome).inc()
            log.info("threshold_changed", stream=stream, old=round(old.value, 6), new=round(new.value, 6),
                     source=new.source, version=new.version, reason=new.reason, samples=new.samples)
        for stream, reason in refused.items():
            self.metrics.calibrations.labels("refused").inc()
            self.processor.throttle.log(log.warning, "threshold_raise_refused", stream=stream, reason=reason,
                                        threshold=self._threshold_or_none(stream))

    def _threshold_or_none(self, stream: str) -> float | None:
        try:  # revoked or evicted (on the loop's thread) since a recalibration refused it: forgotten
            return round(self.calibrator.threshold(stream).value, 6)
        except KeyError:
            return None

    def _note_refusals(self, keep: Callable[[str], bool], new: dict[str, str]) -> None:
        """The streams whose threshold raise is refused now → why: the earlier ones ``keep`` accepts, and ``new``;
        one no longer held (revoked or evicted) is dropped. Each refusal is also counted, once per run."""
        held = self.processor.streams
        with self._refusing_lock:  # the scheduler's thread and the loop both replace it
            both = {**{s: r for s, r in self._refusing.items() if keep(s)}, **new}
            self._refusing = {s: r for s, r in both.items() if s in held}
            self.metrics.refusing.set(len(self._refusing))

    def _threshold_metric(self, stream: str, state: ThresholdState | None) -> None:
        """Keeps ``tsmon_threshold`` equal to the calibrator's state, whatever changed it."""
        if state is None:
            self.metrics.forget_threshold(stream)
            return
        self.metrics.set_threshold(stream, state.value, state.source)
        for listener in self.threshold_listeners:
            listener(stream, state)
