"""The collector's view of the long-lived heap: what start-up built is frozen out of every collection.

Owns the process's garbage-collector policy. A full collection walks every tracked object, and after
start-up that is mostly torch, numpy, the Kafka clients and the models: about 240 000 objects, which
CPython 3.11 took 135 ms to walk on 2 vCPUs — a stall of the consuming loop (or of the scoring process)
every few seconds of traffic, and the whole p99 tail of ``tsmon bench latency``. ``freeze`` moves what
exists now into the permanent generation, so later collections walk only what was made since; ``thaw``
hands it back when the daemon stops (a process that runs the daemon twice, as tests do, collects the
first one's garbage).
"""

from __future__ import annotations

import gc


def freeze() -> int:
    """Collect once, then leave everything alive now out of future collections; returns how many objects."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw() -> None:
    """Put the frozen objects back under the collector."""
    gc.unfreeze()
