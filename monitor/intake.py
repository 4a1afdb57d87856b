"""How much input the daemon takes, and when it stops taking it: polls sized to ``batch.max_pending``, records handed
to the processor in slices that fit (the rest wait in a backlog), back-pressure while scoring falls behind, and
commits — while the broker or the sink fails, the input is paused and the commit retried with backoff.

Nothing is buffered without bound and nothing is dropped: what was scored waits in the sink, or is replayed from
the last commit; a partition is resumed only once every hold on it (failure, restore, a fetch's retry) is lifted.
"""

from __future__ import annotations

import time

from models.errors import BrokerError, SinkBackpressure
from monitor import logs
from monitor.daemon_state import DaemonState
from monitor.reading import Backoff
from monitor.source import TP, InRecord

log = logs.get("tsmon.daemon")


class Intake(DaemonState):
    """See the module docstring."""

    def _init_intake(self) -> None:
        self._paused = set()  # partitions paused while the sink or the broker fails
        self._backlog = []  # polled, not handed over yet: batch.max_pending was reached
        self._holding = False  # input paused because scoring falls behind (back-pressure)
        self._input_since = time.monotonic()  # input last came back from a pause: silence before it is not idleness
        self._problem = None  # why the last commit attempt failed; /readyz reports it
        self._retry = Backoff(self.cfg.daemon.commit_interval_ms / 1000, self.cfg.daemon.retry_max_s)
        self._broker_absent = False  # the last commit was not tried: the client saw no broker (see _commit)

    def _resume(self, tps: set[TP]) -> None:
        """Resume ``tps`` but those still held for another reason: a failing sink or broker (``_paused``), the
        restore, a failed fetch's retry. Each hold is lifted by its own path, which calls this."""
        self.source.resume(tps - self._paused - self.restorer.waits - self.input_reader.waits)

    def _handle(self, records: list[InRecord]) -> None:
        """Records that arrive after a stop signal are left to the next owner (never committed): the shutdown
        budget is for what was taken before it. So are records of a partition no longer assigned. Records
        waiting in ``_backlog`` go first."""
        records, self._backlog = self._backlog + records, []
        if records and self.stop_event.is_set():
            log.info("records_left_for_replay", records=len(records))
            return
        if records and (stale := {r.tp for r in records} - self.source.assignment()):
            # taken before a revoke that came in the same poll (librdkafka can hand one over): its stream is
            # gone and its document not read back yet; the partition's next owner reads it from the commit
            log.info("records_of_revoked_partitions_left", partitions=sorted(f"{t}-{p}" for t, p in stale))
            records = [r for r in records if r.tp not in stale]
        self._hand_over(records)

    def _hand_over(self, records: list[InRecord]) -> None:
        """Hand records to the processor a slice at a time, each slice as many bytes as the windows per byte learnt
        so far says fit ``batch.max_pending``; the rest wait in ``_backlog`` for the scorer (read, not consumed: a
        commit never passes them). A poll is sized by records, and messages can change size by 1 000×: after
        single-sample messages one poll took 500 chunks of 2 000 samples at once (~100 000 windows)."""
        limit, i, sizes = self.cfg.batch.pending_limit, 0, [len(r.value or b"") for r in records]
        while i < len(records):
            room = limit - self.processor.pending
            if i and room <= 0:
                self._backlog = records[i:]
                return
            k, per_byte = 1, self.processor.windows_per_byte  # nothing learnt yet: one record tells
            if per_byte is not None:
                budget, size = max(room, 1) / max(per_byte, 1e-9), sizes[i]
                while i + k < len(records) and size + sizes[i + k] <= budget:
                    size += sizes[i + k]
                    k += 1
            self.processor.handle(records[i : i + k])
            i += k

    def _poll_room(self) -> int:
        """Records the next poll may take: as many as keep the waiting windows within ``batch.max_pending``
        (a record of 140 samples at hop 1 makes 140 windows), at most ``kafka.max_poll_records``; 0 when not
        even one fits (the loop then waits for the scorer instead of polling: nothing is paused, so the client
        keeps what it fetched), except that with nothing waiting one record is taken however many windows it
        makes. One while nothing is known about the records' size, twice as many after each dead letter meanwhile.
        A pause (``_hold_input``) is left for records that make more windows than learnt."""
        room = self.cfg.batch.pending_limit - self.processor.pending
        per = self.processor.windows_per_record
        if per is None:
            return min(self.processor.unsized_room, self.cfg.kafka.max_poll_records) if room > 0 else 0
        k = int(min(self.cfg.kafka.max_poll_records, max(room, 0) / max(per, 1e-3)))
        # none fits: wait for the scorer; but with nothing waiting at all, take one however large it is
        return k if k >= 1 else (1 if self.processor.pending == 0 else 0)

    def _hold_input(self) -> None:
        """Back-pressure: pause every assigned partition while more than ``batch.max_pending`` windows wait to
        be scored; resume them (unless paused for a failure) once fewer than half do. Polling goes on, so
        commits, commands and health keep turning while the scorer catches up. Partitions assigned while
        holding are paused on arrival (``_on_assign``); a kept partition keeps its pause across a rebalance."""
        pending, limit = self.processor.pending, self.cfg.batch.pending_limit
        if not self._holding and pending > limit:
            self._holding = True
            self.source.pause(self.source.assignment() - self._paused)
            self.metrics.backpressure.set(1)
            self.metrics.backpressure_pauses.inc()
            log.debug("input_held", pending_windows=pending, limit=limit)
        elif self._holding and pending <= limit // 2:
            self._holding = False
            self._resume(self.source.assignment())
            self._input_since = time.monotonic()
            self.metrics.backpressure.set(0)
            log.debug("input_released", pending_windows=pending)

    def _commit(self) -> None:
        """Commit; while the broker or the sink fails, pause the input and retry with backoff.

        Nothing is buffered without bound and nothing is dropped: what was scored waits in the sink (or is
        replayed from the last commit if we die), and no new input is fetched until a commit succeeds.
        """
        now = time.monotonic()
        if not self._retry.due(now) and not (self._broker_absent and self.source.broker_problem() is None):
            return  # waiting out the backoff — unless the broker whose absence paused the input is back: then at
            # once (after a 45 s freeze /readyz said "no group heartbeat for 43 s" for 10 s more, input paused)
        try:
            self._commit_now()
        except SinkBackpressure as exc:
            self._failing("sink", f"sink back-pressure: {exc}")
            return
        except BrokerError as exc:  # unreachable, or the commit itself failed (a broker that stopped answering)
            self.metrics.broker_up.set(0)  # unreachable or not answering, until a commit goes through
            self._failing("broker", f"broker unavailable: {exc}")
            return
        paused, self._paused = self._paused, set()
        if paused and not self._holding:
            self._resume(paused)
            self._input_since = time.monotonic()
        if self._problem is not None:
            log.info("input_resumed", partitions=len(paused), after_s=round(now - (self._retry.since or now), 1),
                     retries=self._retry.failures)
            self.metrics.paused.set(0)
        self._problem = None
        self._retry.succeeded()

    def _commit_now(self) -> None:
        """Flush and commit, unless the broker is unreachable: a commit then would only block until it timed out."""
        problem = self.source.broker_problem()
        self._broker_absent = problem is not None
        if problem is not None:  # tsmon_broker_up goes 0 where every failure of this lands (:meth:`_commit`)
            raise BrokerError(problem)
        self.processor.commit(self.source)
        self.metrics.broker_up.set(1)  # only once a commit went through: a scrape during a retry reads 0

    def _pause(self, tps: set[TP]) -> None:
        if tps:
            self.source.pause(tps)
            self._paused |= tps

    def _failing(self, cause: str, problem: str) -> None:
        self._pause(self.source.assignment() - self._paused)
        first = self._problem is None
        self._problem = problem
        self.metrics.paused.set(1)
        self.metrics.retries.labels(cause).inc()
        delay = self._retry.failed(time.monotonic())  # from the end of the attempt, which can take seconds
        (log.warning if first else log.info)("input_paused" if first else "commit_retry_failed", cause=cause,
                                             error=problem, partitions=len(self._paused), retry_in_s=round(delay, 2))
