"""The attributes the daemon's parts share, declared in one place (:class:`monitor.daemon.Daemon` sets them).

The daemon is one object written in five modules besides this one: :mod:`monitor.daemon` (wiring, the loop,
signals, shutdown), :mod:`monitor.intake` (how much input is taken, pauses, commits with backoff),
:mod:`monitor.rebalance` (assignments and the changelog restore), :mod:`monitor.recalibration` (scheduled
recalibration, refused raises) and :mod:`monitor.views` (what the HTTP threads read). Each part but the first is a
mixin over :class:`DaemonState`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: importing the parts at run time is the daemon's job
    from monitor.calibrator import Calibrator, ThresholdState
    from monitor.config import Config
    from monitor.controller import Controller
    from monitor.health import HealthServer
    from monitor.metrics import Metrics
    from monitor.processor import Processor
    from monitor.reading import Backoff, InputReader
    from monitor.restoring import Restore
    from monitor.sink import Sink
    from monitor.source import TP, InRecord, Source

REBALANCING = "rebalancing: partitions revoked, waiting for the assignment"  # /readyz, between revoke and assign


class DaemonState:
    """Declarations only: the values, and what each one means, are set by :meth:`monitor.daemon.Daemon.__init__` and
    each part's ``_init_*`` (``_init_views``, ``_init_intake``, ``_init_rebalance``, ``_init_recalibration``)."""

    cfg: Config
    processor: Processor
    source: Source
    sink: Sink
    metrics: Metrics
    calibrator: Calibrator
    controller: Controller
    restorer: Restore
    input_reader: InputReader
    http: HealthServer | None
    stop_event: threading.Event
    threshold_listeners: list[Callable[[str, ThresholdState], None]]
    # readiness and the HTTP views
    _beat: float
    _ready: tuple[bool, str]
    _rows: list[dict[str, Any]]
    _rows_at: float
    _rows_wanted: float
    _rows_built: threading.Event
    _rows_asked: bool
    _lags: dict[TP, int]
    _lags_at: float
    _lag_labels: set[TP]
    _held_labels: set[TP]
    # input held back, commits failing, rebalances
    _problem: str | None
    _paused: set[TP]
    _holding: bool
    _backlog: list[InRecord]
    _retry: Backoff
    _broker_absent: bool
    _kafka: bool
    _restored: bool
    _rewind: dict[TP, int]
    _unassigned: bool
    # recalibration
    _refusing: dict[str, str]
    _refusing_lock: threading.Lock

    @property
    def _input_since(self) -> float:
        """Monotonic time input last came back from a pause: silence before it is not idleness. Kept by the
        processor, whose streams' waits between records do not count a pause either."""
        return self.processor.input_since

    @_input_since.setter
    def _input_since(self, value: float) -> None:
        self.processor.input_since = value

    if TYPE_CHECKING:  # implemented by the other parts (see the module docstring)
        @property
        def restoring(self) -> bool: ...
        def _resume(self, tps: set[TP]) -> None: ...
        def _pause(self, tps: set[TP]) -> None: ...
        def _refresh_views(self) -> None: ...
        def _note_refusals(self, keep: Callable[[str], bool], new: dict[str, str]) -> None: ...
