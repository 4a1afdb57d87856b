"""``tsmon bench memory``: what one stream costs in memory, and so what ``limits.max_streams`` costs in total.

Owns the memory-budget measurement. Streams are fed through a real :class:`~monitor.daemon.Daemon`
(in-process source and sink, the given model) until each holds a full window; tracemalloc counts what
that state takes per stream. The calibrator's evidence (``calibrator.window`` normal errors and
``drift.window`` recent ones) fills only after thousands of windows, so it is then filled to capacity
directly and counted on its own, as are a stream's recent alerts (``state.recent_alerts``, each with its
episode's scores) and threshold versions (``state.history``), filled to capacity. ``total_mb`` = ``max_streams`` × the per-stream sum: the bound the
limits put on stream state (the model, the batcher's windows and the Kafka clients' buffers come on top,
each bounded by its own setting).
"""

from __future__ import annotations

import gc
import tracemalloc
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from monitor.alerts import MAX_EPISODE_SCORES
from monitor.bench import sample_streams
from monitor.config import load_config
from monitor.replay import as_records
from monitor.sink import MemorySink
from monitor.source import MemorySource


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def bench_memory(model: str, streams: int) -> dict[str, Any]:
    from monitor.daemon import Daemon

    cfg = load_config(None, {"models": [{"pattern": "*", "path": model}], "daemon.scoring": "thread",
                             "daemon.device": "cpu", "http.enabled": False}, env={})
    source, sink = MemorySource(batch=500), MemorySink()
    daemon = Daemon(cfg, source=source, sink=sink)
    det = next(iter(daemon.scorer.models.values())).detector
    per_stream = 3 * det.window
    for name, ts, values in sample_streams(det, streams, per_stream, seed=0):
        source.records += as_records(name, ts, values, det.window, "bench", first_offset=len(source.records))
    source.assigned |= {r.tp for r in source.records}  # the partitions it hands out are the daemon's
    n_records = len(source.records)
    tracemalloc.start()
    try:
        before = _traced()
        daemon.run(until=lambda: not source.records and daemon.processor.pending == 0)
        sink.sent.clear(), sink.acked.clear()  # published output is the broker's, not the daemon's
        pipeline = _traced() - before
        calibrator = daemon.calibrator
        s = calibrator.settings
        rng = np.random.default_rng(0)
        before = _traced()
        for name in calibrator.streams():
            calibrator.observe(name, rng.random(s.window))
            calibrator.observe_all(name, rng.random(s.drift.window))
        evidence = _traced() - before
        before = _traced()  # what an alerting stream keeps: its recent alerts' scores and threshold versions, full
        for name, st in daemon.processor.streams.items():
            for i in range(st.recent_alerts.maxlen or 0):
                st.remember(f"{name}-{i}", rng.random(MAX_EPISODE_SCORES))
            doc, state = calibrator.export(name), calibrator.threshold(name)
            doc["versions"] = [asdict(replace(state, value=float(v) + 0.5, version=k + 1, updated_ms=k + 1,
                                              source="calibrated", reason=f"q0.99 of {k + 2000} errors"))
                               for k, v in enumerate(rng.random(s.history))]
            calibrator.restore(name, doc)  # (its rings again, as they were: they cost nothing more)
        history = _traced() - before
    finally:
        tracemalloc.stop()
    held = len(daemon.processor.streams) or 1
    state_b, evidence_b, history_b = pipeline / held, evidence / held, history / held
    per = state_b + evidence_b + history_b
    return {"model": Path(model).name, "streams": held, "records": n_records,
            "stream_state_bytes": round(state_b), "calibrator_evidence_bytes": round(evidence_b),
            "calibrator_window": s.window, "drift_window": s.drift.window,
            "alert_history_bytes": round(history_b), "recent_alerts": cfg.state.recent_alerts,
            "threshold_versions": s.history,
            "per_stream_bytes": round(per), "max_streams": cfg.limits.max_streams,
            "total_mb": round(cfg.limits.max_streams * per / 2**20, 1)}
