"""What waits for the next commit before it may be sent: state documents, then operators' acknowledgements.

Owns the order the at-least-once contract needs after the alerts (:meth:`monitor.processor.Processor.commit`): a
stream's document says its alerts were published, so it goes only once they are acknowledged; an acknowledgement
says a command's change is on the changelog, so it goes only once the documents are. And what a revoke whose
commit failed must never send: the documents of streams only on the revoked partitions (their next owner continues
from the ones that went with the last commit), and the acknowledgements of commands whose change was in them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from monitor.sink import OutMessage, Sink
from monitor.source import TP

STATE_HEADER = ("tsmon.type", b"stream_state")  # a stream's state document (not the daemon-wide one, a tombstone)


@dataclass
class Outbox:
    # the latest document (a tombstone: value None) by changelog key, and the input partitions its stream came from
    documents: dict[str, OutMessage] = field(default_factory=dict)
    homes: dict[str, frozenset[TP]] = field(default_factory=dict)
    # acknowledgements: (message, streams the command changed, command id)
    acks: list[tuple[OutMessage, frozenset[str], str]] = field(default_factory=list)
    handed: dict[str, frozenset[TP]] = field(default_factory=dict)  # documents sent, not acknowledged yet: homes

    def document(self, key: str, msg: OutMessage, home: frozenset[TP] = frozenset(), last: bool = False) -> None:
        """Keep ``msg`` as ``key``'s document to send (the latest per key, in the place of the one it replaces);
        ``last``: after every other one (the daemon-wide document, which records the commands those carry)."""
        if last:
            self.documents.pop(key, None)
        self.documents[key] = msg
        self.homes[key] = home

    def ack(self, msg: OutMessage, streams: frozenset[str], command_id: str) -> None:
        self.acks.append((msg, streams, command_id))

    def send_documents(self, sink: Sink) -> int:
        docs, homes, self.documents, self.homes = self.documents, self.homes, {}, {}
        for msg in docs.values():
            sink.send(msg)
        self.handed.update(homes)
        return len(docs)

    def delivered(self) -> None:
        """The sink acknowledged everything sent so far: the documents handed to it are on the changelog."""
        self.handed.clear()

    def send_acks(self, sink: Sink) -> None:
        acks, self.acks = self.acks, []
        for msg, _streams, _id in acks:
            sink.send(msg)

    def drop_revoked(self, tps: set[TP]) -> set[str]:
        """A revoke of ``tps`` whose commit failed: drop the documents of streams only on them, and the
        acknowledgements of commands that changed those streams; returns those commands' ids. Documents of streams
        whose partitions are unknown (earlier versions) or kept here still go."""
        queued = dict(self.homes)
        dropped = {key for key, home in queued.items() if home and home <= tps}
        for key in dropped:
            del self.documents[key], self.homes[key]
        # handed to the sink but not acknowledged: they may land after the next owner's, and lose to its epoch (a
        # key also queued is judged by the newer document's partitions: its stream may have been read on more since)
        unsure = dropped | {key for key, home in self.handed.items() if key not in queued and home and home <= tps}
        lost = {command_id for _msg, streams, command_id in self.acks if streams & unsure}
        self.acks = [a for a in self.acks if a[2] not in lost]  # a "duplicate" of one of them too
        return lost
