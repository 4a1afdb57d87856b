"""Options shared by several commands, and their checks (typer callbacks: a bad value is a usage error, exit 2)."""

from __future__ import annotations

from typing import Any

import typer

from monitor.config import bootstrap_problem


def brokers(value: str | None) -> str | None:
    """``--bootstrap-servers`` / ``--bootstrap``: each comma-separated address must be host:port. Left to the
    configuration's check, a bad one was a ConfigError (exit 1) blamed on wherever the configuration came from."""
    if value is not None:
        for server in value.split(","):
            if (problem := bootstrap_problem(server.strip())) is not None:
                raise typer.BadParameter(problem)
    return value


def bootstrap_option(help: str) -> Any:
    """The broker option of every command that reaches one: both spellings, each address checked (:func:`brokers`)."""
    return typer.Option("--bootstrap-servers", "--bootstrap", callback=brokers, help=help)


# bounds of count options, so that a number past them is a usage error, not a traceback from numpy or torch (a
# 1e23 --hop failed as an index, a 1e20 --seed overflowed torch's generator, a 1e11 --window tried 400 GB)
MAX_COUNT = 2**31 - 1
MAX_WINDOW = 1_000_000  # samples in one window
MAX_SEED = 2**32 - 1
MAX_STREAMS = 1_000_000


def not_with(options: dict[str, Any], reason: str) -> None:
    """Options that do not apply here (each one given: a truthy value) are a usage error naming them, not dropped
    without a word (``train --data ecg5000 --window -5`` trained two minutes on the 140-sample beats)."""
    given = [name for name, value in options.items() if value]
    if given:
        raise typer.BadParameter(reason, param_hint=" / ".join(given))
