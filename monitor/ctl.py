"""The operator's side of the control plane: send a signed command, collect the daemons' acknowledgements.

Owns the client protocol of ``tsmon ctl``: the audit topic is positioned at its end *before* the command
is sent, the command goes to the control topic, and acknowledgements carrying its ``command_id`` are
collected for ``settle_s`` after the first one (other instances answer too), and on until every partition of
the input topics the acks name has been answered for (each ack names the partitions its instance held) and
every ack is whole, or ``timeout_s``. The topics' partitions come from a metadata request on a thread and a
client of their own (kafka-python waits for metadata without a time limit; ctl answers at ``timeout_s``);
while they are not known, or for acks of daemons that do not name their partitions, the settle rule alone.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.errors import BrokerError, ConfigError, TsmonError, describe
from monitor import logs
from monitor.config import Config
from monitor.control import MAX_SILENCE_S, merge_acks, named_stream, new_command
from monitor.reach import wait_for_brokers
from monitor.topics import ensure_topics, partition_reader, require_inputs, within

log = logs.get("tsmon.ctl")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class CommandFailed(TsmonError):
    """No daemon applied the command (none answered, it was refused, or no stream matched)."""


def duration_s(text: str) -> float:
    """``"90s"``, ``"30m"``, ``"2h"``, ``"1d"`` or plain seconds → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ConfigError(f"--for: expected a duration like 90s, 30m, 2h or 1d, got {text!r}")
    if float(m.group(1)) <= 0:  # the format's message for "0" did not say what was wrong with it (an on-call pass)
        raise ConfigError(f"--for: must be longer than 0, got {text.strip()!r}")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds > MAX_SILENCE_S:  # what every daemon refuses: said here, nothing sent (it was sent, then "failed")
        raise ConfigError(f"--for: at most 30d, got {text.strip()!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class Answers:
    acks: list[dict[str, Any]]  # parts joined
    unanswered: list[str] | None  # "topic:partition" no ack answered for; None: not known (an ack says none)


def send(cfg: Config, command: str, target: str, params: dict[str, Any], operator: str, reason: str,
         timeout_s: float = 10.0, settle_s: float = 1.0) -> Answers:
    """Send one command and return the acknowledgements that arrived (possibly none)."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    c = cfg.control
    if c.key is None:
        raise ConfigError("control.key is not set: give the daemons' key in TSMON_CONTROL__KEY or [control] key")
    doc = new_command(command, target, params, operator, reason, c.key.get_secret_value())
    wait_for_brokers(cfg.kafka, timeout_s, "give --bootstrap-servers or --config")  # named, within --timeout
    client = within(cfg.kafka.client_kwargs(), timeout_s)  # a hung broker: said at --timeout, not after 32 s
    _require_control_topics(cfg, client)
    topics = Topics(client)
    # positioned before sending: the acknowledgement cannot come earlier than this
    audit, _ = partition_reader(client, c.audit_topic, at_end=True, timeout_s=timeout_s)
    try:
        producer = KafkaProducer(**{**within(cfg.kafka.producer_kwargs(), timeout_s), "max_block_ms": int(timeout_s * 1000)})
        body = json.dumps(doc).encode()
        try:
            producer.send(c.topic, key=doc["command_id"].encode(), value=body).get(timeout_s)
        finally:
            producer.close(timeout_s)
        return _collect(audit, doc["command_id"], timeout_s, settle_s, lambda: topics.partitions,
                        hashlib.sha256(body).hexdigest())
    except KafkaError as exc:
        raise BrokerError(f"cannot send the command: {describe(exc)}") from None
    finally:
        audit.close()


def _require_control_topics(cfg: Config, client: dict[str, Any]) -> None:
    """Both topics must exist (every daemon creates them at its start): a misspelt one was created by the send and
    the reader, and ctl waited out --timeout for an acknowledgement, naming no topic (an operator pass)."""
    servers = client["bootstrap_servers"]
    existing = ensure_topics(servers, {}, **{k: v for k, v in client.items() if k != "bootstrap_servers"})
    for setting, topic in (("control.topic", cfg.control.topic), ("control.audit_topic", cfg.control.audit_topic)):
        require_inputs([topic], existing, ",".join(servers), setting,
                       why="every daemon creates it at its start: is one running with this configuration?")


class Topics:
    """Every topic's partitions, asked for at once on a thread and a client of its own: kafka-python waits for
    metadata without a time limit, which in ctl's loop blocked it past ``--timeout`` with the broker away."""

    def __init__(self, client: dict[str, Any]) -> None:
        self.partitions: dict[str, set[int]] | None = None  # None until known
        threading.Thread(target=self._fetch, args=(client,), name="ctl-metadata", daemon=True).start()

    def _fetch(self, client: dict[str, Any]) -> None:
        from kafka import KafkaConsumer

        try:
            consumer = KafkaConsumer(**client, group_id=None, enable_auto_commit=False)
            try:
                self.partitions = {t: set(consumer.partitions_for_topic(t) or ()) for t in consumer.topics()}
            finally:
                consumer.close()
        except Exception as exc:  # noqa: BLE001 — without it ctl falls back to the settle rule
            log.info("ctl_metadata_unavailable", error=describe(exc))


def _collect(audit: Any, command_id: str, timeout_s: float, settle_s: float,
             partitions: Callable[[], dict[str, set[int]] | None] = lambda: None, sent: str | None = None) -> Answers:
    """Acks of ``command_id`` for ``settle_s`` after the first one, and on until every input partition the acks
    name is answered for (``partitions()``: each topic's, None while not known) and every ack is whole, or
    ``timeout_s``. A refusal of another message than the one sent (its ``received_sha256`` is not ``sent``'s: a
    message claiming the command's id, which anyone who can write to the control topic can send) is left out."""
    parts: list[dict[str, Any]] = []
    acks: list[dict[str, Any]] = []
    t0, first = time.monotonic(), None
    while time.monotonic() - t0 < timeout_s:
        got = [a for records in audit.poll(timeout_ms=100).values() for a in _acks_of(records, command_id)
               if sent is None or a.get("received_sha256") in (None, sent)]
        if got:
            parts += got
            first = first or time.monotonic()
            acks = merge_acks(parts)
        if first is None or time.monotonic() - first < settle_s or any(a.get("parts_missing") for a in acks):
            continue
        if not (left := unanswered(acks, partitions())):  # all answered for, or not known
            return Answers(acks, left)
    return Answers(acks, unanswered(acks, partitions()))


def _acks_of(records: list[Any], command_id: str) -> list[dict[str, Any]]:
    out = []
    for r in records:
        try:
            a = json.loads(r.value)
        except (ValueError, TypeError):
            continue
        if isinstance(a, dict) and a.get("command_id") == command_id:
            out.append(a)
    return out


def unanswered(acks: list[dict[str, Any]], partitions: dict[str, set[int]] | None) -> list[str] | None:
    """The partitions of the input topics the acks name that no ack answered for (``topic:partition``), or None
    when that is not known: the topics' partitions not known yet, or some ack does not name its partitions (a
    daemon of an earlier version). With a topic pattern only the topics some instance holds are named."""
    if partitions is None or not acks or not all(isinstance(a.get("inputs"), dict) for a in acks):
        return None
    held = {(t, p) for a in acks for t, ps in a["inputs"].items() if isinstance(ps, list) for p in ps}
    want = {(t, p) for t in {t for a in acks for t in a["inputs"]} for p in partitions.get(t, ())}
    return [f"{t}:{p}" for t, p in sorted(want - held)]


def verdict(command: str, target: str, acks: list[dict[str, Any]], timeout_s: float,
            missing: list[str] | None = None) -> None:
    """Raise :class:`CommandFailed` unless some daemon applied the command to something, none refused it
    (each instance of a group owns other streams: one that rejected it — a skewed clock, another key — left
    its streams as they were) and every input partition was answered for."""
    shown = named_stream(target) or target  # the id given with --exact, not its escaped glob ('pump[[]1]')
    if not acks:
        raise CommandFailed(f"no daemon acknowledged {command} within {timeout_s:g} s (is one running, "
                            f"reading the control topic, with the same key? a daemon acknowledges 10 refusals a "
                            f"minute: see its command_rejected log lines)")
    applied = [a for a in acks if a["status"] in ("applied", "duplicate")]
    if not applied:
        a = acks[0]
        raise CommandFailed(f"{command} {a['status']} by {a['instance']}: {a['error']}")
    cut = [a for a in acks if a.get("parts_missing")]
    if cut:
        raise CommandFailed(f"{command}: the acknowledgement of {cut[0]['instance']} came in part "
                            f"({cut[0]['parts_missing']} part(s) missing): read {cut[0]['command_id']} on the audit topic")
    if missing:  # input partitions no ack answered for (:func:`unanswered`)
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CommandFailed(f"{command} applied only in part: no daemon answered for input partition(s) "
                            f"{', '.join(missing[:5])}{more} within {timeout_s:g} s (the instance holding them "
                            f"is slow, restoring or gone, or the group is rebalancing): their streams may be "
                            f"unchanged; check `tsmon status` and send the command again")
    refused = [a for a in acks if a["status"] not in ("applied", "duplicate")]
    if refused:
        by = "; ".join(f"{a['status']} by {a['instance']}: {a['error']}" for a in refused)
        did = [a["instance"] for a in applied if a["streams"] or a["status"] == "duplicate"]
        if not did:  # the others hold no stream it names: "applied only in part (by …)" read as a partial success
            raise CommandFailed(f"{command} {by}")
        raise CommandFailed(f"{command} applied only in part (by {', '.join(did)}); {by}")
    asleep = sorted({s for a in applied for s in (a.get("result") or {}).get("not_woken", ())})
    if asleep:
        raise CommandFailed(f"{command} applied only in part: {len(asleep)} idle stream(s) not woken, "
                            f"limits.max_streams nearly reached: {', '.join(asleep[:5])}")
    unsure = sorted({s for a in applied for s in (a.get("result") or {}).get("provisional", ())})
    if unsure:  # their instance's restore did not read the changelog to its end: a change would be lost at the next
        rule = next((r["pattern"] for a in applied if (r := a["result"].get("standing"))), None)
        did = "applied only in part" if rule is not None or any(a["streams"] for a in applied) else "not applied"
        kept = "" if rule is None else (f"; its standing silence of {rule!r} runs (new streams matching it start "
                                        f"silenced, and sending the silence again replaces it)")
        raise CommandFailed(f"{command} {did}: {len(unsure)} stream(s) left unchanged, provisional (their instance "
                            f"did not read the changelog to its end within state.restore_timeout_s, so a change "
                            f"would be lost at its next restore; send it again once it has restored, e.g. after "
                            f"restarting it): {', '.join(unsure[:5])}{kept}")
    if command in ("freeze", "unfreeze") and target == "*" or command == "silences":
        return  # daemon-wide, whether or not a stream exists yet (a list of no silences is an answer too)
    key = {"feedback": "verdict", "history": "history", "shadow": "shadow"}.get(command)
    if key is not None:
        matched = any(a["result"].get(key) for a in applied)
    else:  # a recalibration the drift guard refused still matched its stream (it fails below); a silence kept for
        # the streams that start while it runs, or one of those lifted, is applied
        matched = any(a["streams"] or a["result"].get("refused") or a["result"].get("unchanged")
                      or a["result"].get("held") or a["result"].get("standing") or a["result"].get("lifted")
                      or a["result"].get("asleep_passed")
                      for a in applied)
    covered = sorted({p for a in applied for p in a["result"].get("still_covered_by", ())})
    if covered and not any(a["streams"] or a["result"].get("held") for a in applied):  # not started anywhere: its
        # own rule lifted or not, a broader one silences it when it starts (exit 0 read as done: an operator pass)
        raise CommandFailed(f"{command}: no daemon has a stream matching {shown!r} and the standing silence of "
                            f"{covered[0]!r} will silence it when it starts: unsilence {covered[0]!r} to lift it")
    if not matched:
        if command == "feedback":  # its target is '*': the alert id is what was looked for
            alert = (applied[0].get("params") or {}).get("alert_id")
            raise CommandFailed(f"feedback: no daemon has a recent alert {alert!r} (each stream keeps its last "
                                f"alerts only)")
        refused = next((r for a in applied if (r := a["result"].get("standing_refused"))), None)
        kept = sorted({p for a in applied for p in a["result"].get("not_lifted", ())})
        hint = f" (not kept as a standing silence either: {refused})" if refused else \
            f" (the standing silence of {kept[0]!r} was not lifted: unsilence {kept[0]!r})" if kept else ""
        raise CommandFailed(f"{command}: no daemon has a stream matching {shown!r}{hint}")
    refusals = sorted((s, why) for a in applied for s, why in (a["result"].get("refused") or {}).items())
    if refusals:  # the drift guard (or too little evidence) kept these thresholds: a script must not read success
        stream, why = refusals[0]
        more = f" and {len(refusals) - 1} more stream(s)" if len(refusals) > 1 else ""
        done = "applied only in part: refused" if any(a["streams"] for a in applied) else "refused"
        raise CommandFailed(f"{command} {done} for {stream}{more}: {why}")
