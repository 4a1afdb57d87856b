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


@dataclass
class Outbox:
    # the latest document (a tombstone: value None) by changelog key, and the input partitions its stream came from
    documents: dict[str, OutMessage] = field(default_factory=dict)
    homes: dict[str, frozenset[TP]] = field(default_factory=dict)
    # acknowledgements: (message, streams the command changed, command id)
    acks: list[tuple[OutMessage, frozenset[str], str]] = field(default_factory=list)

    def document(self, key: str, msg: OutMessage, home: frozenset[TP] = frozenset()) -> None:
        """Keep ``msg`` as ``key``'s document to send, after the ones kept before it (the latest per key)."""
        self.documents.pop(key, None)
        self.documents[key] = msg
        self.homes[key] = home

    def ack(self, msg: OutMessage, streams: frozenset[str], command_id: str) -> None:
        self.acks.append((msg, streams, command_id))

    def send_documents(self, sink: Sink) -> int:
        docs, self.documents, self.homes = self.documents, {}, {}
        for msg in docs.values():
            sink.send(msg)
        return len(docs)

    def send_acks(self, sink: Sink) -> None:
        acks, self.acks = self.acks, []
        for msg, _streams, _id in acks:
            sink.send(msg)

    def drop_revoked(self, tps: set[TP]) -> set[str]:
        """A revoke of ``tps`` whose commit failed: drop the documents of streams only on them, and the
        acknowledgements of commands that changed those streams; returns those commands' ids. Documents of streams
        whose partitions are unknown (earlier versions) or kept here still go."""
        dropped = {key for key, home in self.homes.items() if home and home <= tps}
        for key in dropped:
            del self.documents[key], self.homes[key]
        lost = {command_id for _msg, streams, command_id in self.acks if streams & dropped}
        self.acks = [a for a in self.acks if not a[1] & dropped]
        return lost
