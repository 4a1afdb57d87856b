"""Which input offsets are safe to commit: the at-least-once bookkeeping.

Owns the map from each stream's sample numbers back to the input messages that carried them. The offset
committed for a partition is that of its oldest message still needed; a message is needed while any
of its samples may still be part of a window that is not yet scored, or of an episode that is still
open (so that a replay after a crash rebuilds that window or episode, with the same alert id).
The daemon releases samples with :meth:`release` as windows are scored, and commits
:meth:`committable` after the sink has acknowledged everything sent so far.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from dataclasses import dataclass, field

from monitor.source import TP

# released messages kept before the lists are cut (amortises the cut); with one sample a message, 1 024 of them
# in Python lists were ~74 kB a stream — more than all its other state (725 MB for 10 000 streams)
KEEP_RELEASED = 256


@dataclass
class _Messages:
    """Messages of one stream on one partition, oldest first, with the last sample number each carried
    (int64 arrays: 16 bytes a message)."""

    offsets: array[int] = field(default_factory=lambda: array("q"))
    last_seq: array[int] = field(default_factory=lambda: array("q"))
    head: int = 0  # messages before it are released (no longer needed), kept until they are dropped
    dropped_seq: int = -1  # the last sample of the messages dropped from the lists

    def release(self, seq: int) -> None:
        """Forget messages whose samples all come before sample ``seq``."""
        self.head = max(self.head, bisect_left(self.last_seq, seq, lo=self.head))
        if self.head > KEEP_RELEASED and self.head * 2 > len(self.offsets):
            self.dropped_seq = self.last_seq[self.head - 1]
            del self.offsets[: self.head], self.last_seq[: self.head]
            self.head = 0

    def first(self) -> int | None:
        return self.offsets[self.head] if self.head < len(self.offsets) else None

    def offset_of(self, seq: int) -> tuple[int, int] | None:
        """The first message here whose samples reach sample ``seq``, released or not, while it is in the lists,
        and its last sample number; None once it was dropped (it was the oldest still kept: an episode longer
        than ``max_hold_windows`` named it). On this partition alone it carried ``seq``; a stream whose messages
        came on several partitions has gaps in each one's numbers (see :meth:`OffsetLedger.offset_of`)."""
        if seq <= self.dropped_seq:
            return None
        i = bisect_left(self.last_seq, seq)
        return (self.offsets[i], self.last_seq[i]) if i < len(self.offsets) else None


class OffsetLedger:
    def __init__(self) -> None:
        self._consumed: dict[TP, int] = {}  # next offset after the last record seen
        self._first: dict[TP, int] = {}  # the first record seen since the partition was assigned
        self._held: dict[TP, dict[str, _Messages]] = {}
        self._streams: dict[str, set[TP]] = {}
        self.began: list[tuple[TP, int]] = []  # partitions whose first record since their assignment was just read

    def consumed(self, tp: TP, offset: int) -> None:
        """A record was read (whatever became of it)."""
        if tp not in self._first:
            self._first[tp] = offset
            self.began.append((tp, offset))
        self._consumed[tp] = max(self._consumed.get(tp, 0), offset + 1)

    def hold(self, tp: TP, stream: str, offset: int, last_seq: int) -> None:
        """A message carried the stream's samples up to number ``last_seq``."""
        self.consumed(tp, offset)
        m = self._held.setdefault(tp, {}).setdefault(stream, _Messages())
        m.offsets.append(offset)
        m.last_seq.append(last_seq)
        self._streams.setdefault(stream, set()).add(tp)

    def release(self, stream: str, seq: int) -> None:
        """Samples before number ``seq`` of the stream are no longer needed."""
        for tp in self._streams.get(stream, ()):
            self._held[tp][stream].release(seq)

    def offset_of(self, stream: str, seq: int) -> tuple[TP, int] | None:
        """The input message that carried sample ``seq`` of the stream, while it is known (see _Messages). A
        message carries consecutive samples, so where the stream came on several partitions (keyless messages)
        it is the one, of each partition's first to reach ``seq``, that ends soonest (the first partition found
        named another message, by the order of a set)."""
        held = [(tp, self._held[tp][stream]) for tp in self._streams.get(stream, ())]
        if any(seq <= m.dropped_seq for _, m in held):  # it may have been one of those dropped: not known any more
            return None
        found = [(hit[1], tp, hit[0]) for tp, m in held if (hit := m.offset_of(seq)) is not None]
        if not found:
            return None
        _, tp, offset = min(found, key=lambda f: f[0])
        return tp, offset

    def committable(self, tps: set[TP] | None = None) -> dict[TP, int]:
        """Per partition, the offset to commit: the oldest message still needed, else past the last one read."""
        out: dict[TP, int] = {}
        for tp, nxt in self._consumed.items():
            if tps is not None and tp not in tps:
                continue
            firsts = [f for m in self._held.get(tp, {}).values() if (f := m.first()) is not None]
            out[tp] = min(firsts, default=nxt)
        return out

    def read_past(self, committed: dict[TP, int], tps: set[TP]) -> dict[TP, int]:
        """Per partition of ``tps`` read from, the records read past ``committed`` (the offsets the broker has;
        where none was committed since the assignment, where reading began): what a crash now would read again."""
        out = {}
        for tp in tps:
            if (nxt := self._consumed.get(tp)) is not None:
                base = committed.get(tp, self._first.get(tp, nxt))
                out[tp] = max(0, nxt - base)
        return out

    def holding(self, stream: str) -> int:
        """Records read past the stream's oldest message still needed, over its partitions: what it alone keeps
        from being committed (a quiet stream's partial window holds its partition's commit until it is evicted)."""
        total = 0
        for tp in self._streams.get(stream, ()):
            if (first := self._held[tp][stream].first()) is not None:
                total += self._consumed.get(tp, first) - first
        return total

    def first_read(self, tp: TP) -> int | None:
        """The offset of the first record read from the partition since it was assigned (where it began)."""
        return self._first.get(tp)

    def forget(self, stream: str) -> None:
        """The stream is no longer held in memory (its state was snapshotted): nothing of it is needed."""
        for tp in self._streams.pop(stream, set()):
            self._held[tp].pop(stream, None)

    def streams_on(self, tps: set[TP]) -> set[str]:
        """Streams with data on any of the partitions."""
        return {s for tp in tps for s in self._held.get(tp, {})}

    def partitions_of(self, stream: str) -> set[TP]:
        return set(self._streams.get(stream, ()))

    def drop(self, tps: set[TP]) -> set[str]:
        """Forget partitions (revoked); returns the streams that had data on them."""
        streams: set[str] = set()
        for tp in tps:
            self._consumed.pop(tp, None)
            self._first.pop(tp, None)
            streams |= set(self._held.pop(tp, {}))
        for s in streams:
            self._streams[s] -= tps
            if not self._streams[s]:
                del self._streams[s]
        return streams
