"""The ``tsmon`` command line: train, eval, score, inspect, bench, demo, broker, run, replay, replay-eval, status, tail.

Every failure the user can cause ends in one line ``ErrorType: message`` on stderr and exit status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from models.errors import TsmonError, describe
from monitor import __version__, logs
from monitor.commands import (
    bench_cmd,
    broker_cmd,
    ctl_cmd,
    demo_cmd,
    model_cmds,
    replay_eval_cmd,
    run_cmd,
    status_cmd,
    tail_cmd,
)
from monitor.commands.render import emit_json

app = typer.Typer(name="tsmon", help="Streaming time-series anomaly monitor.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
bench_app = typer.Typer(help="Benchmarks that print ratios measured in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
out = Console()


def _version(value: bool) -> None:
    if value:
        out.print(f"tsmon {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    log_level: Annotated[str | None, typer.Option(
        help="DEBUG, INFO, WARNING or ERROR (default: INFO; tsmon run: daemon.log_level).")] = None,
    log_format: Annotated[str | None, typer.Option(
        help="json or console (default: console on a terminal; tsmon run: daemon.log_format).")] = None,
) -> None:
    if log_format is not None and log_format not in logs.FORMATS:
        raise typer.BadParameter(f"use {' or '.join(logs.FORMATS)}", param_hint="--log-format")
    if log_level is not None and log_level.upper() not in logs.LEVELS:
        raise typer.BadParameter(f"use {', '.join(logs.LEVELS)}", param_hint="--log-level")
    logs.configure_from_flags(log_level, log_format)


model_cmds.register(app)
broker_cmd.register(app)
run_cmd.register(app)
status_cmd.register(app)
ctl_cmd.register(app)
demo_cmd.register(app)
replay_eval_cmd.register(app)
tail_cmd.register(app)
bench_cmd.register(bench_app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one-line errors, exit codes 0 / 1 (tsmon error) / 2 (usage)."""
    try:
        app(args=argv, prog_name="tsmon")  # usage errors: typer prints them and exits 2
    except TsmonError as exc:
        sys.stderr.write(f"{describe(exc)}\n")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        sys.stderr.write("aborted\n")
        raise SystemExit(130) from None
    except OSError as exc:  # unreadable/unwritable paths the commands did not anticipate
        sys.stderr.write(f"OSError: {exc}\n")
        raise SystemExit(1) from None


__all__ = ["Path", "app", "emit_json", "main"]
