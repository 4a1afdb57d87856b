"""Fixtures of the stage tests: processors over the session's small stream model, with in-memory doubles."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from monitor.batcher import Batcher
from monitor.calibrator import Calibrator
from monitor.processor import Processor
from monitor.scorer import Scorer, Served, load_served
from monitor.sink import MemorySink

Make = Callable[..., Processor]


@pytest.fixture(scope="module")
def served(stream_model: Path) -> Served:
    return load_served("*", stream_model, None, None, "cpu")


@pytest.fixture
def make(served: Served) -> Iterator[Make]:
    """Processors over a fresh scorer, calibrator, batcher and memory sink; all closed at teardown."""
    made: list[Processor] = []

    def build(scorer: Scorer | None = None, max_batch: int = 64, max_delay_ms: float = 0.0) -> Processor:
        p = Processor(scorer or Scorer([served]), Calibrator(), Batcher(max_batch, max_delay_ms), MemorySink())
        made.append(p)
        return p

    yield build
    for p in made:
        p.close()


