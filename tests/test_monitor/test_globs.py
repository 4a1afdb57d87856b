"""Glob comparison (monitor.globs): exact against fnmatch itself, bounded by its budget."""

from __future__ import annotations

import fnmatch
import itertools
import random

import pytest

from monitor.globs import Budget, covers, overlaps, tokens

ATOMS = ["a", "b", "c", "-", "*", "?", "[ab]", "[!a]", "[a-c]", "[b-a]", "[]a]", "[!]", "[", "]"]
IDS = [""] + ["".join(p) for n in range(1, 5) for p in itertools.product("abcd[]-!", repeat=n)]


def _ids(pattern: str) -> set[str]:
    return {s for s in IDS if fnmatch.fnmatchcase(s, pattern)}


def test_covers_and_overlaps_agree_with_fnmatch_on_every_short_id() -> None:
    """Random patterns of fnmatch's whole syntax (classes, negation, ranges, an empty range, a ']' first, a '['
    left open): every answer holds for the ids up to 4 characters fnmatch matches, and where those show the
    answer (a counterexample, a shared id) it is the one given."""
    rnd = random.Random(7)
    shown = {"covers": 0, "not covers": 0, "overlaps": 0, "apart": 0}
    for _ in range(600):
        first, later = ("".join(rnd.choice(ATOMS) for _ in range(rnd.randint(0, 3))) for _ in range(2))
        a, b = _ids(first), _ids(later)
        c, o = covers(first, later), overlaps(first, later)
        assert c is not None and o is not None, (first, later)
        if c:
            assert b <= a, (first, later, sorted(b - a)[:3])
            shown["covers"] += 1
        elif not b <= a:
            shown["not covers"] += 1
        if o:
            shown["overlaps"] += 1 if a & b else 0
        else:
            assert not a & b, (first, later, sorted(a & b)[:3])
            shown["apart"] += 1
        if len(first) <= 3 and len(later) <= 3 and "[" not in first + later:  # every id these can match is short
            assert c == (b <= a) and o == bool(a & b), (first, later)
    assert min(shown.values()) > 30, shown


@pytest.mark.parametrize(("first", "later", "covered", "overlapping"), [
    ("gear-[12]*", "gear-1*", True, True),  # a class covers a narrower glob (an unsilence of it lifts gear-1*)
    ("gear-1*", "gear-[12]*", False, True),  # and is not covered by one part of it
    ("press-*", "press-[12]*", True, True),
    ("gear-3*", "gear-[12]*", False, False),
    ("gear-*9*", "gear-[0-9]*", False, True),
    ("x[!a]", "xb", True, True),
    ("x[!a]", "xa", False, False),
    ("*", "[b-a]x", True, False),  # an empty range matches nothing
    ("p[[]1]", "p[[]1]", True, True),  # tsmon ctl --exact's escapes
    ("p[[]1]", "p[1]", False, False),
    ("a[", "a[", True, True),  # a class left open is a literal '['
    ("a?", "a*", False, True),
    ("[a-mz]", "[m-z]", False, True),  # n: a character no pattern writes, between two that one does
    ("[!b]", "[a-c]", False, True),
])
def test_classes_are_compared_by_their_members(first: str, later: str, covered: bool, overlapping: bool) -> None:
    assert covers(first, later) is covered and overlaps(first, later) is overlapping


def test_tokens_read_a_pattern_as_fnmatch_does() -> None:
    assert tokens("a**[!]x]?[") == [("=", "a"), ("*", ""), ("[", "[!]x]"), ("?", ""), ("=", "[")]


def test_a_comparison_is_bounded_by_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: '*x*x*x*x*y' against a 300-character rule held the loop thread 14 s (a regex of one pattern matched
    against the other's text backtracked); here it is decided in a few thousand steps, and a budget too small for a
    comparison answers None, not a guess."""
    wide = "x" * 300
    for budget in (Budget(20_000), Budget(20_000)):
        assert covers("*x*x*x*x*y", wide, budget) is False and overlaps("*x*x*x*x*y", wide, budget) is False
        assert budget.left > 0
    assert covers("*x*x*x*x*x*x*x*x*y", "x" * 500 + "*", Budget(50_000)) is False
    shared = Budget(10)
    assert covers("*a*b*", "?" * 40, shared) is None and overlaps("*a*b*", "?" * 40, shared) is None
    # a spent budget answers at once, without reading the patterns (a review: 1 000 rules past it took 1 s)
    def unread(pattern: str) -> None:
        raise AssertionError(f"read {pattern[:20]!r} past the budget")

    monkeypatch.setattr("monitor.globs.tokens", unread)
    for compare in (covers, overlaps):
        assert compare("*" + "x" * 510, "[a-z]" * 100, Budget(0)) is None
