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


def not_with(options: dict[str, Any], reason: str) -> None:
    """Options that do not apply here (each one given: a truthy value) are a usage error naming them, not dropped
    without a word (``train --data ecg5000 --window -5`` trained two minutes on the 140-sample beats)."""
    given = [name for name, value in options.items() if value]
    if given:
        raise typer.BadParameter(reason, param_hint=" / ".join(given))
