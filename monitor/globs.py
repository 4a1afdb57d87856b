"""Stream-id globs as sets: does one fnmatch pattern match every id another matches, do two match one in common.

Owns the comparison of patterns, not their matching (``fnmatch.fnmatchcase``, as everywhere in tsmon). Used where
a pattern is weighed against another: an ``unsilence`` lifts the standing silences its pattern covers and names
those it only overlaps (:mod:`monitor.silences`), and a ``[[models]]`` route after one that covers it is never
reached (:mod:`monitor.config`).

Exact for fnmatch's whole syntax — ``*``, ``?`` and ``[…]`` classes, negated ``[!…]`` and ranges included, a class
left open read as a literal ``[`` as fnmatch reads it — since both patterns are read as automata over the few
classes of characters their tokens tell apart (a class's members are asked of fnmatch itself). And bounded: a
comparison takes at most a :class:`Budget` of steps, and one that runs out answers None, for "not known", which
each caller takes the careful way. A regular expression made of one pattern and matched against the other's text
(as before) backtracked exponentially in its ``*``: ``'*x*x*x*x*y'`` against a 300-character rule held the loop
thread for 14 s.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

STAR, ANY, CHAR, CLASS = "*", "?", "=", "["
STEPS = 200_000  # a command's (or a check's) comparisons together: ~0.2 s of this loop at the most
CLASS_STEPS = 100  # what reading a class costs beside asking it each character (fnmatch compiles it)


@dataclass(slots=True)
class Budget:
    """Steps left to the comparisons that share it (one command's, whatever the number of rules it weighs)."""

    left: int = STEPS

    def spend(self, steps: int) -> bool:
        self.left -= steps
        return self.left >= 0


def tokens(pattern: str) -> list[tuple[str, str]]:
    """``pattern`` as fnmatch reads it (``fnmatch.translate``'s rules): ``*`` runs folded into one, ``?``, a
    class with its text (``[!a-c]``), any other character itself — ``[`` too where no ``]`` closes it."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not out or out[-1][0] != STAR:
                out.append((STAR, ""))
        elif c == "?":
            out.append((ANY, ""))
        elif c == "[":
            j = i + (i < n and pattern[i] == "!")
            j += j < n and pattern[j] == "]"
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append((CHAR, "["))
            else:
                out.append((CLASS, pattern[i - 1:j + 1]))
                i = j + 1
        else:
            out.append((CHAR, c))
    return out


class _Automaton:
    """A pattern's tokens as a nondeterministic automaton over ``alphabet``: state p waits at token p, the end
    state (len) accepts; each token's characters as a set of alphabet indices (None: all)."""

    def __init__(self, toks: list[tuple[str, str]], alphabet: list[str], index: dict[str, int]) -> None:
        self.toks, self.end = toks, len(toks)
        self.takes: list[frozenset[int] | None] = [
            None if kind in (STAR, ANY) else frozenset((index[text],)) if kind == CHAR
            else frozenset(k for k, ch in enumerate(alphabet) if fnmatch.fnmatchcase(ch, text))
            for kind, text in toks]

    def star(self, p: int) -> bool:
        return p < self.end and self.toks[p][0] == STAR

    def closure(self, states: set[int]) -> frozenset[int]:
        """With the states an empty run of a ``*`` reaches."""
        todo, seen = list(states), set(states)
        while todo:
            p = todo.pop()
            if self.star(p) and p + 1 not in seen:
                seen.add(p + 1)
                todo.append(p + 1)
        return frozenset(seen)

    def accepts(self, p: int, k: int) -> bool:
        takes = self.takes[p]
        return takes is None or k in takes

    def step(self, states: frozenset[int], k: int) -> frozenset[int]:
        return self.closure({p if self.star(p) else p + 1 for p in states if p < self.end and self.accepts(p, k)})


def _pair(first: str, later: str, budget: Budget) -> tuple[_Automaton, _Automaton, int] | None:
    """Both patterns over one alphabet: a character of each class no token of theirs tells apart (every class
    is a union of ranges between characters written in it, so each written character and the one after it
    start a class); None if ``budget`` cannot pay for reading both and asking fnmatch each class's members (a
    review: comparisons past the budget still read their patterns, 1 s for one lift of 1 000 rules)."""
    if not budget.spend(2 * (len(first) + len(later)) + 1):
        return None
    cuts = {0}
    for c in first + later:
        cuts |= {ord(c), ord(c) + 1}
    alphabet = [chr(c) for c in sorted(cuts) if c <= 0x10FFFF]
    index = {ch: k for k, ch in enumerate(alphabet)}
    toks = tokens(first), tokens(later)
    if not budget.spend((len(alphabet) + CLASS_STEPS) * sum(kind == CLASS for t in toks for kind, _ in t)):
        return None
    return _Automaton(toks[0], alphabet, index), _Automaton(toks[1], alphabet, index), len(alphabet)


def covers(first: str, later: str, budget: Budget | None = None) -> bool | None:
    """Does ``first`` match every stream id ``later`` matches? None if ``budget`` ran out before it was known.

    Walks ``later``'s automaton beside ``first``'s made deterministic (the set of its states): a pair where
    ``later`` has matched an id and ``first`` cannot is an id of one and not the other."""
    if first == later or first and not first.strip("*"):
        return True
    budget = budget or Budget()
    automata = _pair(first, later, budget)
    if automata is None:
        return None
    a, b, size = automata
    start = (0, a.closure({0}))
    todo, seen = [start], {start}
    while todo:
        j, states = todo.pop()
        if j == b.end:
            if a.end not in states:
                return False
            continue
        nexts: list[tuple[int, frozenset[int]]] = []
        if b.star(j):
            nexts.append((j + 1, states))
        letters = range(size) if b.takes[j] is None else b.takes[j]
        if not budget.spend(len(letters) * (len(states) + 1)):
            return None
        for k in letters:
            nexts.append((j if b.star(j) else j + 1, a.step(states, k)))
        for pair in nexts:
            if pair not in seen:
                seen.add(pair)
                todo.append(pair)
    return True


def overlaps(first: str, later: str, budget: Budget | None = None) -> bool | None:
    """Is there a stream id both patterns match? None if ``budget`` ran out before it was known."""
    budget = budget or Budget()
    automata = _pair(first, later, budget)
    if automata is None:
        return None
    a, b, _ = automata
    todo, seen = [(0, 0)], {(0, 0)}
    while todo:
        i, j = todo.pop()
        if i == a.end and j == b.end:
            return True
        if not budget.spend(1):
            return None
        nexts = [(i + 1, j)] if a.star(i) else []
        nexts += [(i, j + 1)] if b.star(j) else []
        if i < a.end and j < b.end and _meet(a.takes[i], b.takes[j]):  # one character both take: a move of each
            nexts.append((i if a.star(i) else i + 1, j if b.star(j) else j + 1))
        for pair in nexts:
            if pair not in seen:
                seen.add(pair)
                todo.append(pair)
    return False


def _meet(one: frozenset[int] | None, other: frozenset[int] | None) -> bool:
    if one is None:
        return other is None or bool(other)
    return bool(one) if other is None else bool(one & other)
