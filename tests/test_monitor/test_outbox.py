"""The outbox's order and what a failed revoke keeps (unit; the processor's use of it is in test_control.py)."""

from __future__ import annotations

from monitor.controller import GLOBAL_KEY
from monitor.outbox import Outbox
from monitor.sink import OutMessage

TP0, TP1 = ("in", 0), ("in", 1)


def doc(key: str, n: int = 0) -> OutMessage:
    return OutMessage("state", key.encode(), b'{"n": %d}' % n)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[OutMessage] = []

    def send(self, msg: OutMessage) -> None:
        self.sent.append(msg)


def test_the_daemon_wide_document_goes_after_every_stream_document_it_covers() -> None:
    """It records the commands the stream documents carry: sent before one of them that then failed to land, a
    resent command was answered "duplicate" and its pin never applied (a mutation audit)."""
    box = Outbox()
    box.document(GLOBAL_KEY, doc(GLOBAL_KEY, 1), last=True)  # a first command
    box.document("dev-a", doc("dev-a"), frozenset({TP0}))
    box.document("dev-b", doc("dev-b"), frozenset({TP1}))
    box.document(GLOBAL_KEY, doc(GLOBAL_KEY, 2), last=True)  # a second one, covering dev-b's document
    box.document("dev-a", doc("dev-a", 1), frozenset({TP0}))  # replaced in place: not moved after the global one
    sink = Recorder()
    assert box.send_documents(sink) == 3  # type: ignore[arg-type]
    assert [m.key for m in sink.sent] == [b"dev-a", b"dev-b", GLOBAL_KEY.encode()]
    assert sink.sent[0].value == b'{"n": 1}' and sink.sent[2].value == b'{"n": 2}'


def test_a_failed_revoke_keeps_documents_of_no_known_partition() -> None:
    """Only documents of streams whose partitions are all revoked are dropped: the daemon-wide one (command ids, a
    freeze of all) and a stream document from before partitions were recorded still go, and so do the acks of
    commands on streams that stay (a mutation audit: dropping them lost an "applied" change at the next restart)."""
    box = Outbox()
    box.document("dev-a", doc("dev-a"), frozenset({TP0}))
    box.document("dev-b", doc("dev-b"), frozenset({TP0, TP1}))
    box.document("dev-old", doc("dev-old"))  # an earlier version's: no partition known
    box.document(GLOBAL_KEY, doc(GLOBAL_KEY), last=True)
    box.ack(doc("ack-1"), frozenset({"dev-a"}), "c1")
    box.ack(doc("ack-2"), frozenset({"dev-b"}), "c2")
    box.ack(doc("ack-3"), frozenset(), "c3")  # a freeze of all
    assert box.drop_revoked({TP0}) == {"c1"}
    assert list(box.documents) == ["dev-b", "dev-old", GLOBAL_KEY]
    assert [cid for _m, _s, cid in box.acks] == ["c2", "c3"]
