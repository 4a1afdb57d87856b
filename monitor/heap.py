"""The collector's view of the long-lived heap: what start-up built is frozen out of every collection.

Owns the process's garbage-collector policy. A full collection walks every tracked object, and after
start-up that is mostly torch, numpy, the Kafka clients and the models: about 240 000 objects, which
CPython 3.11 took 108–140 ms to walk on 2 vCPUs — a stall of the consuming loop (or of the scoring
process) every ~10 s of traffic in ``tsmon bench latency``. ``freeze`` moves what exists now into the
permanent generation, so later collections walk only what was made since; ``thaw`` hands it back when the
last daemon of the process stops (a process that runs daemons one after another, or side by side, as tests
do, collects their garbage afterwards). Objects alive at the freeze that later become cyclic garbage wait
for the thaw: bounded by the start-up heap.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_holders = 0  # daemons of this process running with the heap frozen


def freeze() -> int:
    """Collect once, then leave everything alive now out of future collections; returns how many objects."""
    global _holders
    with _lock:
        _holders += 1
        gc.collect()
        gc.freeze()
        return gc.get_freeze_count()


def thaw() -> None:
    """One holder is done; the last one puts the frozen objects back under the collector."""
    global _holders
    with _lock:
        _holders = max(0, _holders - 1)
        if _holders == 0:
            gc.unfreeze()
