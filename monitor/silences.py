"""Standing silences: an operator's ``silence`` as a rule for the streams that start while it runs.

Owns the rules, not the streams' silences. ``tsmon ctl silence --stream 'press-*' --for 2h`` silences the
matching streams held now (:mod:`monitor.controller`), and leaves a rule here so that a stream matching it
that starts before the silence ends — a sensor first seen during the maintenance, or one not held by any
instance when the command came (a silence of ``press-9`` before that sensor is back) — starts silenced until
the same time (:meth:`StandingSilences.apply`, called when a stream starts). A stream gets a rule once (its
document keeps the command's id, as for every command), so ``unsilence`` of one stream holds through its
restarts. ``unsilence`` with the rule's own pattern (or ``'*'``) lifts the rule as well.

The rules are daemon-wide state: persisted in the changelog's daemon-wide document and merged with what
another instance of the group wrote (a rule lifted anywhere stays lifted), dropped once they have ended.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from monitor import logs
from monitor.control import MAX_SILENCE_S

if TYPE_CHECKING:
    from monitor.streams import StreamState

log = logs.get("tsmon.control")

MAX_RULES = 1000  # running rules kept at most (the oldest to end go first): the daemon-wide document stays small
MAX_PATTERN = 4096  # characters of a rule's pattern at most (a stream id has limits.max_stream_len, 256 by default)
CLOCK_SKEW_MS = 86_400_000  # a rule another instance wrote may end this much past 30 days of this clock


@dataclass(slots=True)
class Rule:
    pattern: str
    until_ms: int
    lifted: bool = False

    def doc(self, command_id: str) -> dict[str, Any]:
        return {"id": command_id, "pattern": self.pattern, "until_ms": self.until_ms, "lifted": self.lifted}


class StandingSilences:
    """The group's silence rules by command id; ``now_ms`` is the wall clock, as for every silence."""

    def __init__(self) -> None:
        self.rules: dict[str, Rule] = {}

    def add(self, command_id: str, pattern: str, until_ms: int, now_ms: float) -> bool:
        """Keep the rule; False for a pattern longer than any stream id could match (not kept)."""
        if len(pattern) > MAX_PATTERN:
            return False
        if command_id not in self.rules:  # read again: a rule lifted since stays lifted
            self.rules[command_id] = Rule(pattern, until_ms)
        self._prune(now_ms)
        return True

    def lift(self, pattern: str, now_ms: float) -> list[str]:
        """Lift the running rules of ``pattern`` (every one for ``'*'``); returns the patterns lifted."""
        lifted = []
        for rule in self.rules.values():
            if not rule.lifted and rule.until_ms > now_ms and pattern in ("*", rule.pattern):
                rule.lifted = True
                lifted.append(rule.pattern)
        return sorted(set(lifted))

    def running(self, now_ms: float) -> dict[str, Rule]:
        return {i: r for i, r in self.rules.items() if not r.lifted and r.until_ms > now_ms}

    def apply(self, stream: str, st: StreamState, now_ms: float) -> bool:
        """Silence a starting stream by every running rule it matches and has not had; True if one applied."""
        applied = False
        for command_id, rule in self.running(now_ms).items():
            if command_id in st.commands or not fnmatch.fnmatchcase(stream, rule.pattern):
                continue
            st.commands.append(command_id)
            st.silenced_until_ms = max(st.silenced_until_ms, rule.until_ms)
            st.dirty = applied = True
            log.info("standing_silence_applied", stream=stream, pattern=rule.pattern, command_id=command_id,
                     until_ms=rule.until_ms)
        return applied

    def doc(self, now_ms: float) -> list[dict[str, Any]]:
        self._prune(now_ms)
        return [r.doc(i) for i, r in self.rules.items()]

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
        """Drop the rules that have ended (a lifted one too: nothing can bring it back once it would have ended),
        and past MAX_RULES the running ones that end first."""
        keep = sorted(((i, r) for i, r in self.rules.items() if r.until_ms > now_ms), key=lambda ir: -ir[1].until_ms)
        self.rules = dict(keep[:MAX_RULES])


def _rule(d: Any, now_ms: float) -> Rule | None:
    """A daemon-wide document's entry as a rule, or None if it is not one (hand-edited, damaged)."""
    if not isinstance(d, dict) or not isinstance(d.get("id"), str):
        return None
    pattern, until, lifted = d.get("pattern"), d.get("until_ms"), d.get("lifted")
    if not (isinstance(pattern, str) and 0 < len(pattern) <= MAX_PATTERN and isinstance(lifted, bool)
            and isinstance(until, int) and not isinstance(until, bool)
            and until <= now_ms + MAX_SILENCE_S * 1000 + CLOCK_SKEW_MS):
        return None
    return Rule(pattern, until, lifted)
