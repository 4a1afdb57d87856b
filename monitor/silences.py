"""Standing silences: an operator's ``silence`` as a rule for the streams that start while it runs.

Owns the rules, not the streams' silences. ``tsmon ctl silence --stream 'press-*' --for 2h`` silences the
matching streams there are now — held, or known by their documents — (:mod:`monitor.controller`), and leaves a
rule here so that a *new* stream matching it, one that starts without a document before the silence ends (a
sensor first seen during the maintenance, or one never seen before: ``silence press-9`` ahead of it), starts
silenced until the same end (:meth:`StandingSilences.apply`). A stream with a document is never silenced by a
rule: its document says whether the command reached it, and an ``unsilence`` of it holds through its restarts.

A new silence of the same pattern replaces its rule, as it replaces the streams' silences; ``unsilence`` of a
pattern lifts the rules whose pattern it covers. The rules are daemon-wide state: persisted in the changelog's
daemon-wide document, merged at each restore with what it holds (a lift this instance knows wins), dropped once
they have ended.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from monitor import logs
from monitor.control import MAX_SILENCE_S
from monitor.globs import Budget, covers, overlaps

if TYPE_CHECKING:
    from monitor.streams import StreamState

log = logs.get("tsmon.control")

MAX_RULES = 1000  # rules kept at most: the lifted ones go first, then the running ones that end first
MAX_PATTERN = 512  # characters of a rule's pattern (a stream id has limits.max_stream_len, 256 by default)
DOC_BYTES = 256 * 1024  # of the daemon-wide document (1 MB at most, 512 KiB of it command ids)
AHEAD_MS = 86_400_000  # a document's rule may end this much past 30 days of this clock (another host's)


@dataclass(slots=True)
class Rule:
    pattern: str
    issued_ms: int
    until_ms: int
    lifted: bool = False

    def doc(self, command_id: str) -> dict[str, Any]:
        return {"id": command_id, "pattern": self.pattern, "issued_ms": self.issued_ms, "until_ms": self.until_ms,
                "lifted": self.lifted}

    def covers(self, stream: str, st: StreamState, command_id: str, now_ms: float) -> bool:
        """Does it silence ``st``, a stream started here without a document, as it starts?"""
        return (not self.lifted and self.until_ms > now_ms and st.fresh and not st.provisional
                and command_id not in st.commands and fnmatch.fnmatchcase(stream, self.pattern))


class StandingSilences:
    """The group's silence rules by command id; ``now_ms`` is the wall clock, as for every silence."""

    def __init__(self) -> None:
        self.rules: dict[str, Rule] = {}

    def add(self, command_id: str, pattern: str, issued_ms: int, until_ms: int, now_ms: float) -> str:
        """Keep the rule (its pattern at most MAX_PATTERN characters: the caller says why not), replacing the running
        ones of the same pattern: ``running``; ``replaced`` if a later-issued one of its pattern runs, or it was
        lifted or has ended (the command read again); ``full`` if MAX_RULES rules that end later run."""
        replaced = command_id in self.rules or until_ms <= now_ms  # read again, or ended
        if not replaced:  # the later issued of two of one pattern holds (a shorter silence of dev-* held new streams
            # for the longer one; an older one read late must not end a newer one)
            same = [r for r in self.running(now_ms).values() if r.pattern == pattern]
            for rule in same:
                rule.lifted = rule.lifted or rule.issued_ms <= issued_ms
            replaced = any(r.issued_ms > issued_ms for r in same)
            self.rules[command_id] = Rule(pattern, issued_ms, until_ms, replaced)
        self._prune(now_ms)
        return "running" if command_id in self.running(now_ms) else "replaced" if replaced else "full"

    def lift(self, target: str, now_ms: float) -> tuple[list[str], list[str]]:
        """Lift the running rules whose pattern ``target`` covers (``dev-*`` lifts ``dev-*``, ``dev-a*`` and
        ``dev-[ab]*``, ``*`` every one); returns their patterns, and those of the running rules it overlaps but does
        not cover, left running (``unsilence gear-1*`` under ``gear-[12]*``: gear-2x still starts silenced). One
        budget for all the rules: a comparison not worked out within it lifts nothing and is named with the second."""
        budget, lifted, kept = Budget(), set(), set()
        for rule in self.running(now_ms).values():
            if covers(target, rule.pattern, budget):
                rule.lifted = True
                lifted.add(rule.pattern)
            elif overlaps(target, rule.pattern, budget) is not False:
                kept.add(rule.pattern)
        return sorted(lifted), sorted(kept - lifted)

    def matching(self, target: str, now_ms: float) -> dict[str, Rule]:
        """The running rules that can silence a stream ``target`` matches (a stream id: the rules that cover it;
        ``press-*``: ``press-1*``, ``press-[12]*`` and ``*`` too); a comparison not worked out within the budget
        lists the rule."""
        budget = Budget()
        return {i: r for i, r in self.running(now_ms).items() if overlaps(target, r.pattern, budget) is not False}

    def covering(self, stream: str, now_ms: float) -> list[str]:
        """The running rules' patterns that match ``stream`` (one not started yet would start silenced)."""
        return sorted({r.pattern for r in self.running(now_ms).values() if fnmatch.fnmatchcase(stream, r.pattern)})

    def renewer(self, now_ms: float) -> Callable[[str, int], bool]:
        """Would a running rule silence a stream, started anew, until a time at least — one the daemon-wide document
        holds (a restart keeps it)? The rules read once, for a pass over many documents (each call re-encoded them:
        7 s of the loop for 50 000 documents under 50 rules)."""
        saved = {e["id"] for e in self._saved(now_ms)}
        rules = [r for i, r in self.running(now_ms).items() if i in saved]
        return lambda stream, until_ms: any(r.until_ms >= until_ms and fnmatch.fnmatchcase(stream, r.pattern)
                                            for r in rules)

    def running(self, now_ms: float) -> dict[str, Rule]:
        return {i: r for i, r in self.rules.items() if not r.lifted and r.until_ms > now_ms}

    def apply(self, stream: str, st: StreamState, now_ms: float) -> bool:
        """Silence a new stream by every running rule that covers it; True if one did."""
        applied = False
        for command_id, rule in self.rules.items():
            if not rule.covers(stream, st, command_id, now_ms):
                continue
            st.commands.append(command_id)  # read again (the command), it is not silenced anew
            st.silenced_until_ms = max(st.silenced_until_ms, rule.until_ms)
            st.dirty = applied = True
            log.info("standing_silence_applied", stream=stream, pattern=rule.pattern, command_id=command_id,
                     until_ms=rule.until_ms)
        return applied

    def doc(self, now_ms: float) -> list[dict[str, Any]]:
        """The rules for the daemon-wide document, within DOC_BYTES (those that end last first)."""
        out = self._saved(now_ms)
        if len(out) < len(self.rules):
            log.warning("standing_silences_not_saved", rules=len(self.rules) - len(out),
                        consequence="kept in memory: a restart loses them")
        return out

    def _saved(self, now_ms: float) -> list[dict[str, Any]]:
        self._prune(now_ms)
        out, size = [], 0
        for command_id, rule in self.rules.items():
            entry = rule.doc(command_id)
            size += len(json.dumps(entry)) + 2
            if size > DOC_BYTES:
                break
            out.append(entry)
        return out

    def merge(self, docs: Any, now_ms: float) -> None:
        """Take the rules of a daemon-wide document: new ones added, a lift kept; entries it cannot read skipped."""
        bad = 0
        for d in docs if isinstance(docs, list) else ():
            rule = _rule(d, now_ms)
            if rule is None:
                bad += 1
                continue
            kept = self.rules.setdefault(d["id"], rule)
            kept.lifted = kept.lifted or rule.lifted
        if bad:
            log.warning("standing_silences_unreadable", entries=bad, consequence="those silences are not kept")
        self._prune(now_ms)

    def _prune(self, now_ms: float) -> None:
        """Drop the rules that have ended (a lifted one too: nothing brings it back once it would have ended),
        and past MAX_RULES the lifted ones, then the running ones that end first (a review: 1 000 lifted rules
        still in their time left no room for a new one, and it was dropped without a word)."""
        keep = sorted(((i, r) for i, r in self.rules.items() if r.until_ms > now_ms),
                      key=lambda ir: (ir[1].lifted, -ir[1].until_ms))
        if dropped := sum(not r.lifted for _, r in keep[MAX_RULES:]):
            log.warning("standing_silences_dropped", rules=dropped, limit=MAX_RULES,
                        consequence="new streams they match start unsilenced: the rules that end first go first")
        self.rules = dict(keep[:MAX_RULES])


def _rule(d: Any, now_ms: float) -> Rule | None:
    """A daemon-wide document's entry as a rule, or None if it is not one (hand-edited, damaged)."""
    if not isinstance(d, dict) or not isinstance(d.get("id"), str):
        return None
    pattern, issued, until, lifted = d.get("pattern"), d.get("issued_ms"), d.get("until_ms"), d.get("lifted")
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (issued, until))
    limit = now_ms + MAX_SILENCE_S * 1000 + AHEAD_MS  # issued by the sending host's clock, the end by the daemon's:
    # a rule may end before it was issued where that host runs ahead (a review: by more than --for, it was unreadable)
    if not (isinstance(pattern, str) and 0 < len(pattern) <= MAX_PATTERN and isinstance(lifted, bool) and ints
            and 0 <= issued <= limit and 0 <= until <= limit):  # type: ignore[operator]
        return None
    return Rule(pattern, issued, until, lifted)  # type: ignore[arg-type]
