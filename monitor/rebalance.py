"""Partitions coming and going: the rebalance callbacks (on the loop's thread, inside a poll) and the changelog
restore an assignment starts, read in steps while the assigned partitions wait for it.

A revoke scores, publishes and commits what the leaving partitions hold before their streams are dropped; a
partition given straight back is rewound to where its next owner would begin.
"""

from __future__ import annotations

import time

from monitor import logs
from monitor.daemon_state import REBALANCING, DaemonState
from monitor.source import TP

log = logs.get("tsmon.daemon")


class Rebalance(DaemonState):
    """See the module docstring."""

    def _init_rebalance(self) -> None:
        # the changelog is read at the first assignment, then at every later one; commands wait for the first
        self._restored = not (self._kafka and self.cfg.state.enabled)
        self._rewind = {}  # offsets to read the partitions of the last revoke again from
        self._unassigned = False  # revoked, the assignment not come yet (an eager JoinGroup spans polls)

    # rebalance callbacks (called from inside poll, on the loop's thread)
    def _on_revoke(self, tps: list[TP]) -> None:
        log.info("partitions_revoked", partitions=[f"{t}-{p}" for t, p in tps])
        revoked = set(tps)
        self._paused -= revoked
        dropped: dict[TP, int] = {}  # never handed over: the next owner reads them — or this instance, given the
        for r in self._backlog:  # partition straight back, from the first of them where nothing was read before them
            if r.tp in revoked:  # (the client keeps its position past them: they were skipped)
                dropped[r.tp] = min(dropped.get(r.tp, r.offset), r.offset)
        self._backlog = [r for r in self._backlog if r.tp not in revoked]
        # no wall-clock recalibration between the revoked streams' documents and their drop: a threshold it set then
        # was logged and exported, never in the changelog (the next owner resumed from the version before and wrote
        # another under the same number; a daemon review). On the data clock it runs on this thread: nothing to hold
        wait = self.cfg.daemon.sink_timeout_s  # within the shutdown's budget when stopping: kafka-python runs this
        if self.processor.deadline is not None:  # in close(), which waits for it whatever timeout it was given
            wait = max(0.0, min(wait, self.processor.deadline - time.monotonic()))
        held = self.processor.data_clock is None and self.calibrator.recalibrating.acquire(timeout=wait)
        if not held and self.processor.data_clock is None:
            log.warning("recalibration_still_running", consequence="thresholds it sets now may miss the revoked "
                        "streams' documents: their next owner starts from the ones before")
        try:
            self._rewind = {**dropped, **self.processor.revoke(self.source, revoked)}
        finally:
            if held:
                self.calibrator.recalibrating.release()
        if self.processor.unpersisted:  # their changes were dropped with the documents: not applied, as far as
            self.controller.forget(self.processor.unpersisted)  # the group knows (sent again, they are applied)
            self.processor.unpersisted = set()
        self._unassigned = bool(tps)  # its streams are dropped: commands wait for the assignment and its restore
        if tps and self._ready[1] != "stopping":  # kafka-python lists them until the assignment: /readyz said "4
            # partition(s) assigned" meanwhile (a revoke at the shutdown's close() is no rebalance)
            self._ready = (False, REBALANCING)

    def _on_assign(self, tps: list[TP]) -> None:
        # Streams of these partitions start when their first record arrives; they continue from the
        # changelog, which the previous owner wrote when the partitions were revoked from it. The first
        # assignment reads it in any case (daemon-wide state), before any command is polled.
        log.info("partitions_assigned", partitions=[f"{t}-{p}" for t, p in tps])
        self._unassigned = False
        # A partition revoked and given straight back keeps its read position in the client, but its streams
        # were dropped at the revoke: read it again from where a next owner would begin.
        given = set(tps)
        # a commit that failed during the join paused what the client still listed then, revoked ones too
        self._paused &= given
        for tp in list(self.input_reader.unreadable):  # a new assignment starts them from the commit: try again
            self.input_reader.forget(tp)
        back, self._rewind = {tp: o for tp, o in self._rewind.items() if tp in given}, {}
        if back:
            self.source.rewind(back)
            log.info("partitions_rewound", offsets={f"{t}-{p}": o for (t, p), o in sorted(back.items())})
        if self._problem is not None:  # still failing: new partitions wait like the others
            self._pause(set(tps))
        elif self._holding and tps:  # scoring still behind: they wait for the release like the others
            self.source.pause(set(tps))
        elif tps:  # nothing holds them: kafka-python keeps the pause flag of a partition it kept, and without
            # state no restore resumes them (paused for a commit that failed, then succeeded during the join,
            # one was never read again)
            self.source.resume(set(tps))
        if tps or not self._restored:
            self.restore()

    def restore(self) -> None:
        """Ask for the changelog to be read: the loop reads it in steps (:meth:`_restore_step`) while every assigned
        partition stays paused, so no stream starts before its document is known (one that did would write over it
        with its artifact's state) and the loop keeps turning however long it takes. Called in the rebalance
        callback, which must not block."""
        if not self.cfg.state.enabled:  # no changelog: the documents kept in memory at evictions are all there is,
            # and a revoke forgot which of them are this instance's (a page owed when a silence ends was lost)
            self.processor.adopt(self.source.assignment())
            return
        if not self._kafka:
            return
        self.restorer.ask()
        self._ready = (False, "restoring state")

    @property
    def restoring(self) -> bool:
        return self.restorer.active

    def _restore_step(self, budget_s: float) -> None:
        """Read on in the changelog; once it is read the input resumes (unless held for another reason)."""
        done = self.restorer.step(budget_s, self.stop_event.is_set())
        if done is None:
            return
        if isinstance(done, str):  # and the broker's state, when it is the cause ("opening" hid it for 30 s)
            problem = self.source.broker_problem()
            self._ready = (False, done if problem is None else f"{done}; {problem}")
            return
        self._restored = True
        if not self._holding:  # a failure's pause (_paused) is lifted by the next good commit
            self._resume(done)
        self._input_since = time.monotonic()
        self._refresh_views()
