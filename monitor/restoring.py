"""Restoring state at an assignment: the changelog read in steps while every assigned partition waits.

Owns which partitions wait for the read, the read in progress, and handing what it found to the processor (stream
documents, adopted when their streams start) and the controller (the daemon-wide document). The daemon's loop
calls :meth:`Restore.step` each turn while one is active, so health, metrics, signals and the group's poll go on.
"""

from __future__ import annotations

from models.errors import TsmonError
from monitor import logs
from monitor.calibrator import Calibrator
from monitor.config import Config
from monitor.controller import GLOBAL_KEY, Controller
from monitor.metrics import Metrics
from monitor.processor import Processor
from monitor.source import TP, Source
from monitor.state import Changelog, ChangelogReader

log = logs.get("tsmon.daemon")
RESTORE_OPEN_S = 30.0  # longest the loop waits for the changelog's positions (the broker away) when opening it


class Restore:
    """One changelog read at a time; a new assignment during a read starts it again, for the new partitions."""

    def __init__(self, cfg: Config, processor: Processor, controller: Controller, source: Source, metrics: Metrics,
                 calibrator: Calibrator) -> None:
        self.cfg, self.processor, self.controller = cfg, processor, controller
        self.source, self.metrics, self.calibrator = source, metrics, calibrator
        self.due = False  # asked for in a rebalance callback, opened by the loop
        self.reader: ChangelogReader | None = None  # the read in progress
        self.opening = False  # opening the reader (a bounded wait on the loop's thread): /healthz allows it
        self.waits: set[TP] = set()  # partitions paused until it is read

    @property
    def active(self) -> bool:
        return self.due or self.reader is not None

    def ask(self) -> None:
        """Called in the rebalance callback, which must not block (the group's heartbeat waits for it): the read is
        opened by the loop's next :meth:`step`. Every assigned partition waits, whatever else holds it too."""
        self.drop()
        self.processor.restored = {}  # never continue from documents read at an earlier assignment
        self.processor.forget_evicted()
        self.due = True
        self.waits = self.source.assignment()
        self.source.pause(self.waits)

    def step(self, budget_s: float, stopping: bool) -> str | set[TP] | None:
        """Open the read if asked to, read on for ``budget_s``. Returns how far it is while it goes on; once it is
        read to its end (or ``restore_timeout_s`` ran out, or the broker failed) its documents wait in the
        processor for their streams, and it returns the assigned partitions that waited for it (to resume).
        ``None``: no read to step."""
        st = self.cfg.state
        try:
            if self.due:
                self.due = False
                self.opening = True  # blocks the loop, for at most twice RESTORE_OPEN_S
                try:
                    self.reader = ChangelogReader(self.cfg.kafka.client_kwargs(), st.topic,
                                                  min(st.restore_timeout_s, RESTORE_OPEN_S))
                finally:
                    self.opening = False
            reader = self.reader
            if reader is None:
                return None
            if not reader.step(min(budget_s, max(0.0, st.restore_timeout_s - reader.seconds))) \
                    and reader.seconds < st.restore_timeout_s and not stopping:
                return f"restoring state: {reader.records} changelog records read"
        except TsmonError as exc:
            log.error("state_restore_failed", error=str(exc), consequence="streams start from what was read, or "
                      "from their artifact")
        reader, self.reader = self.reader, None
        if reader is not None:
            self._apply(reader.close())
        waits, self.waits = self.waits & self.source.assignment(), set()
        return waits

    def cancel(self) -> None:
        """Stopped while restoring: the input never resumed, nothing to apply."""
        if self.active:
            log.error("state_restore_incomplete", reason="stopping", records=self.reader.records if self.reader else 0)
        self.drop()
        self.due = False

    def drop(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def _apply(self, log_: Changelog) -> None:
        daemon_doc = log_.docs.pop(GLOBAL_KEY, None)
        if daemon_doc is not None:
            self.controller.restore_global(daemon_doc)
        elif log_.complete:  # read to its end and none there: this instance's state is the group's
            self.controller.global_known = True
        self.processor.restored = {k: v for k, v in log_.docs.items() if k not in self.processor.streams}
        dormant = self.processor.adopt(self.source.assignment())
        self.metrics.restore_seconds.set(log_.seconds)
        (log.info if log_.complete else log.error)(
            "state_restored" if log_.complete else "state_restore_incomplete", streams=len(log_.docs), dormant=dormant,
            records=log_.records, seconds=round(log_.seconds, 3), frozen_all=self.calibrator.frozen_all,
            superseded=log_.superseded)
