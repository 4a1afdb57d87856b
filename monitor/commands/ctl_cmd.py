"""``tsmon ctl``: operators' commands to running daemons (signed, acknowledged, audited)."""

from __future__ import annotations

import getpass
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from models.errors import ConfigError
from monitor import ctl
from monitor.alerts import iso
from monitor.calibrator import MAX_QUANTILE
from monitor.commands.options import bootstrap_option
from monitor.commands.render import emit_json, stdout
from monitor.config import load_config
from monitor.control import exact_target

app = typer.Typer(help="Operator commands to running daemons: signed with control.key, acknowledged, audited.",
                  no_args_is_help=True)

Stream = Annotated[str | None, typer.Option("--stream", help="Stream id, or a glob such as 'ecg-*'.")]
Exact = Annotated[bool, typer.Option("--exact", help="--stream is one stream's id as it is, not a glob (for an id "
                                                     "with * ? or [ in it).")]
All = Annotated[bool, typer.Option("--all", help="Every stream (for freeze/unfreeze: daemon-wide).")]
Config = Annotated[Path | None, typer.Option("--config", help="TOML configuration (kafka, control.key).")]
Bootstrap = Annotated[str | None, bootstrap_option("host:port of a broker (default: kafka.bootstrap_servers).")]
Operator = Annotated[str | None, typer.Option(help="Who is acting (default: the login name).")]
Reason = Annotated[str, typer.Option(help="Why; goes to the audit topic.")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait for acknowledgements.")]
Json = Annotated[bool, typer.Option("--json", help="Print the acknowledgements as JSON.")]
Quantile = Annotated[float | None, typer.Option(help="Quantile of recent normal errors (default: the stream's own).")]


def _login() -> str:
    """The login name for ``--operator``; an arbitrary uid with no passwd entry (OpenShift) made getuser raise."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        raise ConfigError("no login name for this user id: give --operator NAME") from None


def _target(stream: str | None, all_: bool | None = None, required: bool = True, exact: bool = False) -> str:
    """What the daemons match stream ids against (an fnmatch glob); ``exact``: ``stream``'s glob characters
    escaped, so that ``pump[1]`` names that stream and not ``pump1``, on every instance alike."""
    if exact and not stream:  # usage errors (exit 2), as typer's own are
        raise typer.BadParameter("--exact needs --stream ID", param_hint="--exact")
    if stream and all_:
        raise typer.BadParameter("give --stream or --all, not both", param_hint="--stream")
    if not stream and not all_:
        if required:
            # every stream of a command without --all: a glob such as '*' says it (pin once named --all it lacks)
            raise typer.BadParameter("give --stream S (a glob is fine)" + (" or --all" if all_ is not None else
                                                                           ": '*' for every stream"),
                                     param_hint="--stream")
        return "*"
    if all_:
        return "*"
    return exact_target(str(stream)) if exact else str(stream)


def _run(command: str, target: str, params: dict[str, Any], config: Path | None, bootstrap: str | None,
         operator: str | None, reason: str, timeout: float, as_json: bool) -> None:
    _check(params)
    if not 1.0 <= timeout < math.inf:  # below a second not even a healthy broker answers: it read as its failure
        raise typer.BadParameter(f"must be at least 1 second, got {timeout:g}", param_hint="--timeout")
    cfg = load_config(config, {"kafka.bootstrap_servers": [bootstrap]} if bootstrap else None)
    answers = ctl.send(cfg, command, target, params, operator or _login(), reason, timeout)
    if as_json:
        emit_json(answers.acks)
    elif answers.acks:  # none: the verdict's one line says so (an empty table came before it)
        _show(answers.acks)
    ctl.verdict(command, target, answers.acks, timeout, answers.unanswered)


def _check(params: dict[str, Any]) -> None:
    """Refuse what no instance could apply before sending it (NaN is not even JSON): usage errors, as --timeout's."""
    threshold, quantile = params.get("threshold"), params.get("quantile")
    if threshold is not None and not 0.0 < threshold < math.inf:
        raise typer.BadParameter(f"must be finite and > 0, got {threshold}", param_hint="--threshold")
    if quantile is not None and not 0.0 < quantile <= MAX_QUANTILE:  # the calibrator's highest, as in the config
        raise typer.BadParameter(f"must be in (0, {MAX_QUANTILE}], got {quantile}", param_hint="--quantile")


def _show(acks: list[dict[str, Any]]) -> None:
    table = Table("instance", "status", "streams", "effect / result", title="acknowledgements")
    for a in acks:
        # Text: a stream id is never markup ("sensor[/x]" raised MarkupError after the command was applied)
        table.add_row(*(Text(c) for c in (str(a["instance"]), _status(a), str(_streams(a)), _effect(a))))
    stdout.print(table)


def _status(a: dict[str, Any]) -> str:
    """The instance's answer; "no match" for a command it applied to nothing (read as done beside the verdict's
    "no daemon has a stream matching"); "not found" for feedback on an alert it does not know ("applied" beside
    the verdict's failure, an on-call pass)."""
    if (a["result"] or {}).get("found") is False:
        return "not found"
    return "no match" if _matched_nothing(a) else str(a["status"])


def _streams(a: dict[str, Any]) -> int:
    """The streams it changed, or those it reports on (history, shadow: 0 beside a stream's history before)."""
    r = a["result"] or {}
    return len(a["streams"]) or len(r.get("history") or {}) or len(r.get("shadow") or {})


def _matched_nothing(a: dict[str, Any]) -> bool:
    """Applied to no stream here: nothing changed and nothing to report (a result of empty lists: recalibrate's
    refused/held/unchanged, history, shadow). Not a daemon-wide freeze or unfreeze, which applies without one."""
    if a.get("command") in ("freeze", "unfreeze") and a.get("target") == "*" or a.get("command") == "silences":
        return False
    told = (v for k, v in a["result"].items() if k not in ("still_covered_by", "standing_refused", "not_lifted"))
    return a["status"] == "applied" and not a["error"] and not a["streams"] and \
        not any(told) and not any("before" in e for e in a["effects"])


def _effect(a: dict[str, Any]) -> str:
    if a["error"]:
        return str(a["error"])
    lines = [f"{e['stream']}: {_fmt(e.get('before'))} -> {_fmt(e.get('after'))}" for e in a["effects"]
             if "before" in e]
    r = a["result"]
    for stream, versions in r.get("history", {}).items():
        lines += [f"{stream} v{v['version']}: {v['value']:.6g} {v['source']} {_when(v.get('updated_ms'))} {v['reason']}"
                  for v in versions]
    for stream, sh in r.get("shadow", {}).items():
        if "error" in sh:
            lines.append(f"{stream}: {sh['error']}")
            continue
        cur, cand, margin = sh["current"], sh["candidate"], sh.get("margin", 1.0)  # absent from older daemons'
        rule = f"q{sh['quantile']:g}" + (f" × {margin:g}" if margin != 1.0 else "")
        if sh.get("path") == "new normal":  # recalibrate takes this one only once the drift guard accepts it
            rule = f"new normal (a level shift: every recent window's) {rule}"
        lines.append(f"{stream} over last {sh['windows']} windows: now {cur['threshold']:.6g} -> "
                     f"{cur['windows_over']} over, {cur['alerts']} alerts; {rule} "
                     f"{cand['threshold']:.6g} -> {cand['windows_over']} over, {cand['alerts']} alerts")
    lines += [f"{s}: refused: {why}" for s, why in r.get("refused", {}).items()]
    lines += [f"{s}: skipped: {why}" for s, why in r.get("held", {}).items()]  # under --all or a glob (was --json only)
    if asleep := r.get("asleep_passed"):  # idle streams an undo under a glob left asleep: counted, not listed
        lines.append(f"{asleep['count']} idle stream(s) skipped: {asleep['why']}")
    because = r.get("unchanged_because") or {}  # "applied" over "-": as if nothing had been looked at (a new user)
    lines += [f"{s}: unchanged" + (f": {because[s]}" if s in because else "") for s in r.get("unchanged", [])]
    if standing := r.get("standing"):  # kept: the streams that start while it runs are silenced too
        none = "" if a["streams"] else "no stream here matches it now; "  # (a typo read as done)
        lines.append(f"{none}standing silence: new streams matching {standing['pattern']!r} that start before "
                     f"{_when(standing['until_ms'])} start silenced")
    lines += [f"standing silence of {p!r} lifted: new streams that start from now are not silenced"
              for p in r.get("lifted", [])]
    lines += [f"new streams matching {p!r} still start silenced (its standing silence): unsilence {p!r} to lift it"
              for p in r.get("still_covered_by", [])]
    lines += [f"standing silence of {p!r} not lifted (it matches streams this glob does not): new streams it matches "
              f"still start silenced; unsilence {p!r} to lift it"
              for p in r.get("not_lifted", [])]
    if "silences" in r:  # ctl silences: the standing ones running
        lines += [f"standing silence of {x['pattern']!r} until {_when(x['until_ms'])} (command {x['command_id']})"
                  for x in r["silences"]] or ["no standing silence running"]
    if refused := r.get("standing_refused"):
        lines.append(f"not kept as a standing silence: {refused}")
    if r.get("found") is False:  # feedback for an alert this instance does not know: "applied" over "-" read as done
        lines.append(f"no recent alert {r.get('alert_id')} here")
    if "precision" in r:
        p = r["precision"]
        counts = r.get("feedback") or {}
        told = f"confirmed {counts.get('confirmed', 0)}, false positives {counts.get('false_positive', 0)}"
        lines.append(f"{r['verdict']}; precision {p:.3f} ({told})" if p is not None else r["verdict"])
    if not lines and _matched_nothing(a):
        return "no stream of this instance matched"  # "applied" over a bare "-" read as done, above "no daemon has…"
    return "\n".join(lines) or "-"


def _when(ms: Any) -> str:
    """A version's time: ISO 8601, or "initial" for the artifact's value (0)."""
    return iso(int(ms)) if isinstance(ms, int) and not isinstance(ms, bool) and ms > 0 else "initial"


def _fmt(view: dict[str, Any] | None) -> str:
    """A stream's threshold and controls; a silence with its end, and only while it runs (one that had ended read
    "silenced", and re-silencing a stream for less did not say it shortened the silence)."""
    if not view:
        return "-"
    until = view.get("silenced_until_ms")
    running = isinstance(until, int | float) and not isinstance(until, bool) and until > time.time() * 1000
    flags = [f for f in ("pinned", "frozen") if view.get(f)] + ([f"silenced until {iso(int(until))}"] if running else [])
    return f"{view['threshold']:.6g} ({view['source']} v{view['version']}{', ' + ', '.join(flags) if flags else ''})"


@app.command()
def recalibrate(stream: Stream = None, all_: All = False, quantile: Quantile = None, config: Config = None,
                bootstrap: Bootstrap = None, operator: Operator = None, reason: Reason = "", timeout: Timeout = 10.0,
                as_json: Json = False, exact: Exact = False) -> None:
    """Recalibrate now from the recent normal errors (the drift guard may refuse a raise, and says why)."""
    params = {} if quantile is None else {"quantile": quantile}
    _run("recalibrate", _target(stream, all_, exact=exact), params, config, bootstrap, operator, reason, timeout,
         as_json)


@app.command()
def pin(threshold: Annotated[float, typer.Option(help="The threshold to hold.")], stream: Stream = None,
        config: Config = None, bootstrap: Bootstrap = None, operator: Operator = None, reason: Reason = "",
        timeout: Timeout = 10.0, as_json: Json = False, exact: Exact = False) -> None:
    """Hold a stream's threshold at a value; calibration leaves it alone until unpin."""
    _run("pin", _target(stream, exact=exact), {"threshold": threshold}, config, bootstrap, operator, reason, timeout,
         as_json)


@app.command()
def unpin(stream: Stream = None, config: Config = None, bootstrap: Bootstrap = None, operator: Operator = None,
          reason: Reason = "", timeout: Timeout = 10.0, as_json: Json = False, exact: Exact = False) -> None:
    """Back to the value before the pin; calibration resumes."""
    _run("unpin", _target(stream, exact=exact), {}, config, bootstrap, operator, reason, timeout, as_json)


@app.command()
def freeze(stream: Stream = None, all_: All = False, config: Config = None, bootstrap: Bootstrap = None,
           operator: Operator = None, reason: Reason = "", timeout: Timeout = 10.0, as_json: Json = False,
           exact: Exact = False) -> None:
    """Stop calibration for a stream, or for all (--all)."""
    _run("freeze", _target(stream, all_, exact=exact), {}, config, bootstrap, operator, reason, timeout, as_json)


@app.command()
def unfreeze(stream: Stream = None, all_: All = False, config: Config = None, bootstrap: Bootstrap = None,
             operator: Operator = None, reason: Reason = "", timeout: Timeout = 10.0, as_json: Json = False,
             exact: Exact = False) -> None:
    """Resume calibration."""
    _run("unfreeze", _target(stream, all_, exact=exact), {}, config, bootstrap, operator, reason, timeout, as_json)


@app.command()
def silence(for_: Annotated[str, typer.Option("--for", help="How long: 90s, 30m, 2h, 1d.")], stream: Stream = None,
            config: Config = None, bootstrap: Bootstrap = None, operator: Operator = None, reason: Reason = "",
            timeout: Timeout = 10.0, as_json: Json = False, exact: Exact = False) -> None:
    """Record the stream's alerts as silenced instead of publishing them as firing, for a while."""
    try:
        for_s = ctl.duration_s(for_)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--for: "), param_hint="--for") from None
    _run("silence", _target(stream, exact=exact), {"for_s": for_s}, config, bootstrap, operator, reason, timeout,
         as_json)


@app.command()
def unsilence(stream: Stream = None, config: Config = None, bootstrap: Bootstrap = None, operator: Operator = None,
              reason: Reason = "", timeout: Timeout = 10.0, as_json: Json = False, exact: Exact = False) -> None:
    """End a silence now (an alert still open is then published as firing)."""
    _run("unsilence", _target(stream, exact=exact), {}, config, bootstrap, operator, reason, timeout, as_json)


@app.command("reset-stream")
def reset_stream(stream: Stream = None, config: Config = None, bootstrap: Bootstrap = None, operator: Operator = None,
                 reason: Reason = "", timeout: Timeout = 10.0, as_json: Json = False, exact: Exact = False) -> None:
    """Forget the stream's windows, alert state and calibration (an open alert is resolved)."""
    _run("reset-stream", _target(stream, exact=exact), {}, config, bootstrap, operator, reason, timeout, as_json)


@app.command()
def feedback(alert: Annotated[str, typer.Option("--alert", help="The alert_id.")],
             false_positive: Annotated[bool, typer.Option("--false-positive", help="It was normal.")] = False,
             confirmed: Annotated[bool, typer.Option("--confirmed", help="It was a real anomaly.")] = False,
             config: Config = None, bootstrap: Bootstrap = None, operator: Operator = None, reason: Reason = "",
             timeout: Timeout = 10.0, as_json: Json = False) -> None:
    """On-call verdict on an alert: false positives widen the stream's calibration evidence."""
    if false_positive == confirmed:
        raise typer.BadParameter("give exactly one of --false-positive or --confirmed", param_hint="--confirmed")
    verdict = "false_positive" if false_positive else "confirmed"
    _run("feedback", "*", {"alert_id": alert, "verdict": verdict}, config, bootstrap, operator, reason, timeout,
         as_json)


@app.command()
def history(stream: Stream = None, config: Config = None, bootstrap: Bootstrap = None, operator: Operator = None,
            reason: Reason = "", timeout: Timeout = 10.0, as_json: Json = False, exact: Exact = False) -> None:
    """Every threshold version of the stream, with its source and reason."""
    _run("history", _target(stream, exact=exact), {}, config, bootstrap, operator, reason, timeout, as_json)


@app.command()
def silences(stream: Stream = None, config: Config = None, bootstrap: Bootstrap = None, operator: Operator = None,
             reason: Reason = "", timeout: Timeout = 10.0, as_json: Json = False, exact: Exact = False) -> None:
    """The standing silences running (every one; with --stream, those that can silence a stream it matches)."""
    target = "*" if stream is None and not exact else _target(stream, exact=exact)
    _run("silences", target, {}, config, bootstrap, operator, reason, timeout, as_json)


@app.command()
def rollback(to: Annotated[int, typer.Option("--to", help="Version number (see history).", min=0)], stream: Stream = None,
             config: Config = None, bootstrap: Bootstrap = None, operator: Operator = None, reason: Reason = "",
             timeout: Timeout = 10.0, as_json: Json = False, exact: Exact = False) -> None:
    """Set the threshold of a former version again (as a new version)."""
    _run("rollback", _target(stream, exact=exact), {"version": to}, config, bootstrap, operator, reason, timeout,
         as_json)


@app.command()
def shadow(stream: Stream = None, quantile: Quantile = None, config: Config = None, bootstrap: Bootstrap = None,
           operator: Operator = None, reason: Reason = "", timeout: Timeout = 10.0, as_json: Json = False,
           exact: Exact = False) -> None:
    """Dry run: what a threshold at this quantile would have alerted over the recent windows."""
    params = {} if quantile is None else {"quantile": quantile}
    _run("shadow", _target(stream, exact=exact), params, config, bootstrap, operator, reason, timeout, as_json)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="ctl")
