"""The commit order and rebalances: alerts, events and dead letters acknowledged, then state documents, then the
operators' acknowledgements, and only then the offsets the ledger says are safe (:meth:`Committing.commit`).

On a revoke, what waits is scored and published and the leaving partitions committed before their streams are
forgotten; a partition coming straight back is rewound to where its next owner must begin.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from models.errors import BrokerError, SinkBackpressure
from monitor import logs
from monitor.outbox import STATE_HEADER
from monitor.procstate import ProcessorState
from monitor.source import TP, Source

log = logs.get("tsmon.processor")

FLUSH_SLICE_S = 0.25  # a commit waits for the sink in slices of this: a deadline set meanwhile applies at the next


class Committing(ProcessorState):
    """The commit order and rebalances; see the module docstring."""

    def commit(self, source: Source, tps: set[TP] | None = None) -> dict[TP, int]:
        """The commit order, all within ``flush_timeout_s`` (and by ``deadline``):

        1. flush the sink: alerts, data-quality events and dead letters acknowledged;
        2. send the state documents saved since (:attr:`outbox`) and flush again — a document says its stream's
           alerts were published, so it never reaches the changelog before them;
        3. send the acknowledgements of the operators' commands those documents record (:attr:`outbox`): an
           "applied" never goes out for a change that is not on the changelog;
        4. commit what the ledger says is safe — not after a batch failed to score (:attr:`failed`): steps 1–3
           still run, for what was decided and saved before it.

        Raises SinkBackpressure (the sink did not acknowledge: nothing committed) or BrokerError (the
        commit itself failed); either way the input is replayed from the last commit if we die now.
        """
        end = time.monotonic() + self.settings.flush_timeout_s

        def left() -> float:  # the flush and the commit share the timeout; a deadline (shutdown) cuts it
            return (end if self.deadline is None else min(end, self.deadline)) - time.monotonic()

        for name in sorted(self.undocumented):  # their hold from the first sample read ends with this commit
            self.save(name)
        self.undocumented.clear()
        self._flush(left)  # 1. alerts, events, dead letters: acknowledged before any document that follows them
        self.outbox.delivered()  # (and documents a failed step 2 left with the sink)
        if self.send_documents():  # 2. then acknowledged too (a lost alert with its document acknowledged was
            self._flush(left)  # never sent again: the replay skipped its windows)
            self.outbox.delivered()
        self.send_acks()  # 3. (flushed with the next commit's step 1)
        if self.failed is not None:
            return {}
        assigned = source.assignment() if tps is None else tps
        offsets = {tp: o for tp, o in self.ledger.committable(assigned).items() if self._committed.get(tp) != o}
        if offsets:
            source.commit(offsets, max(0.05, left()))
            self._committed.update(offsets)
            self.metrics.commits.inc()
            self._past_steps(offsets)
        return offsets

    def _past_steps(self, committed: dict[TP, int]) -> None:
        """Forget where a clock step began once the commit is past it: no replay can start before it any more, and
        kept, it passed over records of a partition whose offsets began again (a topic recreated)."""
        for st in self.streams.values():
            if st.time_from:  # rare: one pass over the streams per commit costs nothing more
                done = [tp for tp, at in st.time_from.items() if committed.get(tp, -1) > at]
                for tp in done:
                    del st.time_from[tp]
                st.dirty = st.dirty or bool(done)

    def send_documents(self) -> int:
        """Hand the state documents saved since the last commit to the sink (:meth:`commit`'s step 2)."""
        states = sum(1 for m in self.outbox.documents.values() if STATE_HEADER in m.headers)
        self.metrics.snapshots.inc(states)  # those sent, not each save (the latest per stream goes: 4 saves, 1 sent)
        return self.outbox.send_documents(self.sink)

    def send_acks(self) -> None:
        """Hand the command acknowledgements to the sink (:meth:`commit`'s step 3)."""
        self.outbox.send_acks(self.sink)

    def committed_offsets(self) -> dict[TP, int]:
        """The offsets this instance last committed, per partition it holds."""
        return dict(self._committed)

    def uncommitted(self, tps: set[TP]) -> dict[TP, int]:
        """Records read past the offsets last committed to the broker, per partition: what a crash now would
        replay — held back by a quiet stream's partial window, or by commits that fail (not what *could* be
        committed: that reads near 0 exactly while the commits fail)."""
        return self.ledger.read_past(self._committed, tps)

    def _flush(self, left: Callable[[], float]) -> None:
        """Wait for the sink while ``left()`` > 0, in slices of ``FLUSH_SLICE_S``: a SIGTERM that lands in
        a stalled flush brings ``deadline`` forward, and the flush ends by it (give or take a slice, or a
        re-send blocking up to the producer's ``max_block_ms``) instead of after its whole timeout. A sink that
        gives up before its slice is over (refusals retried, a test sink) raises at once, as a single flush
        would. The sink's re-send limit (``retries``) now applies per slice."""
        while True:
            step = max(0.05, min(FLUSH_SLICE_S, left()))
            began = time.monotonic()
            try:
                self.sink.flush(step)
                return
            except SinkBackpressure:
                if left() <= 0 or time.monotonic() - began < 0.9 * step:
                    raise

    def revoke(self, source: Source, tps: set[TP]) -> dict[TP, int]:
        """Partitions are leaving: score what waits, publish, commit them, forget their streams.

        Returns, per partition read from, where a next owner must begin: the offset committed now or, if that
        failed, the last one committed (else where this instance began). The daemon rewinds a partition that
        comes straight back to it there, since its streams are gone from memory."""
        self.forget_evicted()
        self.score_ready(force=True)
        # a stream woken by a command has read nothing since: its partition is unknown, it may be one of these
        woken = {n for n in self.streams if not self.ledger.partitions_of(n)}
        kept: dict[str, dict[str, Any]] = {}
        for stream in self.ledger.streams_on(tps) | woken:  # their next owner restores from these
            doc = self.save(stream)
            if doc is not None and stream in woken and self.settings.state_topic is None:  # no changelog: kept here,
                kept[stream] = doc  # as at its eviction (dropped, a pin or an owed page set on it was lost for good)
        failed = False
        try:
            self.commit(source, tps)
        except (SinkBackpressure, BrokerError) as exc:  # the next owner replays from the last commit
            log.error("commit_on_revoke_failed", error=str(exc))
            failed = True
        resume = {tp: o for tp in tps if (o := self._committed.get(tp, self.ledger.first_read(tp))) is not None}
        for stream in self.ledger.drop(tps) | woken:  # a woken one comes back from the changelog if it stays
            self._drop(stream)
            self.ledger.forget(stream)  # also what it held on partitions that stay: nothing would release it
        self.restored.update(kept)  # adopted again at the assignment, as evicted streams' documents are
        # The documents (tombstones too) of streams only on these partitions are never sent: sent at this instance's
        # next commit, they landed after the next owner's own and became the streams' latest (a pin set there was
        # lost at the next restore), and a tombstone deleted the next owner's document. A command whose change was
        # in them is not acknowledged ("applied" went out, the next owner restored the streams without it): tsmon
        # ctl says the partition was not answered for, to send it again.
        if failed and (lost := self.outbox.drop_revoked(tps)):
            self.unpersisted |= lost
            log.warning("commands_not_persisted", command_ids=sorted(self.unpersisted),
                        consequence="not acknowledged: send them again (their streams' next owner applies them)")
        for tp in tps:
            self._committed.pop(tp, None)
            self.read_ts.pop(tp, None)
        return resume
