"""The control plane: operators' signed commands, applied once, acknowledged and audited.

Owns the command format and its security. A command is a JSON object::

    {"command": "pin", "target": "ecg-*", "params": {"threshold": 0.3}, "operator": "alice",
     "reason": "noisy lead", "issued_at": "2026-11-23T10:00:00.000Z", "command_id": "…", "signature": "…"}

``signature`` is the hex HMAC-SHA256, under the shared key, of the canonical JSON of every other field
(sorted keys, no spaces). The daemon refuses — logs, acknowledges and audits, never applies — a command
that is unsigned or badly signed, malformed, issued more than ``max_age_s`` ago (or ahead), or arrives
while no key is configured; a ``command_id`` already applied is acknowledged as ``duplicate`` and not
applied again. ``target`` is a glob on stream ids (``*`` = all). Each daemon instance applies a command
to the streams it owns and publishes one acknowledgement to the audit topic: who, what, why, status,
and per stream the state before → after. ``tsmon ctl`` waits for these.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from models.errors import ConfigError
from monitor.alerts import iso

COMMANDS = ("recalibrate", "pin", "unpin", "freeze", "unfreeze", "silence", "unsilence", "reset-stream",
            "feedback", "history", "rollback", "shadow")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("command", "target", "params", "operator", "reason", "issued_at", "command_id")


class Refused(Exception):
    """A command that must not be applied; the message is the reason given in its acknowledgement."""


@dataclass(frozen=True, slots=True)
class Command:
    command: str
    target: str
    params: dict[str, Any]
    operator: str
    reason: str
    issued_at: str
    command_id: str

    def describe(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _FIELDS}


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes that are signed: every field but the signature, sorted, compact."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def signature(doc: dict[str, Any], key: str) -> str:
    return hmac.new(key.encode(), canonical(doc), hashlib.sha256).hexdigest()


def now_iso() -> str:
    return iso(int(time.time() * 1000))


def new_command(command: str, target: str, params: dict[str, Any], operator: str, reason: str,
                key: str) -> dict[str, Any]:
    """A signed command document (what ``tsmon ctl`` sends)."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
    doc = {"command": command, "target": target, "params": params, "operator": operator, "reason": reason,
           "issued_at": now_iso(), "command_id": uuid.uuid4().hex}
    return {**doc, "signature": signature(doc, key)}


def verify(raw: bytes | None, key: str | None, max_age_s: float, now_s: float) -> Command:
    """Parse and authenticate one control message; raises :class:`Refused` with the reason."""
    if key is None:
        raise Refused("no control key configured on this daemon (control.key / TSMON_CONTROL__KEY)")
    try:
        doc = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Refused("not a JSON document") from None
    if not isinstance(doc, dict):
        raise Refused("not a JSON object")
    sig = doc.get("signature")
    if not isinstance(sig, str) or not sig:
        raise Refused("unsigned command")
    if not _HEX64.fullmatch(sig):
        raise Refused("bad signature")
    try:
        expected = signature(doc, key)
    except (TypeError, ValueError, RecursionError):
        raise Refused("command cannot be canonicalised") from None
    if not hmac.compare_digest(sig, expected):
        raise Refused("bad signature")
    cmd = _command(doc)
    try:
        issued = datetime.fromisoformat(cmd.issued_at).timestamp()
    except ValueError:
        raise Refused(f"issued_at is not an ISO time: {cmd.issued_at[:40]!r}") from None
    if not math.isfinite(issued) or abs(now_s - issued) > max_age_s:
        raise Refused(f"stale command: issued {now_s - issued:.0f} s ago (limit {max_age_s:g} s)")
    return cmd


def _command(doc: dict[str, Any]) -> Command:
    missing = [k for k in _FIELDS if k not in doc]
    if missing:
        raise Refused(f"missing field(s): {', '.join(missing)}")
    types = {"params": dict, "command": str, "target": str, "operator": str, "reason": str, "issued_at": str,
             "command_id": str}
    wrong = [k for k, t in types.items() if not isinstance(doc[k], t)]
    if wrong:
        raise Refused(f"wrong type for: {', '.join(wrong)}")
    if doc["command"] not in COMMANDS:
        raise Refused(f"unknown command {doc['command'][:40]!r}")
    if not doc["operator"].strip() or not doc["command_id"].strip() or len(doc["command_id"]) > 128:
        raise Refused("operator and command_id (at most 128 characters) must not be empty")
    return Command(**{k: doc[k] for k in _FIELDS})


class Seen:
    """Command ids already applied, the newest ``size`` of them (persisted with the daemon's state)."""

    def __init__(self, size: int, ids: list[str] | None = None) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict((i, None) for i in (ids or [])[-size:])

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._ids

    def add(self, command_id: str) -> None:
        self._ids[command_id] = None
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def ids(self) -> list[str]:
        return list(self._ids)


def ack(cmd: Command | None, raw_id: Any, status: str, instance: str, error: str | None = None,
        streams: list[str] | None = None, effects: list[dict[str, Any]] | None = None,
        result: dict[str, Any] | None = None) -> dict[str, Any]:
    """The acknowledgement, which is also the audit record."""
    about = cmd.describe() if cmd else {"command_id": raw_id if isinstance(raw_id, str) else None}
    return {"type": "ack", **about, "status": status, "error": error, "instance": instance,
            "streams": streams or [], "effects": effects or [], "result": result or {}, "at": now_iso()}


Handler = Callable[[Command], tuple[list[str], list[dict[str, Any]], dict[str, Any]]]
