"""The ``tsmon`` command line: train, eval, score, inspect, bench, demo, broker, run, replay, replay-eval, status, tail.

Every failure the user can cause ends in one line ``ErrorType: message`` on stderr and exit status 1.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from models.errors import TsmonError, describe
from monitor import __version__, logs
from monitor.commands.render import emit_json

# Each command module is imported only when its command runs: the model commands import torch and pandas, which
# made `tsmon ctl`, `tsmon status` and `tsmon tail` wait ~3 s (10 s under load) before doing anything, and a
# `ctl --timeout 3` against a dead broker took 11.7 s. `tsmon`, `tsmon --help` and every other command load all.
MODULES = ("model_cmds", "broker_cmd", "run_cmd", "status_cmd", "ctl_cmd", "demo_cmd", "replay_eval_cmd", "tail_cmd")
LIGHT = {"ctl": "ctl_cmd", "status": "status_cmd", "tail": "tail_cmd", "broker": "broker_cmd"}
VALUED = ("--log-level", "--log-format")  # the root's options that take a value
out = Console()


def _version(value: bool) -> None:
    if value:
        out.print(f"tsmon {__version__}")
        raise typer.Exit()


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


def build(modules: Sequence[str] = MODULES) -> typer.Typer:
    """The ``tsmon`` app with the commands of ``modules`` (under ``monitor.commands``); ``bench`` with them all."""
    root = typer.Typer(name="tsmon", help="Streaming time-series anomaly monitor.", no_args_is_help=True,
                       pretty_exceptions_enable=False, add_completion=False)
    root.callback()(_root)
    whole = tuple(modules) == MODULES
    bench = typer.Typer(help="Benchmarks that print ratios measured in one run.", no_args_is_help=True)
    if whole:
        root.add_typer(bench, name="bench")  # first, as --help has always listed it
    for name in modules:
        importlib.import_module(f"monitor.commands.{name}").register(root)
    if whole:
        importlib.import_module("monitor.commands.bench_cmd").register(bench)
    return root


def command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (its first word past the root's options), or None — also after the root's own
    ``--help`` (`tsmon --help ctl` lists every command)."""
    args = iter(argv)
    for arg in args:
        if arg == "--help":
            return None
        if arg in VALUED:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def __getattr__(name: str) -> Any:  # `monitor.cli.app`: the whole CLI (tests, documentation)
    if name == "app":
        return build()
    raise AttributeError(f"module 'monitor.cli' has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one-line errors, exit codes 0 / 1 (tsmon error) / 2 (usage)."""
    try:
        args = sys.argv[1:] if argv is None else argv
        light = LIGHT.get(command_of(args) or "")
        build((light,) if light else MODULES)(args=args, prog_name="tsmon")  # usage errors: typer exits 2
    except TsmonError as exc:
        sys.stderr.write(f"{describe(exc)}\n")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        sys.stderr.write("aborted\n")
        raise SystemExit(130) from None
    except OSError as exc:  # unreadable/unwritable paths the commands did not anticipate
        sys.stderr.write(f"OSError: {exc}\n")
        raise SystemExit(1) from None


__all__ = ["Path", "build", "command_of", "emit_json", "main"]
