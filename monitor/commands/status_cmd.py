"""``tsmon status``: the running daemon's streams, read from its ``/streams`` endpoint."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from models.errors import ConfigError, TsmonError
from monitor.commands.render import emit_json, stdout
from monitor.config import load_config

TIMEOUT_S = 5.0
WIDE = 400  # piped output: one line per stream, never wrapped
COLUMNS = ("stream", "model", "last sample", "windows", "threshold", "source", "alert", "silenced", "lag",
           "held back", "precision")
NUMERIC = ("windows", "threshold", "lag", "held back", "precision")


def status(
    url: Annotated[list[str] | None, typer.Option(
        help="Daemon's HTTP address (default: http.host and http.port of the configuration); repeat it for every "
             "instance of a group: each answers for the streams it holds.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML configuration file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Show each stream of a running daemon: model, last sample, threshold, alert state, lag."""
    if not url:
        http = load_config(config).http
        if http.port == 0:  # it said "cannot reach the tsmon daemon at http://127.0.0.1:0: Connection refused"
            raise ConfigError("http.port is 0 in the configuration: the daemon chose a free port at start (its log's "
                              "http_listening line gives it): give --url")
        url = [f"http://{http.host}:{http.port}"]
    rows, failed = _gather(url)
    if as_json:
        emit_json(rows)
    elif not rows:
        stdout.print("no streams yet")
    else:
        (stdout if stdout.is_terminal else Console(width=WIDE)).print(streams_table(rows))
    if failed:  # the others' rows are shown: one instance down is when the rest are wanted
        raise failed[0] if len(failed) == 1 else TsmonError(
            f"{len(failed)} of {len(set(url))} daemons did not answer: " + "; ".join(str(e) for e in failed))


def _gather(urls: list[str]) -> tuple[list[dict[str, Any]], list[TsmonError]]:
    """Every daemon's rows, each tagged with the ``instance`` (its address) that holds it where there are several;
    and the errors of those that did not answer. (A Service in front of a group answers from one instance a request:
    half the streams, another half each time, as if streams were lost — a review.)"""
    if len(urls) == 1:
        return fetch_streams(urls[0]), []
    rows: list[dict[str, Any]] = []
    failed: list[TsmonError] = []
    for url in dict.fromkeys(urls):
        try:
            rows += [{"instance": url, **row} for row in fetch_streams(url)]
        except TsmonError as exc:
            failed.append(exc)
    return rows, failed


def fetch_streams(url: str) -> list[dict[str, Any]]:
    """The daemon's stream rows; an unreachable or unexpected answer raises :class:`TsmonError`. ``host:port``
    means http, and a URL of ``/streams`` itself is taken as given (they read "unknown url type" and 404)."""
    base = url.strip().rstrip("/").removesuffix("/streams")
    if "://" not in base:
        base = f"http://{base}"
    try:
        with urllib.request.urlopen(f"{base}/streams", timeout=TIMEOUT_S) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raise TsmonError(f"the tsmon daemon at {base} answered HTTP {exc.code} for /streams") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, timeouts, refusals, a malformed URL
        # (InvalidURL, for spaces in it, is an HTTPException: a traceback before)
        reason = getattr(exc, "reason", None) or exc
        raise TsmonError(f"cannot reach the tsmon daemon at {base}: {reason} (is it running with http enabled?)"
                         ) from None
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    rows = body.get("streams") if isinstance(body, dict) else None
    if not isinstance(rows, list):
        raise TsmonError(f"the answer of {base}/streams has no stream list: is it a tsmon daemon?")
    return rows


def streams_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title=f"{len(rows)} stream{'s' if len(rows) != 1 else ''}")
    several = any("instance" in r for r in rows)
    for name in ("instance",) * several + COLUMNS:
        t.add_column(name, justify="right" if name in NUMERIC else "left")
    for r in rows:
        cells = [_cell(r.get("instance"))] * several + stream_cells(r)
        t.add_row(*(Text(c) for c in cells))  # Text: a stream id is never markup
    return t


def stream_cells(r: dict[str, Any]) -> list[str]:
    source = _cell(r.get("threshold_source"))
    if source != "-" and r.get("threshold_version") is not None:
        source += f" v{r['threshold_version']}"
    if r.get("threshold_held"):  # why it does not come down: /streams (status --json) gives the reason
        source += " (lowering held)"
    if r.get("raise_refused"):  # the drift guard's refusal: the reason is in --json too
        source += " (raise refused)"
    if r.get("provisional") is True:  # started after a restore cut short: its pin, silence, threshold not read
        source += " (provisional)"
    alert = _cell(r.get("alert_state"))
    if r.get("alert_id"):
        alert += f" {r['alert_id']}"  # whole: ctl feedback --alert needs it (8 characters matched nothing)
    threshold = r.get("threshold")
    last = _time(r.get("last_sample_time")) + (" (silent)" if r.get("silent") is True else "")
    return [_cell(r.get("stream")), _cell(r.get("model")), last,
            _cell(r.get("windows_scored")), f"{threshold:.4g}" if _number(threshold) else _cell(threshold),
            source, alert, _time(r.get("silenced_until_time")), _cell(r.get("lag")),
            _cell(r.get("holding_back")), _precision(r.get("precision"))]


def _cell(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _time(v: Any) -> str:
    """An ISO time as given, or epoch milliseconds as ISO UTC."""
    if _number(v):
        return datetime.fromtimestamp(v / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return _cell(v)


def _precision(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else _cell(v)


def register(app: typer.Typer) -> None:
    app.command()(status)
