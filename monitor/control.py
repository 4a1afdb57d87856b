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

from models.errors import ConfigError, TsmonError
from monitor.alerts import iso
from monitor.records import encodable

COMMANDS = ("recalibrate", "pin", "unpin", "freeze", "unfreeze", "silence", "unsilence", "reset-stream",
            "feedback", "history", "rollback", "shadow", "silences")
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_SILENCE_S = 30 * 86400.0  # the longest silence (tsmon ctl refuses a longer --for before sending it)
ACK_PART_BYTES = 512_000  # JSON per acknowledgement message: well under the producer's 1 MiB request limit
_FIELDS = ("command", "target", "params", "operator", "reason", "issued_at", "command_id")


class Refused(TsmonError):
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

    @property
    def issued_ms(self) -> int:
        """``issued_at`` in epoch ms (checked by :func:`verify`)."""
        return int(datetime.fromisoformat(self.issued_at).timestamp() * 1000)


def exact_target(stream: str) -> str:
    """The target that matches ``stream`` alone: its glob characters escaped (``pump[1]`` → ``pump[[]1]``, which
    ``tsmon ctl --exact`` sends, so every instance matches that one id)."""
    return re.sub(r"([*?[])", r"[\1]", stream)


def names_one(target: str) -> bool:
    """Does the fnmatch pattern name one stream id — no wildcard left once the escaped characters (``[*]``,
    ``[?]``, ``[[]``: :func:`exact_target`) are taken out?"""
    return not any(c in re.sub(r"\[[*?[]\]", "", target) for c in "*?[")


def named_stream(target: str) -> str | None:
    """The stream id a target names alone (:func:`names_one`; ``--exact``'s escapes ``[*]`` undone), or None for a
    glob."""
    return re.sub(r"\[([*?[])\]", r"\1", target) if names_one(target) else None


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
        at = datetime.fromisoformat(cmd.issued_at)
    except ValueError:
        raise Refused(f"issued_at is not an ISO time: {cmd.issued_at[:40]!r}") from None
    if at.tzinfo is None:  # read in each host's own time zone, instances of one group disagreed on staleness
        raise Refused(f"issued_at has no UTC offset (end it with Z): {cmd.issued_at[:40]!r}")
    issued = at.timestamp()
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
    if not encodable(doc["command_id"]):  # it keys the acknowledgement: a lone surrogate stopped the daemon there
        raise Refused("command_id is not valid Unicode (a lone surrogate)")
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

    def discard(self, command_id: str) -> None:
        self._ids.pop(command_id, None)

    def ids(self, max_bytes: int | None = None) -> list[str]:
        """The ids, oldest first; with ``max_bytes``, the newest that fit in it as JSON (persisted: the daemon-wide
        document holds them, and 10 000 ids of 128 characters, 1.3 MB, were over the producer's 1 MB message limit —
        dropped as undeliverable at every command, the applied ids and ``freeze --all`` no longer persisted).
        The newest thousands of ids span more than ``control.max_age_s``, past which a replay is refused anyway."""
        if max_bytes is None:
            return list(self._ids)
        kept: list[str] = []
        for command_id in reversed(self._ids):
            max_bytes -= len(json.dumps(command_id)) + 2
            if max_bytes < 0:
                break
            kept.append(command_id)
        return kept[::-1]


def ack(cmd: Command | None, raw_id: Any, status: str, instance: str, error: str | None = None,
        streams: list[str] | None = None, effects: list[dict[str, Any]] | None = None,
        result: dict[str, Any] | None = None) -> dict[str, Any]:
    """The acknowledgement, which is also the audit record."""
    about = cmd.describe() if cmd else {"command_id": raw_id if isinstance(raw_id, str) else None}
    return {"type": "ack", **about, "status": status, "error": error, "instance": instance,
            "streams": streams or [], "effects": effects or [], "result": result or {}, "at": now_iso()}


def split_ack(doc: dict[str, Any], limit: int | None = None) -> list[dict[str, Any]]:
    """The acknowledgement in parts of about ``limit`` bytes of JSON at most (one part if it fits): a command
    on thousands of streams makes an ack over the producer's 1 MiB request limit, which was dropped as
    undeliverable — the command applied, unaudited, and ``tsmon ctl`` said no daemon answered. ``streams``,
    ``effects`` and each list or dict in ``result`` are shared out; every part carries the rest, with
    ``part`` and ``parts``. :func:`merge_acks` puts them back together."""
    limit = ACK_PART_BYTES if limit is None else limit
    if len(json.dumps(doc)) <= limit:
        return [doc]
    items: list[tuple[tuple[str, ...], Any]] = [(("streams",), s) for s in doc["streams"]]
    items += [(("effects",), e) for e in doc["effects"]]
    scalars: dict[str, Any] = {}
    for key, value in doc["result"].items():
        if isinstance(value, dict) and value:
            items += [(("result", key, str(k)), v) for k, v in value.items()]
        elif isinstance(value, list) and value:
            items += [(("result", key), v) for v in value]
        else:
            scalars[key] = value
    if not items:  # nothing to share out: sent whole, and given up as undeliverable if the broker refuses it
        return [doc]
    base = {**doc, "streams": [], "effects": [], "result": dict(scalars)}
    room = max(1, limit - len(json.dumps(base)) - 64)
    parts: list[dict[str, Any]] = []
    size = room + 1
    for path, value in items:
        n = len(json.dumps(value)) + len(path[-1]) + 8
        if size + n > room:  # a new part (an item larger than a part goes alone)
            parts.append({**base, "streams": [], "effects": [], "result": dict(scalars)})
            size = 0
        size += n
        part = parts[-1]
        if path[0] != "result":
            part[path[0]].append(value)
        elif len(path) == 3:
            part["result"].setdefault(path[1], {})[path[2]] = value
        else:
            part["result"].setdefault(path[1], []).append(value)
    return [{**part, "part": i + 1, "parts": len(parts)} for i, part in enumerate(parts)]


def merge_acks(acks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Acknowledgements with the parts of each instance's (:func:`split_ack`) put back into one, in part
    order whatever the order they came in; it says ``parts_missing`` if some did not arrive."""
    groups: dict[tuple[Any, Any], dict[Any, dict[str, Any]]] = {}
    out: list[dict[str, Any] | tuple[Any, Any]] = []
    for a in acks:
        if not isinstance(a.get("parts"), int):
            out.append(a)
            continue
        key = (a.get("instance"), a.get("command_id"))
        if key not in groups:
            groups[key] = {}
            out.append(key)
        groups[key].setdefault(a.get("part"), a)  # a re-sent part counts once
    return [x if isinstance(x, dict) else _joined(list(groups[x].values())) for x in out]


def _joined(parts: list[dict[str, Any]]) -> dict[str, Any]:
    parts = sorted(parts, key=lambda a: a["part"] if isinstance(a.get("part"), int) else 0)
    m: dict[str, Any] = {k: v for k, v in parts[0].items() if k not in ("part", "parts")}
    m.update(streams=[], effects=[], result={})
    for a in parts:
        m["streams"] += a["streams"]
        m["effects"] += a["effects"]
        for k, v in a["result"].items():
            if isinstance(v, dict):
                m["result"].setdefault(k, {}).update(v)
            elif isinstance(v, list):
                m["result"].setdefault(k, []).extend(v)
            else:
                m["result"][k] = v
    if (missing := parts[0]["parts"] - len(parts)) > 0:
        m["parts_missing"] = missing
    return m


Handler = Callable[[Command], tuple[list[str], list[dict[str, Any]], dict[str, Any]]]
