"""The daemon's view of the one tsmon exception hierarchy (defined in :mod:`models.errors`)."""

from __future__ import annotations

from models.errors import (
    ArtifactError,
    BrokerError,
    ConfigError,
    DataError,
    ModelConfigError,
    SinkBackpressure,
    TsmonError,
)

__all__ = ["ArtifactError", "BrokerError", "ConfigError", "DataError", "ModelConfigError",
           "SinkBackpressure", "TsmonError"]
