"""Applying operators' commands to this daemon's streams, and the consumer that brings them.

Owns what each command of :mod:`monitor.control` does. Runs on the daemon's loop thread (the only one
that touches stream state): the loop calls :meth:`Controller.poll` every ``control.poll_interval_ms``.
Each command is applied to the streams this instance owns whose id matches the target glob; every
stream it changed is snapshotted, and one acknowledgement (also the audit record) goes to the audit topic
through the same sink — both at the next commit, the acknowledgement after the documents are acknowledged
(:meth:`Processor.commit`), so an "applied" is never sent for a change the changelog does not have.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import numpy as np

from models.errors import describe
from monitor import logs
from monitor.alerts import AlertSettings, AlertState, Observation
from monitor.calibrator import MAX_QUANTILE
from monitor.control import (
    MAX_SILENCE_S,
    Command,
    Refused,
    Seen,
    ack,
    named_stream,
    names_one,
    split_ack,
    verify,
)
from monitor.drift import INSUFFICIENT
from monitor.processor import Processor
from monitor.records import encodable
from monitor.silences import MAX_PATTERN, MAX_RULES
from monitor.sink import json_message
from monitor.streams import doc_commands, doc_since_ms
from monitor.topics import partition_reader

log = logs.get("tsmon.control")
GLOBAL_KEY = "__tsmon__"  # changelog key of daemon-wide state (global freeze, applied ids); no stream may use it
GLOBAL_IDS_BYTES = 512 * 1024  # the applied ids it persists, at most (the producer's message limit is 1 MB)
Effects = tuple[list[str], list[dict[str, Any]], dict[str, Any]]


# commands that change the streams they name: applied once to each (its document keeps the command's id)
PER_STREAM = frozenset({"recalibrate", "pin", "unpin", "freeze", "unfreeze", "silence", "unsilence", "reset-stream",
                        "rollback"})
CLOCK_SKEW_MS = 30_000  # a stream started this soon after a command's issue (the operator's clock) still gets it
REJECTIONS_PER_MINUTE = 10  # refused messages logged and acknowledged a minute; the others are counted
# why an undo passes over a stream (listed in the acknowledgement's ``held``; ctl's table: ``skipped: …``)
NOT_PINNED, NOT_FROZEN, NOT_SILENCED = (f"not {what}: nothing to undo" for what in ("pinned", "frozen", "silenced"))


class Controller:
    def __init__(self, processor: Processor, key: str | None, audit_topic: str, instance: str,
                 max_age_s: float = 300.0, remember: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self.p, self.cal = processor, processor.calibrator
        self._key, self.audit_topic, self.instance = key, audit_topic, instance
        self.max_age_s, self.clock = max_age_s, clock
        self.seen = Seen(remember)
        # the group's daemon-wide state (freeze --all) is known: taken from the changelog, found absent from a
        # complete read of it, or set by an operator here; until then this instance writes none of its own
        self.global_known = False
        self.not_woken: set[str] = set()  # evicted streams the command in hand found no room to wake
        self.matched: set[str] = set()  # the streams the command in hand was for (each gets its id)
        self.provisional: set[str] = set()  # ... left alone: provisional, their documents lose to older ones
        # refusals logged and acknowledged: 1 000 unsigned messages wrote 1 000 warnings and audit records (per
        # instance); past the budget they are only counted (tsmon_commands_total{command="unknown"})
        self._rejections = logs.Throttle(burst=REJECTIONS_PER_MINUTE, period_s=60.0)
        self._duplicates = logs.Throttle(burst=1, period_s=max_age_s, max_events=remember)  # per command id
        # the input partitions held now ({topic: [partition, ...]}), in every ack: tsmon ctl waits until
        # each partition of the input topics has been answered for (None: not known, as in unit tests)
        self.inputs: Callable[[], dict[str, list[int]]] | None = None
        self._handlers: dict[str, Callable[[Command], Effects]] = {
            "recalibrate": self._recalibrate, "pin": self._pin, "unpin": self._unpin,
            "freeze": self._freeze, "unfreeze": self._freeze, "silence": self._silence, "unsilence": self._silence,
            "reset-stream": self._reset, "feedback": self._feedback, "history": self._history,
            "rollback": self._rollback, "shadow": self._shadow, "silences": self._silences}

    # one message ------------------------------------------------------------------------------------
    def handle(self, raw: bytes | None) -> dict[str, Any]:
        """Verify, apply once, acknowledge and audit one control message; never raises for bad input."""
        try:
            cmd = verify(raw, self._key, self.max_age_s, self.clock())
        except Refused as exc:
            doc = ack(None, _claimed(raw), "rejected", self.instance, error=str(exc))
            # what was read, so that tsmon ctl can tell a refusal of its own message from one of a message that
            # only claims its id (anyone who can write to the control topic can send those)
            doc["received_sha256"] = hashlib.sha256(raw or b"").hexdigest()
            if (extra := self._rejections("command_rejected")) is None:  # a flood, unsigned: counted, no more
                self.p.metrics.commands.labels("unknown", "rejected").inc()
                return doc
            log.warning("command_rejected", reason=str(exc), claimed=doc["command_id"], **extra)
            if extra:
                doc["result"] = {"rejected_unacknowledged_before": extra["suppressed"]}
            return self._publish(doc, "unknown")
        if self.p.failed is not None:  # a batch failed to score: nothing is saved from now on, the daemon stops
            return self._publish(ack(cmd, None, "failed", self.instance, error=f"not applied: {self.p.failed}"),
                                 cmd.command)
        if cmd.command_id in self.seen and not self._owed(cmd):
            doc = ack(cmd, None, "duplicate", self.instance)
            # once per command id: a signed command copied back onto the control topic (anyone who can write there,
            # for max_age_s) queued an acknowledgement a copy, unbounded while the sink stalled (2 000 copies: 1.9 MB);
            # each id's first is answered (after a rebalance it may be the only answer for its partitions: ctl waits)
            if (extra := self._duplicates(cmd.command_id)) is None:
                self.p.metrics.commands.labels(cmd.command, "duplicate").inc()
                return doc
            log.info("command_duplicate", command=cmd.command, command_id=cmd.command_id, **extra)
            return self._publish(doc, cmd.command)
        self.not_woken.clear()
        self.matched.clear()
        self.provisional.clear()
        try:
            streams, effects, result = self._handlers[cmd.command](cmd)
            if self.not_woken:
                result = {**result, "not_woken": sorted(self.not_woken)}
            if self.provisional:
                result = {**result, "provisional": sorted(self.provisional)}
        except Exception as exc:  # noqa: BLE001 — a signed but unusable command must never stop the loop
            error = str(exc) if isinstance(exc, Refused | ValueError) else f"bad params: {type(exc).__name__} {exc}"
            if self.p.failed is not None:  # the scoring it ran first (reset-stream) failed: not the params
                error = f"not applied: {self.p.failed}"
            log.warning("command_failed", command=cmd.command, command_id=cmd.command_id, error=error)
            return self._publish(ack(cmd, None, "failed", self.instance, error=error), cmd.command)
        self.seen.add(cmd.command_id)
        if cmd.command in PER_STREAM:  # those it passed over too (not pinned, held, refused): read again, an undo
            for stream in self.matched & self.p.streams.keys():  # of a stream pinned since unpinned it
                self.p.streams[stream].commands.append(cmd.command_id)
                self.p.streams[stream].dirty = True
        for stream in streams:
            self.p.save(stream)
        self.save_global()
        log.info("command_applied", command=cmd.command, target=cmd.target, operator=cmd.operator,
                 reason=cmd.reason, command_id=cmd.command_id, streams=len(streams))
        try:  # a log line must never cost the acknowledgement of a command already applied and saved
            self._log_threshold_changes(cmd, effects)
        except Exception as exc:  # noqa: BLE001
            log.error("threshold_change_log_failed", command_id=cmd.command_id, error=describe(exc)[:300])
        return self._publish(ack(cmd, None, "applied", self.instance, streams=streams, effects=effects,
                                 result=result), cmd.command)

    def _log_threshold_changes(self, cmd: Command, effects: list[dict[str, Any]]) -> None:
        """``threshold_changed`` for each threshold an operator's command changed, as for a scheduled one (README:
        every version is logged; a pin, unpin, rollback or recalibrate was only in ``command_applied``)."""
        for e in effects:
            before, after = e.get("before") or {}, e.get("after") or {}
            if "version" not in after or (before.get("version"), before.get("threshold")) == (after["version"],
                                                                                               after["threshold"]):
                continue
            try:  # by version: a scheduled run may have added one since (its thread does not wait for commands)
                reason = self.cal.reason_of(e["stream"], after["version"])
            except KeyError:  # gone since (reset-stream of a stream the command dropped): the effect says enough
                reason = ""
            log.info("threshold_changed", stream=e["stream"], old=_rounded(before.get("threshold")),
                     new=_rounded(after["threshold"]), source=after.get("source"), version=after["version"],
                     reason=reason, command=cmd.command, operator=cmd.operator, command_id=cmd.command_id)

    def _publish(self, doc: dict[str, Any], command: str) -> dict[str, Any]:
        if self.inputs is not None:
            doc = {**doc, "inputs": self.inputs()}
        for part in split_ack(doc):  # one message unless it is too large for one; sent at the next commit, after the
            # documents of the streams it changed: "applied" went out at once while the pinned document waited, and a
            # crash (or a batch that failed to score) lost the pin the operator had been told was applied
            msg = json_message(self.audit_topic, str(doc["command_id"]), part, [("tsmon.type", b"ack")])
            self.p.outbox.ack(msg, frozenset(doc.get("streams") or ()), str(doc["command_id"]))
        self.p.metrics.commands.labels(command, doc["status"]).inc()  # once queued (one that raised counts as error)
        return doc

    def forget(self, command_ids: set[str]) -> None:
        """Commands whose changes never reached the changelog (:attr:`Processor.unpersisted`): not applied as far as
        the group knows, so the same command sent again is applied, not a duplicate."""
        for command_id in command_ids:
            self.seen.discard(command_id)
        self.save_global()

    def save_global(self) -> None:
        topic = self.p.settings.state_topic
        if topic is not None and self.global_known:  # else its default frozen_all false hid the group's freeze
            doc = {"type": "daemon_state", "v": 1, "frozen_all": self.cal.frozen_all,
                   "silences": self.p.silences.doc(self.clock() * 1000), "command_ids": self.seen.ids(GLOBAL_IDS_BYTES)}
            # after the documents of the streams it records the command of
            self.p.outbox.document(GLOBAL_KEY, json_message(topic, GLOBAL_KEY, doc, [("tsmon.type", b"daemon_state")]),
                                   last=True)

    def restore_global(self, doc: dict[str, Any] | None, complete: bool) -> None:
        """Continue from the changelog's daemon-wide document; remembered ids are merged, never dropped.

        ``freeze --all`` is taken from it until the group's state is known (:attr:`global_known`) — the first read
        that finds it: at a later assignment this instance has applied every command itself, and the document may
        be older (another instance's that had not read the freeze yet, or its own whose write did not land),
        which silently lifted a freeze. A read cut short (``complete`` false) found a document, not necessarily the
        latest: its freeze is taken for now and the next read's replaces it (taken as known, an older document's
        ``frozen_all`` held for the life of the process and was written over the group's at the next command).
        A complete read with no usable document (none, or one this version cannot read) makes this instance's
        state the group's (left unknown, no command id was persisted again until a ``freeze --all``).
        """
        known = self.global_known
        self._restore_global(doc, complete)
        if not known and self.global_known and self.p.silences.rules:
            self.save_global()  # the rules (and lifts) of commands applied while it was unknown, merged: saved at
            # once (a review: only at the next command, and a crash before it lost them)

    def _restore_global(self, doc: dict[str, Any] | None, complete: bool) -> None:
        ids = None if doc is None else doc.get("command_ids")
        if doc is None or doc.get("type") != "daemon_state" or not isinstance(ids, list):
            if doc is not None:
                log.error("daemon_state_unreadable", keys=sorted(doc)[:10])
            self.global_known = self.global_known or complete
            return
        if not self.global_known:
            self.cal.frozen_all = doc.get("frozen_all") is True
            self.global_known = complete
        # absent from earlier versions' documents (input waits for the restore: no new stream started before it,
        # and one started after a restore cut short is provisional, which no rule silences)
        self.p.silences.merge(doc.get("silences"), self.clock() * 1000)
        for i in ids:
            if isinstance(i, str) and i not in self.seen:
                self.seen.add(i)

    # helpers ----------------------------------------------------------------------------------------
    def _owed(self, cmd: Command) -> bool:
        """A command this instance knows as applied (by itself, or by another instance of the group: the ids of
        the daemon-wide document) that a stream held here, or evicted here, has not had: its partition came here
        in a rebalance, restored from a document written before the command — at a restart during a command,
        6 of 10 streams were skipped as a "duplicate" and ctl exited 0."""
        if cmd.command not in PER_STREAM or (cmd.command in ("freeze", "unfreeze") and cmd.target == "*"):
            return False
        issued = cmd.issued_ms
        return any(self._lacks(cmd, n, st.commands, st.since_ms, issued) for n, st in self.p.streams.items()) or any(
            self._lacks(cmd, n, doc_commands(doc), doc_since_ms(doc), issued)
            for n, doc in self.p.evicted_docs().items())

    @staticmethod
    def _lacks(cmd: Command, stream: str, applied: Iterable[str], since_ms: int, issued_ms: int | None) -> bool:
        """Is ``stream`` one the command is for that has not had it? With ``issued_ms`` (a command read again, or
        applied elsewhere in the group), not a stream that started after the command was issued: read again after
        a restart, a silence of ``dev-*`` silenced a stream that began later. (Not at the first reading, and with
        ``CLOCK_SKEW_MS`` to spare: the streams' start times are this host's clock, the issue time the operator's.)"""
        return (fnmatch.fnmatchcase(stream, cmd.target) and cmd.command_id not in applied
                and (issued_ms is None or cmd.command not in PER_STREAM or since_ms <= issued_ms + CLOCK_SKEW_MS))

    def _targets(self, cmd: Command, wake: Callable[[dict[str, Any]], bool] = lambda doc: True,
                 changes_held: Callable[[str], bool] = lambda stream: True,
                 asleep: list[str] | None = None) -> list[str]:
        """The streams held that match, and those this instance evicted whose document ``wake`` accepts, woken
        from it: a command for ``dev-*`` must reach a stream that happened to be idle (a silence most of all).
        Not those it was applied to already (by an earlier owner of the stream, or before a restart).

        A provisional stream (started or woken while the changelog was not read to its end) is left alone by a command
        that would change it (``changes_held``: would it, for a stream held), and listed: its documents are written
        below the one it read, so the change is lost at the next restore (a pin acknowledged "applied" reverted).
        Daemon-wide ``freeze *`` / ``unfreeze *`` are not per stream. ``asleep`` collects the evicted streams that
        match but ``wake`` leaves asleep."""
        issued = self._issued(cmd)
        changes = (cmd.command in PER_STREAM or cmd.command == "feedback") and not (
            cmd.command in ("freeze", "unfreeze") and cmd.target == "*")
        for name, doc in sorted(self.p.evicted_docs().items()):
            if not self._lacks(cmd, name, doc_commands(doc), doc_since_ms(doc), issued):
                continue
            woken = wake(doc)
            if not woken and asleep is None:
                continue
            if changes and self.p.restore_incomplete and (name not in self.p.evicted_here  # it would wake provisional
                                                          or name in self.p.provisional_evicted):
                self.provisional.add(name)  # (left asleep: its document may be older than one the read missed)
            elif not woken and asleep is not None:
                asleep.append(name)
            elif not self.p.wake(name):
                self.not_woken.add(name)  # no room: the ack says so, and tsmon ctl fails
        names = [s for s, st in self.p.streams.items() if self._lacks(cmd, s, st.commands, st.since_ms, issued)]
        if changes:
            unsafe = {s for s in names if self.p.streams[s].provisional and changes_held(s)}
            self.provisional |= unsafe
            names = [s for s in names if s not in unsafe]
        self.matched.update(names)
        return names

    def _issued(self, cmd: Command) -> int | None:
        """The command's issue time when it was seen before (read again, or applied elsewhere), else None."""
        return cmd.issued_ms if cmd.command_id in self.seen else None

    def _view(self, stream: str) -> dict[str, Any]:
        th, st = self.cal.threshold(stream), self.p.streams[stream]
        return {"threshold": th.value, "source": th.source, "version": th.version, **self.cal.controls(stream),
                "silenced_until_ms": st.silenced_until_ms}

    def _each(self, cmd: Command, change: Callable[[str], None], idle: Callable[[str], str | None] | None = None,
              wake: Callable[[dict[str, Any]], bool] = lambda doc: True, asleep_why: str | None = None) -> Effects:
        """Apply ``change`` to every matching stream, recording before → after; an undo passes over the streams
        ``idle`` says it would not change (listed in ``held`` with why: "applied" to a stream never pinned read as
        done, and the audit recorded an effect; ``wake``: the documents of idle streams it would change, so that an
        undo wakes no stream it passes over, each held until evicted again, taking the room the one it needs; those are
        listed in ``held`` too, with ``asleep_why``: an unpin of an idle stream never pinned was "no match", exit 1)."""
        streams, effects, held, asleep = [], [], {}, []
        for stream in self._targets(cmd, wake, lambda s: idle is None or idle(s) is None, asleep):
            if idle is not None and (why := idle(stream)) is not None:
                held[stream] = why
                continue
            before = self._view(stream)
            change(stream)
            streams.append(stream)
            effects.append({"stream": stream, "before": before, "after": self._view(stream)})
        result: dict[str, Any] = {}
        if asleep_why is not None and asleep:  # by name for one stream; under a glob a count (thousands of idle
            if names_one(cmd.target):  # streams made as many table rows)
                held.update(dict.fromkeys(asleep, asleep_why))
            else:
                result["asleep_passed"] = {"count": len(asleep), "why": asleep_why}
        return streams, effects, {**result, **({"held": held} if held else {})}

    def _why(self, cmd: Command) -> str:
        return f"{cmd.command} by {cmd.operator}: {cmd.reason}".strip().rstrip(":")

    # commands ---------------------------------------------------------------------------------------
    def _recalibrate(self, cmd: Command) -> Effects:
        q = _quantile(cmd.params.get("quantile"))
        names = self._targets(cmd)
        before = {s: self._view(s) for s in names}
        refused: dict[str, str] = {}
        held: dict[str, str] = {}
        close: dict[str, str] = {}
        changed = self.cal.recalibrate(names, q, commanded=True, refused=refused, held=held, close=close)
        self.p.metrics.calibrations.labels("refused").inc(len(refused))  # the drift guard's
        self.p.metrics.calibrations.labels("commanded").inc(len(changed))
        if names_one(cmd.target):  # named: refused, with the reason (it was "unchanged", exit 0);
            refused, held = {**refused, **held}, {}  # under --all or a glob, skipped and listed — as is one with too
        else:  # few recent windows for the drift guard to judge a raise (it failed `recalibrate --all`, exit 1)
            held.update({s: refused.pop(s) for s in [s for s, why in refused.items() if why.startswith(INSUFFICIENT)]})
        effects = [{"stream": s, "before": before[s], "after": self._view(s)} for s in changed]
        unchanged = [s for s in names if s not in changed and s not in refused and s not in held]
        return list(changed), effects, {"refused": refused, "unchanged": unchanged, "held": held,
                                        "unchanged_because": {s: close[s] for s in unchanged if s in close}}

    def _pin(self, cmd: Command) -> Effects:
        value = float(cmd.params["threshold"])
        if not (math.isfinite(value) and value > 0):
            raise Refused(f"a pinned threshold must be finite and > 0, got {value}")
        return self._each(cmd, lambda s: self.cal.pin(s, value, self._why(cmd)))

    def _unpin(self, cmd: Command) -> Effects:
        return self._each(cmd, lambda s: self.cal.unpin(s, self._why(cmd)),
                          lambda s: None if self.cal.controls(s)["pinned"] else NOT_PINNED,
                          lambda doc: _field(doc, "calibrator", dict).get("pinned") is True, NOT_PINNED)

    def _freeze(self, cmd: Command) -> Effects:
        """``freeze *`` is daemon-wide (``frozen_all``, persisted): no per-stream flag is set, so none is left
        behind on streams it did not reach; ``unfreeze *`` lifts it and every per-stream freeze."""
        frozen = cmd.command == "freeze"
        if cmd.target != "*":
            if not frozen and self.cal.frozen_all:  # it would be acknowledged and change nothing
                raise Refused("calibration is frozen daemon-wide (freeze --all): unfreeze --all lifts it")
            # a repeat is passed over as an undo of nothing is (it was reported as a change, before = after)
            return self._each(cmd, lambda s: self.cal.set_frozen(s, frozen), (
                lambda s: "already frozen: nothing to do" if self.cal.controls(s)["frozen"] else None) if frozen else (
                lambda s: None if self.cal.controls(s)["frozen"] else NOT_FROZEN),
                lambda doc: frozen or _field(doc, "calibrator", dict).get("frozen") is True, None if frozen else NOT_FROZEN)
        streams = self._targets(cmd, lambda doc: not frozen and _field(doc, "calibrator", dict).get("frozen") is True)
        before = {s: self._view(s) for s in streams}
        self.cal.frozen_all = frozen
        self.global_known = True  # an operator's word: this is the group's state now
        if not frozen:
            for s in streams:
                self.cal.set_frozen(s, False)
        changed = [s for s in streams if self._view(s) != before[s]]  # a repeat changes none (it listed them all)
        return changed, [{"stream": s, "before": before[s], "after": self._view(s)} for s in changed], {}

    def _silence(self, cmd: Command) -> Effects:
        until = 0
        if cmd.command == "silence":
            seconds = float(cmd.params["for_s"])
            if not 0 < seconds <= MAX_SILENCE_S:
                raise Refused(f"for_s must be in (0, {MAX_SILENCE_S:.0f}], got {seconds}")
            until = int((self.clock() + seconds) * 1000)

        def change(stream: str) -> None:
            self.p.streams[stream].silenced_until_ms = until

        def not_silenced(stream: str) -> str | None:
            return None if self.p.streams[stream].silenced_until_ms > self.clock() * 1000 else NOT_SILENCED
        now_ms = self.clock() * 1000
        streams, effects, result = self._each(cmd, change, None if until else not_silenced, (
            lambda doc: True) if until else (
            lambda doc: isinstance(doc.get("silenced_until_ms"), int) and doc["silenced_until_ms"] > now_ms),
            None if until else NOT_SILENCED)
        # and the streams that start while it runs (an on-call pass: a silence of 'press-*' paged for press-10,
        # first seen during it, and one of a sensor not seen yet failed: no daemon had a stream matching it)
        rules = self.p.silences
        if until:  # the streams' end, but never past a for_s after the command was issued: read again (a stream
            # owed it), lifted (kept until then) or ended, it cannot come back running (a review: it ran again until
            # a for_s after the second reading)
            end = min(until, cmd.issued_ms + int(float(cmd.params["for_s"]) * 1000))
            if len(cmd.target) > MAX_PATTERN:
                result = {**result, "standing_refused": f"a pattern longer than {MAX_PATTERN} characters"}
            elif end > now_ms and (rule := rules.add(cmd.command_id, cmd.target, cmd.issued_ms, end, now_ms)) == "running":
                result = {**result, "standing": {"pattern": cmd.target, "until_ms": end}}
            elif end > now_ms and rule == "full":
                result = {**result, "standing_refused": f"{MAX_RULES} standing silences run that end later (the most "
                                                        f"kept): lift some with unsilence"}
            return streams, effects, result
        lifted, kept = rules.lift(cmd.target, now_ms)
        if lifted:
            result = {**result, "lifted": lifted}
        name = named_stream(cmd.target)
        if name is None:
            if kept:  # a rule broader than the glob still silences the new streams it matches
                result = {**result, "not_lifted": kept}
        elif name not in self.p.streams:  # (of one stream id, a rule matters only if it has not started)
            if name in self.p.evicted_docs():  # known here: no rule silences it (a review: another instance, which
                if not (self.not_woken or self.provisional):  # knew no such stream, told ctl one would)
                    result = {**result, "held": {**result.get("held", {}), name: NOT_SILENCED}}
            elif covering := rules.covering(name, now_ms):
                result = {**result, "still_covered_by": covering}  # not started yet: it would start silenced
        return streams, effects, result

    def _silences(self, cmd: Command) -> Effects:
        """Read-only: the standing silences running that can silence a stream the target matches (an operator pass:
        a silence kept ahead of a sensor was in no status, metric or list; a review: press-* listed no press-[12]*)."""
        now_ms = self.clock() * 1000
        rules = [{"pattern": r.pattern, "until_ms": r.until_ms, "command_id": i}
                 for i, r in self.p.silences.matching(cmd.target, now_ms).items()]
        return [], [], {"silences": sorted(rules, key=lambda r: (r["pattern"], r["until_ms"]))}

    def _reset(self, cmd: Command) -> Effects:
        return self._each(cmd, lambda s: self.p.reset_stream(s, self._why(cmd)))

    def _feedback(self, cmd: Command) -> Effects:
        alert_id, verdict = str(cmd.params["alert_id"]), str(cmd.params["verdict"])
        if verdict not in ("confirmed", "false_positive"):
            raise Refused(f"verdict must be confirmed or false_positive, got {verdict[:40]!r}")
        def raised_it(doc: dict[str, Any]) -> bool:
            return any(isinstance(a, dict) and a.get("alert_id") == alert_id for a in _field(doc, "recent_alerts", list))

        def has_it(stream: str) -> bool:
            return any(a.alert_id == alert_id for a in self.p.streams[stream].recent_alerts)

        for stream in self._targets(cmd, raised_it, has_it):
            st = self.p.streams[stream]
            alert = next((a for a in st.recent_alerts if a.alert_id == alert_id), None)
            if alert is None:
                continue
            if alert.verdict is not None:
                st.feedback[alert.verdict] -= 1
            if verdict == "false_positive" and alert.verdict != verdict:
                self.cal.observe(stream, np.asarray(alert.scores), commanded=True)  # normal after all
            elif alert.verdict == "false_positive" and verdict != alert.verdict:
                self.cal.unobserve(stream, alert.scores)  # taken back: they were not
            alert.verdict = verdict
            st.feedback[verdict] += 1
            st.dirty = True
            result = {"alert_id": alert_id, "verdict": verdict, "precision": st.precision, "feedback": st.feedback}
            return [stream], [{"stream": stream, "feedback": dict(st.feedback)}], result
        return [], [], {"alert_id": alert_id, "found": False}

    def _history(self, cmd: Command) -> Effects:
        """Read-only: an evicted stream's versions come from its document, without waking it (``history --stream
        '*'`` woke every evicted stream, each held in memory again until evicted an hour later)."""
        found = {s: self.cal.history(s) for s in self.p.streams if fnmatch.fnmatchcase(s, cmd.target)}
        for name, doc in sorted(self.p.evicted_docs().items()):
            if name not in found and fnmatch.fnmatchcase(name, cmd.target):
                found[name] = [v for v in _field(_field(doc, "calibrator", dict), "versions", list)
                               if isinstance(v, dict)]
        return [], [], {"history": dict(sorted(found.items()))}

    def _rollback(self, cmd: Command) -> Effects:
        version = int(cmd.params["version"])

        def kept(doc: dict[str, Any]) -> bool:  # woken only where it can apply: a refusal left every match woken
            versions = _field(_field(doc, "calibrator", dict), "versions", list)
            return any(isinstance(v, dict) and v.get("version") == version for v in versions)

        issued = self._issued(cmd)  # as _targets reads it: a stream started since a command read again is not one
        lacking = [s for s, st in self.p.streams.items() if self._lacks(cmd, s, st.commands, st.since_ms, issued)
                   and not st.provisional and not any(v["version"] == version for v in self.cal.history(s))]
        lacking += [n for n, doc in sorted(self.p.evicted_docs().items())
                    if self._lacks(cmd, n, doc_commands(doc), doc_since_ms(doc), issued) and not kept(doc)]
        if lacking:  # all or nothing: a half-applied command would be audited as failed (checked before waking any)
            raise Refused(f"no version {version} kept for {', '.join(lacking[:5])}")
        return self._each(cmd, lambda s: self.cal.rollback(s, version, self._why(cmd)), wake=kept)

    def _shadow(self, cmd: Command) -> Effects:
        asked = _quantile(cmd.params.get("quantile"))
        report: dict[str, Any] = {}
        for stream in self._targets(cmd):
            q = asked or self.cal.quantile(stream)
            try:
                candidate, recent, shifted = self.cal.candidate(stream, q)
            except ValueError as exc:  # a new stream: no normal errors yet; the others are still reported
                report[stream] = {"error": str(exc)}
                continue
            current = self.cal.threshold(stream).value
            a = self.p.streams[stream].alerts.settings  # with the route's own debounce
            report[stream] = {"windows": len(recent), "quantile": q, "margin": self.cal.margin(stream),
                              "path": "new normal" if shifted else "normal errors",
                              "current": simulate(recent, current, a), "candidate": simulate(recent, candidate, a)}
        if report and all("error" in r for r in report.values()):
            raise Refused(next(iter(report.values()))["error"])
        return [], [], {"shadow": report}


def simulate(errors: np.ndarray, threshold: float, settings: AlertSettings) -> dict[str, Any]:
    """What ``threshold`` would have done over recent window errors: windows over it and alerts fired."""
    state = AlertState("shadow", "shadow", replace(settings, flap_max=1 << 30))
    fired = 0
    for i, e in enumerate(np.asarray(errors, "float64")):
        obs = Observation(i, i, i, i, float(e), threshold, "shadow", np.zeros(1, "float32"))
        fired += sum(1 for t in state.update(obs).transitions if t.status == "firing")  # nothing paged: no update
    return {"threshold": threshold, "windows_over": int(np.count_nonzero(errors > threshold)), "alerts": fired}


def _rounded(value: Any) -> float | None:
    return round(float(value), 6) if isinstance(value, int | float) else None


def _quantile(value: Any) -> float | None:
    if value is None:
        return None
    q = float(value)
    if not 0 < q <= MAX_QUANTILE:  # as calibrator.quantile (an operator pass: q0.9999 was applied)
        raise Refused(f"quantile must be in (0, {MAX_QUANTILE}], got {q}")
    return q


def _field(doc: dict[str, Any], key: str, kind: type) -> Any:
    """``doc[key]`` if it is a ``kind``, else an empty one: a damaged changelog document (restoring it is
    logged and skipped) must not fail a command that looks into every evicted stream's document."""
    value = doc.get(key)
    return value if isinstance(value, kind) else kind()


def _claimed(raw: bytes | None) -> str | None:
    """The command id an unverified message claims (for the audit record only)."""
    try:
        doc = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    cid = doc.get("command_id") if isinstance(doc, dict) else None
    return cid[:128] if isinstance(cid, str) and encodable(cid[:128]) else None  # (an ack's key: see _command)


class ControlSource:
    """The control topic, read from its end at start-up without a consumer group: every instance sees
    every command. Commands sent while no daemon ran are not applied (``tsmon ctl`` then reports that
    nobody acknowledged); at most the last batch before start may be read again, which the applied-id
    memory and the age limit make harmless."""

    def __init__(self, client: dict[str, Any], topic: str) -> None:
        self._consumer, _ = partition_reader(client, topic, at_end=True)
        self._failing = False

    def poll(self) -> list[bytes | None]:
        """Commands that arrived; none while the client fails to read the topic (commands wait, never lost).
        The failure is logged once, and its end (the control topic is polled every 200 ms)."""
        from kafka.errors import KafkaError

        try:
            batches = self._consumer.poll(timeout_ms=0)
        except KafkaError as exc:  # raised, it ended the daemon
            if not self._failing:
                log.warning("control_poll_failed", error=describe(exc)[:300],
                            consequence="operator commands wait until the control topic can be read")
            self._failing = True
            return []
        if self._failing:
            log.info("control_poll_resumed")
            self._failing = False
        return [r.value for records in batches.values() for r in records]

    def close(self) -> None:
        self._consumer.close()
