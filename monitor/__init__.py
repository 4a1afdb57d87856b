"""tsmon: streaming time-series anomaly monitor (the daemon side; models live in :mod:`models`)."""

from __future__ import annotations

from models import __version__

__all__ = ["__version__"]
