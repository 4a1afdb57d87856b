"""Restoring state at an assignment: the changelog read in steps while every assigned partition waits.

Owns which partitions wait for the read, the read in progress, and handing what it found to the processor (stream
documents, adopted when their streams start) and the controller (the daemon-wide document). The daemon's loop
calls :meth:`Restore.step` each turn while one is active, so health, metrics, signals and the group's poll go on.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from concurrent.futures import Future
from typing import Any

from models.errors import TsmonError
from monitor import logs
from monitor.calibrator import Calibrator
from monitor.config import Config
from monitor.controller import GLOBAL_KEY, Controller
from monitor.metrics import Metrics
from monitor.processor import Processor
from monitor.source import TP, Source
from monitor.state import Changelog, ChangelogReader, doc_epoch

log = logs.get("tsmon.daemon")
RESTORE_OPEN_S = 30.0  # longest one opening of the changelog waits for its positions and end offsets (the broker away)
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 10.0  # after a broker error the read starts again after this, doubling


def _open_in_thread(client: dict[str, Any], topic: str, timeout_s: float) -> Future[ChangelogReader]:
    """Open the changelog (bootstrap, positions, end offsets: tens of seconds with the broker away) off the loop's
    thread, so that a signal, health and the group's poll go on meanwhile."""
    opened: Future[ChangelogReader] = Future()

    def run() -> None:
        try:
            opened.set_result(ChangelogReader(client, topic, timeout_s))
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which raises what is not a broker error
            opened.set_exception(exc)

    threading.Thread(target=run, name="changelog-open", daemon=True).start()
    return opened


def wait_for(opened: Future[ChangelogReader], timeout_s: float) -> bool:
    """Whether the opening is over, waiting at most ``timeout_s`` for it."""
    return bool(concurrent.futures.wait([opened], timeout=max(0.0, timeout_s)).done)


def _close_when_opened(opened: Future[ChangelogReader]) -> None:
    """An opening no longer wanted: its consumer is closed once it is there."""
    opened.add_done_callback(lambda f: f.result().close() if f.exception() is None else None)


def _merged(a: Changelog, b: Changelog) -> Changelog:
    """Two failed reads of the changelog as one, key by key: the read that got further in the key's partition
    decides it — the one whose record for it has the higher offset, a tombstone included (each read's documents
    already respect the owners' epochs). Kept whole, the further read lost the streams of a partition the other
    had read further in (a changelog has several); chosen by epoch, the same owner's older document won when the
    read with more records overall held it, and a document deleted in one read came back from the other. Reads
    without offsets: the later owner's version (``epoch``), else the read with more records."""
    first, last = sorted((a, b), key=lambda c: c.records)
    docs = dict(first.docs)
    for key, doc in last.docs.items():
        if key not in docs or doc_epoch(doc) >= doc_epoch(docs[key]):
            docs[key] = doc
    for key in first.offsets.keys() | last.offsets.keys():
        far, near = (first, last) if first.offsets.get(key, -1) > last.offsets.get(key, -1) else (last, first)
        if far.offsets.get(key, -1) == near.offsets.get(key, -1):
            continue  # the same record: the same document
        if key in far.docs:
            docs[key] = far.docs[key]
        else:
            docs.pop(key, None)  # deleted in the read that got further
    offsets = {k: max(a.offsets.get(k, -1), b.offsets.get(k, -1)) for k in a.offsets.keys() | b.offsets.keys()}
    return Changelog(docs, last.records, last.seconds, False, last.superseded, offsets)


class Restore:
    """One changelog read at a time; a new assignment during a read starts it again, for the new partitions.

    A broker error while the changelog is opened or read starts the read again (after 1 s, doubling up to 10 s)
    until ``restore_timeout_s`` from the assignment: given up at the first error, the streams started from their
    artifacts and their next snapshot wrote over the documents — operators' pins, silences and calibrated
    thresholds lost for good after a broker hang of 30 s at the assignment."""

    def __init__(self, cfg: Config, processor: Processor, controller: Controller, source: Source, metrics: Metrics,
                 calibrator: Calibrator) -> None:
        self.cfg, self.processor, self.controller = cfg, processor, controller
        self.source, self.metrics, self.calibrator = source, metrics, calibrator
        self.due = False  # asked for in a rebalance callback (or to be tried again), opened by the loop
        self.reader: ChangelogReader | None = None  # the read in progress
        self._opening: Future[ChangelogReader] | None = None  # the changelog being opened, in a thread of its own
        self.waits: set[TP] = set()  # partitions paused until it is read
        self.started = 0.0  # monotonic time of the assignment it is for (restore_timeout_s counts from it)
        self.failures = 0  # broker errors since then
        self._retry_at = 0.0
        self._error = ""
        self._partial: Changelog | None = None  # the reads that failed, merged: applied if none succeeds

    @property
    def active(self) -> bool:
        return self.due or self.reader is not None or self._opening is not None

    @property
    def opening(self) -> bool:
        return self._opening is not None

    def ask(self) -> None:
        """Called in the rebalance callback, which must not block (the group's heartbeat waits for it): the read is
        opened by the loop's next :meth:`step`. Every assigned partition waits, whatever else holds it too."""
        self.drop()
        self.processor.restored = {}  # never continue from documents read at an earlier assignment
        self.processor.restore_incomplete = True  # until a read reaches its end
        self.processor.forget_evicted()
        self.due = True
        self.started, self.failures, self._retry_at, self._error = time.monotonic(), 0, 0.0, ""
        self._partial = None
        self.waits = self.source.assignment()
        self.source.pause(self.waits)

    def step(self, budget_s: float, stopping: bool) -> str | set[TP] | None:
        """Open the read if asked to, read on for ``budget_s`` (waiting for an opening or a retry's time at most
        that long: returned at once, the loop spun — 171 000 turns a second). Returns how far it is while it goes
        on; once it is read to its end (or ``restore_timeout_s`` ran out, or the signal came) its documents wait in
        the processor for their streams — those the failed reads got, merged, when none succeeded — and it returns the
        assigned partitions that waited for it (to resume). ``None``: no read to step."""
        if not self.active:
            return None
        left = self.cfg.state.restore_timeout_s - (time.monotonic() - self.started)
        if not stopping and left > 0:
            try:
                progress = self._advance(budget_s, left)
                if progress is not None:
                    return progress
            except TsmonError as exc:
                self.failures, self._error = self.failures + 1, str(exc)
                wait = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (self.failures - 1))
                left = self.cfg.state.restore_timeout_s - (time.monotonic() - self.started)
                if wait < left:
                    self._keep_partial()
                    self.drop()
                    self.due, self._retry_at = True, time.monotonic() + wait
                    log.warning("state_restore_retry", error=str(exc), retry_in_s=wait, failures=self.failures,
                                left_s=round(left, 1))
                    return f"restoring state: broker error, trying again in {wait:g} s ({exc})"
        self._keep_partial()
        read, opening = self._partial, self._opening
        self._partial = None
        self.drop()  # an opening still under way, a retry still due: given up
        self.due = False
        failed = not stopping and bool(self._error or opening) and (read is None or not read.complete)
        if failed:
            late = opening is not None and opening.done() and opening.exception() is None
            log.error("state_restore_failed", failures=self.failures, records=read.records if read else 0,
                      error=self._error or f"the changelog {'opened just as' if late else 'was still opening when'} "
                      f"restore_timeout_s ({self.cfg.state.restore_timeout_s:g} s) ran out: nothing read",
                      consequence="streams start from what was read, or from their artifact: restore_timeout_s ran "
                      "out")
        if read is not None:
            self._apply(read)
        else:  # nothing read (restore_timeout_s ran out before the changelog opened, or every read failed): streams
            # start provisional from their artifacts, and the gauge says so (an SRE pass: it stayed 0, no log line)
            self.metrics.restore_incomplete.set(1)
            if not (stopping or failed):  # (state_restore_failed said why: once is enough, a review)
                log.error("state_restore_incomplete", streams=0, records=0, reason="restore_timeout_s "
                          f"({self.cfg.state.restore_timeout_s:g} s) ran out before the changelog was opened")
        waits, self.waits = self.waits & self.source.assignment(), set()
        return waits

    def _keep_partial(self) -> None:
        """Close the reader, keeping what it read: a complete read replaces what failed reads got, a failed one is
        merged with them (:func:`_merged`)."""
        reader, self.reader = self.reader, None
        if reader is not None:
            read, kept = reader.close(), self._partial
            self._partial = read if kept is None or read.complete else kept if kept.complete else _merged(kept, read)

    def _advance(self, budget_s: float, left: float) -> str | None:
        """One step of the open or the read; None once it is read to its end."""
        if self.due:
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, budget_s))
                return f"restoring state: broker error, trying again ({self._error})"
            self.due = False
            self._opening = _open_in_thread(self.cfg.kafka.client_kwargs(), self.cfg.state.topic,
                                            min(left, RESTORE_OPEN_S))
        if self._opening is not None:
            if not wait_for(self._opening, budget_s):
                return "restoring state: opening the changelog"
            opened, self._opening = self._opening, None
            self.reader = opened.result()  # its broker error is raised here
            self._error = ""  # opened: an error from now on is this read's
        reader = self.reader
        assert reader is not None
        if not reader.step(min(budget_s, left)):
            return f"restoring state: {reader.records} changelog records read"
        return None

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
        if self._opening is not None:
            _close_when_opened(self._opening)
            self._opening = None

    def _apply(self, log_: Changelog) -> None:
        self.controller.restore_global(log_.docs.pop(GLOBAL_KEY, None), log_.complete)
        self.processor.restored = {k: v for k, v in log_.docs.items() if k not in self.processor.streams}
        self.processor.restore_incomplete = not log_.complete
        dormant = self.processor.adopt(self.source.assignment())
        self.metrics.restore_seconds.set(log_.seconds)
        self.metrics.restore_incomplete.set(0 if log_.complete else 1)  # only logs said so (the observability review)
        (log.info if log_.complete else log.error)(
            "state_restored" if log_.complete else "state_restore_incomplete", streams=len(log_.docs), dormant=dormant,
            records=log_.records, seconds=round(log_.seconds, 3), frozen_all=self.calibrator.frozen_all,
            superseded=log_.superseded)
