"""What the daemon's loop shows the HTTP threads: ``/healthz``'s loop stamp, ``/readyz``'s state and reason,
``/streams`` rows (built only while someone reads them), and the lag and uncommitted-records gauges.

The loop replaces these views, never mutates them; a ``/streams`` request asks the loop for fresh rows and waits
for its next turn (:data:`ROWS_WAIT_S` at most: a hung loop gives the last ones).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from models.errors import describe
from monitor import logs
from monitor.daemon_state import REBALANCING, DaemonState
from monitor.health import Rows

log = logs.get("tsmon.daemon")

ROWS_WANTED_S = 60.0  # the /streams rows are built at each commit interval while asked for within this long
ROWS_FRESH_S = 2.0  # older rows are built again for a request, at the loop's next turn ...
ROWS_WAIT_S = 3.0  # ... which it waits for this long at most (a hung loop: the last rows); tsmon status waits 5 s


class Views(DaemonState):
    """See the module docstring."""

    def _init_views(self) -> None:
        self._beat = time.monotonic()  # the loop's last turn, for /healthz
        self._ready = (False, "starting")
        self._rows = Rows()  # /streams, refreshed by the loop while someone reads it
        self._rows_at = -math.inf  # monotonic time the loop built them
        self._rows_wanted = -math.inf  # ... and /streams was last asked for
        self._rows_built = threading.Event()
        self._rows_asked = False  # a request waits for rows: the loop builds them at its next turn
        self._lags = {}  # the last refresh's, for rows built between refreshes
        self._lags_at = -math.inf  # monotonic time of that refresh
        self._lag_labels = set()
        self._held_labels = set()  # partitions with a tsmon_uncommitted_records series

    def _health(self) -> tuple[bool, str]:
        age = time.monotonic() - self._beat
        limit = self.cfg.http.stall_s  # the changelog is opened in a thread of its own: the loop turns meanwhile
        ok = age < limit
        return ok, f"loop turned {age:.1f} s ago" + ("" if ok else f" (limit {limit:g} s)")

    def _streams_view(self) -> list[dict[str, Any]]:
        """``/streams`` (an HTTP thread): rows the loop built within ``ROWS_FRESH_S``, else the ones it builds at
        its next turn — not its next commit interval: with commit_interval_ms at 10 s ``tsmon status`` timed out
        (a hung loop: the last ones, after ``ROWS_WAIT_S``)."""
        self._rows_wanted = now = time.monotonic()
        if now - self._rows_at > ROWS_FRESH_S:
            self._rows_built.clear()
            self._rows_asked = True
            self._rows_built.wait(ROWS_WAIT_S)
        return self._rows

    def _build_rows(self) -> None:
        """The ``/streams`` rows, built on the loop's thread when asked for. A failure is logged, and the request
        answered with the rows built before: it must not stop the loop (a restored silence past year 9999 did)."""
        try:
            rows, refusing = self.processor.status_rows(self._lags), self._refusing
            for row in rows:  # the per-stream warnings are throttled: here every refused stream is named
                row["raise_refused"] = refusing.get(row["stream"])
            self._rows, self._rows_at = Rows(rows), time.monotonic()  # handed out as is: never changed after
        except Exception as exc:  # noqa: BLE001 — a view, not the data path
            self.processor.throttle.log(log.error, "streams_view_failed", error=describe(exc)[:300],
                                        consequence="/streams answers the rows built before")
        self._rows_asked = False
        self._rows_built.set()

    def _control_gauges(self) -> None:
        """How many held streams are silenced, pinned and frozen, and the daemon-wide freeze: an operator's controls
        were only in ``/streams`` (``tsmon_threshold``'s source is the version's, never "frozen")."""
        cal, p = self.processor.calibrator, self.processor
        self.metrics.silenced.set(sum(p.silenced(st) for st in p.streams.values()))
        # held ones reported silent: counted here too, or it kept streams revoked, evicted or back since (it was set
        # only where silence is judged, which waits while input is paused: wrong for a whole outage)
        self.metrics.silent.set(sum(st.silent_ts is not None for st in p.streams.values()))
        pinned, frozen = cal.control_counts()
        self.metrics.pinned.set(pinned)
        self.metrics.frozen.set(frozen)
        self.metrics.frozen_all.set(int(cal.frozen_all))

    def _refresh_views(self) -> None:
        """The loop's state for the HTTP threads: replaced, never mutated."""
        assigned = self.source.assignment()
        lags = self.source.lags() if hasattr(self.source, "lags") else {}
        for topic, partition in self._lag_labels - set(lags):  # revoked: no stale lag to alert on
            self.metrics.lag.remove(topic, str(partition))
        for (topic, partition), lag in lags.items():
            self.metrics.lag.labels(topic, str(partition)).set(lag)
        self._lag_labels, self._lags, self._lags_at = set(lags), lags, time.monotonic()
        held = self.processor.uncommitted(assigned)
        self._note_refusals(lambda _s: True, {})  # revoked or evicted since the last recalibration: dropped
        for topic, partition in self._held_labels - set(held):
            self.metrics.uncommitted.remove(topic, str(partition))
        for (topic, partition), n in held.items():
            self.metrics.uncommitted.labels(topic, str(partition)).set(n)
        self._held_labels = set(held)
        self._control_gauges()
        now = time.monotonic()
        if self.http is not None and now - self._rows_wanted < ROWS_WANTED_S:  # one row per stream (64–107 ms at
            # 10 000 streams: built every commit interval, it took 6–11 % of the loop): only while someone reads them
            self._build_rows()
        if self.restoring:  # _restore_step says how far it is
            return
        if self._unassigned:  # revoked, the assignment not come yet (kafka-python still lists the partitions)
            self._ready = (False, REBALANCING)
        elif self._problem or self.input_reader.problem:
            self._ready = (False, self._problem or self.input_reader.problem or "")
        else:
            self._ready = (True, f"{len(assigned)} partition(s) assigned") if assigned else (False, "no partition assigned")
