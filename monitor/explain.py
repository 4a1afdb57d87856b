"""Why an alert fired: a compact, bounded ``explain`` payload for the alert message, and its picture.

Owns the ``"explain"`` object a firing alert carries (one scored window: raw signal, reconstruction,
error per timestep, error per channel, score and threshold) and :func:`render`, which draws it from an
alert message alone, without the model. The payload is JSON-safe (non-finite floats become ``null``),
rounded to 5 significant digits and downsampled to at most ``max_points`` samples per series, so its
size does not grow with the window length; a window of more than ``max_channels`` channels carries the series
of the ones with the largest error only (``channels_total`` says of how many), so it does not grow without
bound with the channels either (256 channels made a firing alert of 1.1 MB, over the producer's 1 MB limit:
never delivered).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.errors import DataError, number, short_repr
from monitor.alerts import over_usual, significant, vs_usual

if TYPE_CHECKING:
    from models.detector import Detector

VERSION = 1  # every channel of the model, in its order
VERSION_SUBSET = 2  # the channels with the largest error only (``channels`` names them; ``channels_total``)
DIGITS = 5  # significant digits kept in the payload
REQUIRED = ("version", "start_ts", "end_ts", "window", "step", "channels", "values", "reconstruction",
            "timestep_error", "channel_error", "score", "threshold")


def for_window(detector: Detector, values: np.ndarray, threshold: float, start_ts: int, end_ts: int,
               max_points: int = 256, max_channels: int = 16) -> dict[str, Any]:
    """The ``explain`` payload of one raw window ``[W, C]`` scored by ``detector`` against ``threshold``."""
    x = np.asarray(values, dtype="float32")[None]
    recon, scores = detector.reconstruct(x)
    return payload(x[0], recon[0], scores.timestep[0], scores.channel[0], detector.names, threshold,
                   float(scores.window[0]), start_ts, end_ts, max_points, max_channels, detector.channel_usual)


def payload(values: np.ndarray, recon: np.ndarray, timestep_error: np.ndarray, channel_error: np.ndarray,
            channel_names: list[str], threshold: float, score: float, start_ts: int, end_ts: int,
            max_points: int = 256, max_channels: int = 16, usual: list[float] | None = None) -> dict[str, Any]:
    """JSON-able explanation of one window; series longer than ``max_points`` are downsampled by ``step``, and
    of more than ``max_channels`` channels only those with the largest error are kept (in channel order): the
    largest over each channel's ``usual`` error where the model gives it, as the alert ranks them."""
    v, r = np.asarray(values, dtype="float64"), np.asarray(recon, dtype="float64")
    err, ch = np.asarray(timestep_error, dtype="float64"), np.asarray(channel_error, dtype="float64")
    if v.ndim != 2 or r.shape != v.shape or err.shape != (v.shape[0],) or ch.shape != (v.shape[1],):
        raise DataError(f"explain: shapes do not match: values {list(v.shape)}, reconstruction {list(r.shape)}, "
                        f"timestep_error {list(err.shape)}, channel_error {list(ch.shape)}")
    if len(channel_names) != v.shape[1]:
        raise DataError(f"explain: {len(channel_names)} channel name(s) for {v.shape[1]} channel(s)")
    if max_points < 1 or max_channels < 1:
        raise DataError(f"explain: max_points and max_channels must be >= 1, got {max_points}, {max_channels}")
    total = v.shape[1]
    ratio = vs_usual(ch, usual)  # each channel's error over its usual one (None: the model does not say)
    if total > max_channels:  # the largest errors (NaN first: a channel that broke the score is the news)
        keep = np.sort(np.argsort(-np.nan_to_num(over_usual(ch, usual), nan=np.inf), kind="stable")[:max_channels])
        v, r, ch, channel_names = v[:, keep], r[:, keep], ch[keep], [channel_names[i] for i in keep]
        ratio = None if ratio is None else ratio[keep]
    window = v.shape[0]
    step = stride(window, max_points)
    return {
        "version": VERSION if total == len(channel_names) else VERSION_SUBSET, "start_ts": int(start_ts), "end_ts": int(end_ts), "window": window, "step": step,
        "channels": [str(n) for n in channel_names], "channels_total": total,
        "values": [_floats(v[::step, c]) for c in range(v.shape[1])],
        "reconstruction": [_floats(r[::step, c]) for c in range(r.shape[1])],
        "timestep_error": _floats(block_max(err, step)),
        "channel_error": _floats(ch),
        "score": _num(score), "threshold": _num(threshold), "loss_units": "normalised",
        **({} if ratio is None else {"channel_vs_usual": _floats(ratio)}),
    }


def stride(window: int, max_points: int) -> int:
    """Step that keeps at most ``max_points`` samples of a ``window``-long series."""
    return max(1, math.ceil(window / max_points))


def block_max(x: np.ndarray, step: int) -> np.ndarray:
    """Maximum of each block of ``step`` samples (NaN ignored unless a whole block is NaN): spikes survive."""
    if step == 1 or len(x) == 0:
        return x
    return np.fmax.reduceat(x, np.arange(0, len(x), step))


def _num(x: float) -> float | None:
    x = float(x)
    return significant(x, DIGITS) if math.isfinite(x) else None


def _floats(xs: np.ndarray) -> list[float | None]:
    return [_num(x) for x in xs.tolist()]


def check(explain: Any) -> None:
    """Raise :class:`DataError` unless ``explain`` is a well-formed payload (keys and lengths)."""
    if not isinstance(explain, dict):
        raise DataError(f"alert 'explain' must be an object, got {type(explain).__name__}")
    missing = [k for k in REQUIRED if k not in explain]
    if missing:
        raise DataError(f"alert 'explain' lacks key(s) {', '.join(missing)}")
    if explain["version"] not in (VERSION, VERSION_SUBSET):
        raise DataError(f"alert 'explain' version {explain['version']!r} unsupported (this tsmon reads "
                        f"{VERSION} and {VERSION_SUBSET})")
    window, step = explain["window"], explain["step"]
    if not (isinstance(window, int) and isinstance(step, int) and window >= 1 and step >= 1):
        raise DataError(f"alert 'explain' window and step must be positive integers, got {window!r}, {step!r}")
    n, channels = math.ceil(window / step), explain["channels"]
    if not isinstance(channels, list) or not channels:
        raise DataError("alert 'explain' channels must be a non-empty list of names")
    for key in ("values", "reconstruction"):
        series = explain[key]
        if not isinstance(series, list) or len(series) != len(channels):
            raise DataError(f"alert 'explain' {key} must hold one series per channel ({len(channels)})")
        if any(not isinstance(s, list) or len(s) != n for s in series):
            raise DataError(f"alert 'explain' {key}: every series must hold {n} points (window {window}, step {step})")
    if not isinstance(explain["timestep_error"], list) or len(explain["timestep_error"]) != n:
        raise DataError(f"alert 'explain' timestep_error must hold {n} points (window {window}, step {step})")
    if not isinstance(explain["channel_error"], list) or len(explain["channel_error"]) != len(channels):
        raise DataError(f"alert 'explain' channel_error must hold one value per channel ({len(channels)})")
    ratio = explain.get("channel_vs_usual")  # absent from pictures of earlier versions and models without usual errors
    if ratio is not None and (not isinstance(ratio, list) or len(ratio) != len(channels)):
        raise DataError(f"alert 'explain' channel_vs_usual must hold one value per channel ({len(channels)})")
    for key in ("score", "threshold"):
        if not _number(explain[key]):
            raise DataError(f"alert 'explain' {key} must be a number or null, got {short_repr(explain[key], 60)}")
    # every point a number or null: [[0.25]] for a channel's error, or an integer of 400 digits, ended in a traceback
    lists = {k: explain[k] for k in ("timestep_error", "channel_error", "channel_vs_usual") if explain.get(k) is not None}
    lists.update({f"{k}[{i}]": s for k in ("values", "reconstruction") for i, s in enumerate(explain[k])})
    for key, xs in lists.items():
        if (bad := next((x for x in xs if not _number(x)), _NONE)) is not _NONE:
            raise DataError(f"alert 'explain' {key} holds a value that is not a number: {short_repr(bad, 60)}")


_NONE = object()


def _number(x: Any) -> bool:
    """A JSON number a float holds (or null)."""
    try:
        return x is None or number(x, "") is not None
    except (TypeError, OverflowError):  # not a number; an integer of 400 digits
        return False


def _array(xs: list[Any]) -> np.ndarray:
    try:
        return np.array([np.nan if x is None else x for x in xs], dtype="float64")
    except (TypeError, ValueError):
        raise DataError("alert 'explain' holds a value that is not a number") from None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def render(doc: dict[str, Any], out: Path) -> Path:
    """Draw the PNG of an alert message's ``explain`` payload to ``out``; return the path."""
    if not isinstance(doc, dict) or "explain" not in doc:
        raise DataError(f"alert {doc.get('alert_id', '?') if isinstance(doc, dict) else '?'} has no 'explain' "
                        "object (only firing messages carry one)")
    e = doc["explain"]
    check(e)
    import matplotlib.pyplot as plt  # slow to import; only pictures need it

    from models.plots import save_figure  # sets the headless Agg backend

    names = [str(n) for n in e["channels"]]
    c, step = len(names), e["step"]
    values, recon = [_array(s) for s in e["values"]], [_array(s) for s in e["reconstruction"]]
    err, ch = _array(e["timestep_error"]), _array(e["channel_error"])
    t = np.arange(len(err)) * step
    fig = plt.figure(figsize=(10, 2.2 * (c + 2)))
    grid = fig.add_gridspec(c + 2, 1)
    first = fig.add_subplot(grid[0, 0])
    for i, name in enumerate(names):
        ax = first if i == 0 else fig.add_subplot(grid[i, 0], sharex=first)
        ax.plot(t, values[i], label=f"{name} (input)", color="tab:blue")
        ax.plot(t, recon[i], label="reconstruction", color="tab:orange", linestyle="--")
        ax.set_ylabel(name)
        ax.set_title(f"{name}: channel error {_fmt(e['channel_error'][i])}", fontsize=9, loc="left")
        ax.legend(loc="upper right", fontsize=8)
    ax = fig.add_subplot(grid[c, 0], sharex=first)
    ax.fill_between(t, np.nan_to_num(err), color="tab:red", alpha=0.5,
                    label="error per timestep" + (f" (max of every {step})" if step > 1 else ""))
    if e["score"] is not None:
        ax.axhline(e["score"], color="tab:red", linestyle="--", label=f"window score {_fmt(e['score'])}")
    if e["threshold"] is not None:
        ax.axhline(e["threshold"], color="black", linestyle=":", label=f"threshold {_fmt(e['threshold'])}")
    ax.set_xlabel(f"sample in window ({e['window']} samples)")
    ax.set_ylabel(f"error ({e.get('loss_units', 'normalised')})")
    ax.legend(loc="upper right", fontsize=8)
    ratio = e.get("channel_vs_usual")
    _contribution(fig.add_subplot(grid[c + 1, 0]), names, ch, None if ratio is None else _array(ratio))
    shown = "" if e.get("channels_total", c) == c else f"  ({c} of {e['channels_total']} channels: largest errors)"
    fig.suptitle(f"{doc.get('stream', '?')}  alert {doc.get('alert_id', '?')}  {doc.get('severity', '?')}  "
                 f"ratio {doc.get('ratio', '?')}×  ({doc.get('start_time', e['start_ts'])}){shown}")
    return save_figure(fig, out)


def _contribution(ax: Any, names: list[str], channel_error: np.ndarray, ratio: np.ndarray | None = None) -> None:
    """Bar chart of each channel's share of the window's error; with each channel's error over its usual one
    (``ratio``), the channel furthest over its usual error — the page's first in ``top_channels`` — in red, and
    every bar labelled with its ratio: by share alone, a noisy channel at 0.85× its usual error stood tallest
    beside a page that named another at 15×."""
    finite = np.nan_to_num(channel_error, nan=0.0, posinf=0.0, neginf=0.0)
    total = float(finite.sum())
    share = finite / total if total > 0 else np.zeros_like(finite)
    colors, labels, title = ["tab:purple"] * len(names), [f"{x:.0%}" for x in share], "per-channel contribution"
    if ratio is not None and np.isfinite(ratio).any():
        usual = np.where(np.isfinite(ratio) & (ratio > 0), finite / np.where(ratio > 0, ratio, 1.0), np.nan)
        colors[int(np.nanargmax(np.nan_to_num(finite - usual, nan=-np.inf)))] = "tab:red"
        labels = [f"{s:.0%} · {r:.3g}× usual" if np.isfinite(r) else f"{s:.0%}"
                  for s, r in zip(share, ratio, strict=True)]
        title += " (red: furthest over its usual error, as the alert ranks channels)"
    bars = ax.bar(names, share, color=colors)
    ax.bar_label(bars, labels=labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of error")
    ax.set_title(title, fontsize=9, loc="left")
