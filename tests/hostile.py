"""A seeded corpus of hostile input messages: every one must end on the dead-letter topic with a reason.

``corpus(n, seed, stream, good)`` returns ``(key, value, kind)`` triples. ``good`` are the labelled stream's
own messages (timestamps), so that duplicates and out-of-order samples can be aimed at it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import numpy as np

Message = tuple[bytes | None, bytes | None, str]


def corpus(n: int, seed: int, stream: str, good_last_ts: list[int], max_bytes: int) -> list[Message]:
    rng = np.random.default_rng(seed)
    key = stream.encode()
    t0 = good_last_ts[0]

    def broken_json() -> Message:
        body = json.dumps({"stream": stream, "ts": t0, "values": [1.0, 2.0]}).encode()
        return key, body[: int(rng.integers(1, len(body) - 1))], "broken_json"

    def garbage_bytes() -> Message:
        return key, bytes(rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8)), "garbage_bytes"

    def wrong_types() -> Message:
        docs = [{"stream": stream, "ts": "yesterday", "values": [1, 2]}, {"stream": stream, "ts": t0, "values": "ab"},
                {"stream": 5, "ts": t0, "values": [1, 2]}, {"stream": stream, "ts": t0, "values": [[1, "x"]]},
                {"stream": stream, "ts": t0, "values": [True, None]}, [1, 2, 3], "text", 42, None,
                {"stream": stream, "ts": t0, "samples": [[1, 2]], "period_ms": -5},
                {"stream": stream, "ts": t0, "value": 1.0, "values": [1, 2]}]
        return key, json.dumps(docs[int(rng.integers(len(docs)))]).encode(), "wrong_types"

    def non_finite() -> Message:
        x = ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"][int(rng.integers(5))]
        return key, f'{{"stream": "{stream}", "ts": {t0}, "values": [{x}, 1.0]}}'.encode(), "non_finite"

    def huge_numbers() -> Message:
        big = "9" * int(rng.integers(40, 400))
        bodies = [f'{{"stream": "{stream}", "ts": {big}, "values": [1.0, 2.0]}}',
                  f'{{"stream": "{stream}", "ts": {t0}, "values": [{big}, 2.0]}}',
                  f'{{"stream": "{stream}", "ts": {t0}, "samples": [[1, 2]], "period_ms": {big}}}',
                  f'{{"stream": "{stream}", "ts": "0001-01-01T00:00:00+14:00", "values": [1.0, 2.0]}}']
        return key, bodies[int(rng.integers(len(bodies)))].encode(), "huge_numbers"

    def empty() -> Message:
        return key, [b"", None][int(rng.integers(2))], "empty"

    def oversized() -> Message:
        return key, b'{"stream": "' + b"x" * (max_bytes + 10) + b'"}', "oversized"

    def deep() -> Message:
        d = int(rng.integers(2_000, 100_000))
        return key, b"[" * d + b"]" * d, "deep_nesting"

    def channels() -> Message:
        c = [1, 3, 7][int(rng.integers(3))]
        return key, json.dumps({"stream": stream, "ts": t0, "values": [0.5] * c}).encode(), "wrong_channels"

    def duplicate() -> Message:
        ts = good_last_ts[int(rng.integers(len(good_last_ts)))]  # already seen by the time it arrives
        return key, json.dumps({"stream": stream, "ts": ts, "values": [0.1, 0.2]}).encode(), "duplicate_or_late"

    def unknown_stream() -> Message:
        name = f"x-{uuid.UUID(int=int(rng.integers(1 << 62)))}"
        return name.encode(), json.dumps({"stream": name, "ts": t0, "values": [0.1, 0.2]}).encode(), "unknown_stream"

    def too_many() -> Message:
        name = f"dev-extra-{int(rng.integers(1 << 30))}"
        return name.encode(), json.dumps({"stream": name, "ts": t0, "values": [0.1, 0.2]}).encode(), "too_many"

    kinds: list[Callable[[], Message]] = [broken_json, garbage_bytes, wrong_types, non_finite, huge_numbers, empty,
                                          oversized, deep, channels, duplicate, unknown_stream, too_many]
    return [kinds[i % len(kinds)]() for i in rng.permutation(n)]
