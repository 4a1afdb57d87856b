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
