"""Batches on the scoring backend: submitted while a slot is free, their results applied in submission order.

Owns the bound on batches in flight (``max_inflight``), the scoring timeout (a call that never returns is
:class:`ScoringStuck`) and the rule that after a failed or stuck batch nothing is applied any more
(:attr:`ProcessorState.failed`): its windows are lost to this process, and the restart replays them.
"""

from __future__ import annotations

import time
from concurrent import futures
from concurrent.futures import Future
from typing import NoReturn

from models.errors import ScoringStuck, describe
from monitor import logs
from monitor.batcher import Batch
from monitor.procstate import ProcessorState
from monitor.scoring import Result

log = logs.get("tsmon.processor")


class InFlight(ProcessorState):
    """Batches on the scoring backend, results applied in order; see the module docstring."""

    def score_ready(self, force: bool = False) -> int:
        """Apply finished results (in order), then submit the batches that are due while a scoring slot is
        free; returns the windows applied. Never blocks unless ``force``: then every waiting window is
        scored and applied (revoke, shutdown). What cannot be submitted waits in the batcher, which the
        daemon bounds by pausing its input (:attr:`pending`)."""
        if self.failed is not None:
            return 0
        n = self._apply_done()
        if force:
            batches = self.batcher.ready(force=True)
            for i, batch in enumerate(batches):
                while len(self._inflight) >= self.settings.max_inflight:  # bounded: wait for the oldest
                    n += self._apply(*self._inflight.popleft())
                if self.scoring_deadline is not None and time.monotonic() >= self.scoring_deadline:
                    # a shutdown's drain is over: what is left stays unscored, so uncommitted (replayed at the next
                    # start); a revoke's drain a SIGTERM cut ran on, each batch bounded only by scoring_timeout_s
                    log.info("drain_cut", windows_left=sum(len(b) for b in batches[i:]),
                             consequence="not scored here: replayed from the last commit")
                    break
                self._submit(batch)
            while self._inflight:
                n += self._apply(*self._inflight.popleft())
            return n
        room = self.settings.max_inflight - len(self._inflight)
        for batch in self.batcher.ready(idle=not self._inflight, room=max(0, room)):
            self._submit(batch)
        return n

    def wait_scored(self, timeout_s: float) -> None:
        """Block until the oldest batch in flight is scored, or while none is, until the next batch is due
        (at most ``timeout_s`` either way)."""
        if self._inflight:
            futures.wait([self._inflight[0][1]], timeout=max(0.0, timeout_s))
        else:
            time.sleep(max(0.0, min(timeout_s, self.batcher.wait_s() or 0.0)))

    def _apply_done(self) -> int:
        n = 0
        while self._inflight and self._inflight[0][1].done():
            n += self._apply(*self._inflight.popleft())
        return n

    def _submit(self, batch: Batch) -> None:
        self._inflight.append((batch, self._backend.submit(batch.model, batch.values), time.monotonic()))

    def check_stuck(self) -> None:
        """Raise :class:`ScoringStuck` once the oldest batch in flight has run past ``scoring_timeout_s`` (the loop
        asks every turn: waiting on it never blocks there, so a hung call went unnoticed while the loop turned)."""
        if self._inflight and not self._inflight[0][1].done():
            batch, _, since = self._inflight[0]
            if time.monotonic() - since > self.settings.scoring_timeout_s:
                self._stuck(batch)

    @property
    def scoring_busy(self) -> bool:
        """A batch is being scored (its result not applied yet)."""
        return bool(self._inflight)

    def _stuck(self, batch: Batch, shutting_down: bool = False) -> NoReturn:
        self.stuck = True
        self.failed = (f"scoring stuck: a batch of {len(batch)} windows of model {batch.model} has not returned "
                       + ("by the end of the shutdown's drain (daemon.shutdown_timeout_s)" if shutting_down else
                          f"in {self.settings.scoring_timeout_s:g} s (daemon.scoring_timeout_s)"))
        log.error("scoring_stuck", error=self.failed, consequence="nothing applied, snapshotted or committed from "
                  "now on; the process exits for its supervisor to restart it, which replays from the last commit")
        raise ScoringStuck(self.failed)

    def _apply(self, batch: Batch, future: Future[Result], since: float) -> int:
        limit = since + self.settings.scoring_timeout_s
        if self.scoring_deadline is not None:
            limit = min(limit, self.scoring_deadline)
        try:  # a scoring failure surfaces here, on our thread; a call that never returns, after the timeout
            window_err, channel_err, seconds = future.result(timeout=max(0.0, limit - time.monotonic()))
        except Exception as exc:
            if not future.done():  # not a failure of the call: it is still running
                self._stuck(batch, shutting_down=limit < since + self.settings.scoring_timeout_s)
            self.failed = describe(exc)[:300]
            log.error("scoring_failed", error=self.failed, windows=len(batch),
                      consequence="nothing applied, snapshotted or committed from now on: the next start replays "
                                  "from the last commit")
            raise
        if self._inflight:  # the next batch waited behind this one: its time counts from now
            head_batch, head_future, head_since = self._inflight[0]
            self._inflight[0] = (head_batch, head_future, max(head_since, time.monotonic()))
        self.metrics.batch_seconds.observe(seconds)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.windows.labels(batch.model).inc(len(batch))
        self.batcher.observed(batch.model, len(batch), seconds)
        try:
            self._after_scoring(batch, window_err, channel_err)
        except Exception as exc:  # a bug or a bad document: the rest of the batch is not applied, so nothing may be
            self.failed = describe(exc)[:300]  # committed past it (the shutdown went on to commit, before)
            log.error("scoring_apply_failed", error=self.failed, windows=len(batch),
                      consequence="nothing applied, snapshotted or committed from now on: the next start replays "
                                  "from the last commit")
            raise
        decided_ms = self.clock() * 1000
        self.metrics.event_lag.observe(max(0.0, (decided_ms - float(batch.end_ts.min())) / 1000))
        if self.on_decided is not None:
            self.on_decided(batch, decided_ms, seconds)
        return len(batch)

    def close(self) -> None:
        self._backend.close(wait=not self.stuck)
