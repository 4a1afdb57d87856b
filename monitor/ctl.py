"""The operator's side of the control plane: send a signed command, collect the daemons' acknowledgements.

Owns the client protocol of ``tsmon ctl``: the audit topic is positioned at its end *before* the command
is sent, the command goes to the control topic, and acknowledgements carrying its ``command_id`` are
collected until ``timeout_s``, or ``settle_s`` after the first one (other instances answer too).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from models.errors import BrokerError, ConfigError, TsmonError
from monitor.config import Config
from monitor.control import merge_acks, new_command
from monitor.topics import partition_reader

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class CommandFailed(TsmonError):
    """No daemon applied the command (none answered, it was refused, or no stream matched)."""


def duration_s(text: str) -> float:
    """``"90s"``, ``"30m"``, ``"2h"``, ``"1d"`` or plain seconds → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--for: expected a duration like 90s, 30m, 2h or 1d, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def send(cfg: Config, command: str, target: str, params: dict[str, Any], operator: str, reason: str,
         timeout_s: float = 10.0, settle_s: float = 1.0) -> list[dict[str, Any]]:
    """Send one command and return the acknowledgements that arrived (possibly none)."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    c = cfg.control
    if c.key is None:
        raise ConfigError("control.key is not set: give the daemons' key in TSMON_CONTROL__KEY or [control] key")
    doc = new_command(command, target, params, operator, reason, c.key.get_secret_value())
    # positioned before sending: the acknowledgement cannot come earlier than this
    audit, _ = partition_reader(cfg.kafka.client_kwargs(), c.audit_topic, at_end=True)
    try:
        producer = KafkaProducer(**cfg.kafka.producer_kwargs())
        try:
            producer.send(c.topic, key=doc["command_id"].encode(), value=json.dumps(doc).encode()).get(timeout_s)
        finally:
            producer.close(timeout_s)
        return _collect(audit, doc["command_id"], timeout_s, settle_s)
    except KafkaError as exc:
        raise BrokerError(f"cannot send the command: {type(exc).__name__}: {exc}") from None
    finally:
        audit.close()


def _collect(audit: Any, command_id: str, timeout_s: float, settle_s: float) -> list[dict[str, Any]]:
    acks: list[dict[str, Any]] = []
    t0, first = time.monotonic(), None
    while time.monotonic() - t0 < timeout_s and (first is None or time.monotonic() - first < settle_s):
        for records in audit.poll(timeout_ms=100).values():
            for r in records:
                try:
                    a = json.loads(r.value)
                except (ValueError, TypeError):
                    continue
                if isinstance(a, dict) and a.get("command_id") == command_id:
                    acks.append(a)
                    first = first or time.monotonic()
    return merge_acks(acks)


def verdict(command: str, target: str, acks: list[dict[str, Any]], timeout_s: float) -> None:
    """Raise :class:`CommandFailed` unless some daemon applied the command to something and none refused it
    (each instance of a group owns other streams: one that rejected it — a skewed clock, another key — left
    its streams as they were)."""
    if not acks:
        raise CommandFailed(f"no daemon acknowledged {command} within {timeout_s:g} s (is one running, "
                            f"reading the control topic, with the same key?)")
    applied = [a for a in acks if a["status"] in ("applied", "duplicate")]
    if not applied:
        a = acks[0]
        raise CommandFailed(f"{command} {a['status']} by {a['instance']}: {a['error']}")
    cut = [a for a in acks if a.get("parts_missing")]
    if cut:
        raise CommandFailed(f"{command}: the acknowledgement of {cut[0]['instance']} came in part "
                            f"({cut[0]['parts_missing']} part(s) missing): read {cut[0]['command_id']} on the audit topic")
    refused = [a for a in acks if a["status"] not in ("applied", "duplicate")]
    if refused:
        by = "; ".join(f"{a['status']} by {a['instance']}: {a['error']}" for a in refused)
        raise CommandFailed(f"{command} applied only in part (by {', '.join(a['instance'] for a in applied)}); "
                            f"{by}")
    asleep = sorted({s for a in applied for s in (a.get("result") or {}).get("not_woken", ())})
    if asleep:
        raise CommandFailed(f"{command} applied only in part: {len(asleep)} idle stream(s) not woken, "
                            f"limits.max_streams nearly reached: {', '.join(asleep[:5])}")
    if command in ("freeze", "unfreeze") and target == "*":
        return  # daemon-wide, whether or not a stream exists yet
    key = {"feedback": "verdict", "history": "history", "shadow": "shadow"}.get(command)
    if key is not None:
        matched = any(a["result"].get(key) for a in applied)
    else:  # a recalibration the drift guard refused still matched its stream
        matched = any(a["streams"] or a["result"].get("refused") or a["result"].get("unchanged") for a in applied)
    if not matched:
        what = "recent alert" if command == "feedback" else "stream"
        raise CommandFailed(f"{command}: no daemon has a {what} matching {target!r}")
