"""Alert state of one stream: debounce, episodes with deterministic ids, hysteresis, flapping, severity.

Owns when a stream pages. A stream fires after ``for_windows`` consecutive windows over its threshold
and resolves after ``resolve_after`` consecutive windows under it; everything between is one episode
with one ``alert_id`` = hash(model name and version, stream, first window's start time), so a replay after a restart
produces the same id and consumers can deduplicate. A stream that fired ``flap_max`` times within
``flap_period_ms`` is held firing (``flapping``) until it has been quiet for a whole period, instead of
sending a storm of messages. A page is updated, under the same id with a higher ``revision``, when its episode's
peak rises to a higher severity (minor → major → critical: at most twice) and when it turns flapping, so the
message on a consumer's screen describes the worst window so far; the revision is derived from what the message
says (severity and flapping), so a replay can never send other content under a revision already sent. The
machine also tells the calibrator which windows were normal:
``Step.normal`` (under threshold, no episode open) and ``Step.censored`` (over-threshold windows that were
*noise*: a run shorter than ``for_windows`` that ended without firing; with ``for_windows`` = 1, a
single-window episode under ``major_ratio`` × its threshold once it resolves — else a stream paging on
single windows would feed only windows under its threshold and calibration would ratchet it down, while
a strong single window is an anomaly and must not raise it; see ``AlertSettings.noise``). A flapping
hold changes what pages, not what is learnt: while it keeps an episode open, each window gets the
classification it would get with no alert open (tested window by window on random sequences): a run
that would have fired stands for an episode of its own, not learnt from up to the window that would have
resolved it, and the rest is noise or normal as above. So a stream whose threshold sits too low is not
starved of calibration by the very alert that its low threshold holds open.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

MAX_EPISODE_SCORES = 64  # an episode's over-threshold errors kept for feedback (the first ones)
SEVERITIES = ("minor", "major", "critical")


@dataclass(frozen=True, slots=True)
class AlertSettings:
    for_windows: int = 2
    resolve_after: int = 2
    flap_period_ms: float = 60_000
    flap_max: int = 4
    major_ratio: float = 1.5
    critical_ratio: float = 3.0

    @property
    def noise_run(self) -> int:
        """Over-threshold runs shorter than this may be noise to the calibrator (a single window at least)."""
        return max(self.for_windows, 2)

    def noise(self, run: int, peak_ratio: float) -> bool:
        """Is an over-threshold run of ``run`` windows, at most ``peak_ratio`` × threshold, normal noise?

        Runs too short to page are; with ``for_windows`` = 1, where a single window pages, only a minor one (as
        its message shows it: the ratio rounded to 4 decimals)."""
        return 0 < run < self.noise_run and (self.for_windows > 1 or round(peak_ratio, 4) < self.major_ratio)


@dataclass(frozen=True, slots=True)
class Observation:
    """One scored window of the stream."""

    start_ts: int
    end_ts: int
    start_seq: int  # sample number of the window's first sample
    end_seq: int
    score: float
    threshold: float
    threshold_source: str
    channel_errors: np.ndarray  # [C]
    values: np.ndarray | None = None  # the raw window [W, C], kept for over-threshold windows (pictures)

    @property
    def over(self) -> bool:
        return self.score > self.threshold

    def to_doc(self) -> dict[str, Any]:
        """JSON-able, without the window's values (the firing message already carried its picture)."""
        return {"start_ts": self.start_ts, "end_ts": self.end_ts, "start_seq": self.start_seq,
                "end_seq": self.end_seq, "score": self.score, "threshold": self.threshold,
                "threshold_source": self.threshold_source, "channel_errors": self.channel_errors.tolist()}

    @staticmethod
    def from_doc(doc: dict[str, Any]) -> Observation:
        """Raises ValueError for a score that is not finite or a threshold that is not a finite number > 0 (a
        threshold of 0 in a document divided by zero in the loop at the episode's next window)."""
        score, threshold = float(doc["score"]), float(doc["threshold"])
        if not (math.isfinite(score) and math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"a window's score must be finite and its threshold finite and > 0, got {score!r} and "
                             f"{threshold!r}")
        return Observation(int(doc["start_ts"]), int(doc["end_ts"]), int(doc["start_seq"]), int(doc["end_seq"]),
                           score, threshold, str(doc["threshold_source"]), np.asarray(doc["channel_errors"], "float32"))


@dataclass
class Episode:
    alert_id: str
    start: Observation  # first over-threshold window
    peak: Observation
    fired: Observation | None = None
    last: Observation | None = None  # latest window of the episode
    last_over_ts: int = 0
    windows_over: int = 0
    flapping: bool = False
    silenced: bool = False  # fired while the stream was silenced, and not published as firing since
    scores: list[float] = field(default_factory=list)  # of its over-threshold windows, the first 64 (feedback)
    paged: bool = False  # published as firing at least once (tsmon_alerts_fired_total counts it then)
    last_paging_ts: int = 0  # end of the last window of a run that would page (≥ for windows): a hold waits it out
    # (topic, partition, offset) of its first window's input, as first published; None: not published yet, or
    # restored from a document that did not keep it (unknown then: the restored start names the replay's)
    first_source: tuple[str, int, int] | None = None
    explain: dict[str, Any] | None = None  # the picture of a silenced episode, kept until its page goes out
    severity_sent: str = ""  # of the last firing message paged: a peak of a higher one updates the page
    flapping_sent: bool = False  # the last firing message paged had the flapping mark (a silence can hold it back)

    def add(self, obs: Observation) -> None:
        self.last = obs
        if obs.over:
            self.windows_over += 1
            if len(self.scores) < MAX_EPISODE_SCORES:
                self.scores.append(obs.score)
            self.last_over_ts = obs.end_ts
            if _ratio(obs) > _ratio(self.peak):
                self.peak = obs


def generation_of(doc: dict[str, Any]) -> int:
    """The ``generation`` of an ``alerts`` document (absent before: 0)."""
    g = doc.get("generation", 0)
    if isinstance(g, bool) or not isinstance(g, int) or g < 0:
        raise ValueError(f"generation must be an integer >= 0, got {g!r}")
    return g


UNKNOWN_SOURCE = ("", -1, -1)  # a restored episode's first input, when its document did not keep it
UNKNOWN_SEQ = -1  # a restored window's sample number: of another process (the ledger knows no message for it)


@dataclass(frozen=True, slots=True)
class Transition:
    status: str  # "firing" or "resolved"
    episode: Episode
    escalation: bool = False  # a page sent again: its peak rose to a higher severity, or it turned flapping


@dataclass(frozen=True, slots=True)
class Step:
    transitions: list[Transition]
    normal: bool  # feed this window's score to the calibrator
    censored: int  # over-threshold windows that turned out to be normal noise
    above: float = math.inf  # the lowest threshold they were over (the calibrator's censoring point)


@dataclass
class AlertState:
    stream: str
    model: str
    settings: AlertSettings = field(default_factory=AlertSettings)
    episode: Episode | None = None  # pending (not fired yet) or firing
    under: int = 0
    run: int = 0  # consecutive over-threshold windows, in a fired episode
    run_peak: float = 0.0  # their highest score / threshold
    would_over: int = 0  # over windows of the episode a flapping hold stands in for (0: none open)
    would_peak: float = 0.0  # its highest score / threshold
    fires: deque[int] = field(default_factory=deque)  # end times of the last flap_max firings
    over_floor: float = math.inf  # lowest threshold of the over windows not yet settled as fired or noise
    # model changes this stream went through (each restore of another version's document adds one): part of
    # the alert id from the first on, so a rollback (v1 → v2 → v1) does not rebuild an id already resolved
    generation: int = 0

    def __post_init__(self) -> None:
        # flap_max firings within the period flap: the last flap_max tell (a fixed 64 never saw a 65th)
        self.fires = deque(self.fires, maxlen=self.settings.flap_max)

    @property
    def firing(self) -> bool:
        return self.episode is not None and self.episode.fired is not None

    @property
    def pending(self) -> Episode | None:
        """The episode over the threshold that has not fired yet (not stored: a replay rebuilds it)."""
        return self.episode if self.episode is not None and self.episode.fired is None else None

    @property
    def silenced_open(self) -> bool:
        """A fired episode still open that was recorded as silenced: its page is owed once the silence ends."""
        return self.firing and self.episode.silenced  # type: ignore[union-attr]

    @property
    def hold_seq(self) -> int | None:
        """First sample of the open episode: input before it is not needed to replay the episode."""
        return self.episode.start.start_seq if self.episode else None

    def update(self, obs: Observation) -> Step:
        if obs.over:
            self.over_floor = min(self.over_floor, obs.threshold)
        step = self._update(obs)
        if step.censored:  # noise windows are known only to be over the threshold of their time: the lowest of
            # theirs (the threshold of the window that settles the run is not theirs; it was, before over_floor was kept)
            step = replace(step, above=self.over_floor if math.isfinite(self.over_floor) else obs.threshold)
        if not obs.over and not self.would_over:  # every run before this window is settled
            self.over_floor = math.inf
        return step

    def cut(self) -> Step:
        """A gap in the stream's data: a pending run does not go on across it (an over-threshold window before an
        hour of silence and one after it made two in a row, and paged under ``for`` = 2); it was noise. A fired
        episode stays open: the gap says nothing of whether the anomaly ended — but in a flapping hold, a run too
        short to page ends at the gap as it would with no alert open (it made a paging run with the window after
        the gap, and kept the hold open)."""
        ep = self.pending
        if ep is None:
            flapping = self.firing and self.episode.flapping  # type: ignore[union-attr]
            if flapping and 0 < self.run < self.settings.for_windows and not self.would_over:
                run, peak, above = self.run, self.run_peak, self.over_floor
                self.run, self.run_peak, self.over_floor = 0, 0.0, math.inf
                return Step([], False, run if self.settings.noise(run, peak) else 0, above)
            return Step([], False, 0)
        self.episode = None
        above = self.over_floor
        self.over_floor = math.inf
        noise = int(self.settings.noise(ep.windows_over, _ratio(ep.peak)))
        return Step([], False, ep.windows_over if noise else 0, above)

    def _update(self, obs: Observation) -> Step:
        ep, s = self.episode, self.settings
        if ep is None:
            if not obs.over:
                return Step([], True, 0)
            ep = self.episode = Episode(self._id(obs), obs, obs)
            self.under, self.run, self.run_peak, self.would_over, self.would_peak = 0, 0, 0.0, 0, 0.0
        ep.add(obs)
        if ep.fired is None:  # pending
            if not obs.over:
                self.episode = None
                return Step([], True, ep.windows_over)  # too short to fire: noise (never under for_windows = 1)
            if ep.windows_over >= s.for_windows:
                ep.fired, ep.last_paging_ts = obs, obs.end_ts
                self.run, self.run_peak = ep.windows_over, _ratio(ep.peak)
                self.fires.append(obs.end_ts)
                return Step([Transition("firing", ep)], False, 0)
            return Step([], False, 0)
        if obs.over:
            self.under, self.run, self.run_peak = 0, self.run + 1, max(self.run_peak, _ratio(obs))
            pages = self.would_over or self.run >= s.for_windows  # a run that would page (under for = 1: any window)
            if pages:
                ep.last_paging_ts = obs.end_ts
            # the page is updated by a higher severity, but not by a flapping hold's noise run
            # (or by the flapping mark a silence held back: a review, it was never sent when the severity stayed)
            owed = _rank(peak_severity(ep, s)) > _rank(ep.severity_sent) or ep.flapping and not ep.flapping_sent
            if ep.paged and (pages or not ep.flapping) and owed:
                return Step([Transition("firing", ep, escalation=True)], False, 0)  # the page is updated
            return Step([], False, 0)
        run, peak = self.run, self.run_peak
        self.run, self.run_peak, self.under = 0, 0.0, self.under + 1
        noise = 0  # over windows of a run that ended here and, as outside an alert, was noise
        if run >= s.for_windows or (run and self.would_over):  # would have fired, or extends what would have
            self.would_over, self.would_peak = self.would_over + run, max(self.would_peak, peak)
        else:
            noise = run
        if self.under < s.resolve_after:
            return self._held(ep, noise)
        if not ep.flapping:
            if sum(1 for t in self.fires if obs.end_ts - t <= s.flap_period_ms) >= s.flap_max:
                ep.flapping = True  # the mark updates a page that went out (held back by a silence, as any update)
                return self._closed(ep, Transition("firing", ep, escalation=ep.paged))
            self.episode = None
            return self._closed(ep, Transition("resolved", ep))
        # the hold ends after flap_period_ms without a run that pages: noise runs do not extend it (waiting for no
        # over-threshold window at all, it never ended on a stream of 10 windows a second calibrated at q0.95)
        if obs.end_ts - ep.last_paging_ts < s.flap_period_ms:
            return self._held(ep, noise)
        self.episode = None  # the hold learnt its windows as they came; this one resolves it
        return Step([Transition("resolved", ep)], False, noise + self._would_close())

    def _closed(self, ep: Episode, t: Transition) -> Step:
        """The window that resolves ``ep`` — or would have, had it not started a flapping hold: not learnt
        from, but an episode of one window (``for_windows`` = 1) was noise unless it was strong."""
        self.would_over, self.would_peak = 0, 0.0
        return Step([t], False, int(self.settings.noise(ep.windows_over, _ratio(ep.peak))))

    def _would_close(self) -> int:
        """End the episode the hold stood in for; its over windows that were noise (see ``_closed``)."""
        noise = int(self.settings.noise(self.would_over, self.would_peak))
        self.would_over, self.would_peak = 0, 0.0
        return noise

    def _held(self, ep: Episode, noise: int) -> Step:
        """A window under the threshold that leaves the fired episode ``ep`` open (``noise``: the windows of
        the noise run it ends). In a flapping hold it is learnt from as if no alert were open: normal,
        unless it belongs to an episode that would be open, up to the window that would resolve that."""
        if not ep.flapping:
            return Step([], False, 0)
        if not self.would_over:
            return Step([], True, noise)
        if self.under >= self.settings.resolve_after:
            return Step([], False, self._would_close())
        return Step([], False, 0)

    def to_doc(self) -> dict[str, Any]:
        """The state machine as JSON (the changelog's ``alerts`` part).

        A pending episode (not fired) is left out: the ledger holds the input from its first window, so the
        replay rebuilds it, while a stored one could be stale by the time offsets are committed past it.
        """
        ep = self.episode if self.firing else None
        episode = None if ep is None else {
            "alert_id": ep.alert_id, "start": ep.start.to_doc(), "peak": ep.peak.to_doc(),
            "fired": ep.fired.to_doc() if ep.fired else None, "last": ep.last.to_doc() if ep.last else None,
            "last_over_ts": ep.last_over_ts, "last_paging_ts": ep.last_paging_ts,
            "windows_over": ep.windows_over, "flapping": ep.flapping,
            "silenced": ep.silenced, "scores": ep.scores, "paged": ep.paged,
            "first_source": list(ep.first_source) if ep.first_source else None, "explain": ep.explain,
            "severity_sent": ep.severity_sent, "flapping_sent": ep.flapping_sent}
        return {"episode": episode, "under": self.under, "run": self.run, "run_peak": self.run_peak,
                "would_over": self.would_over, "would_peak": self.would_peak, "fires": list(self.fires),
                "over_floor": self.over_floor if math.isfinite(self.over_floor) else None,
                "generation": self.generation}

    def restore(self, doc: dict[str, Any], replay_from_seq: int) -> None:
        """Continue from :meth:`to_doc`'s output. Sample numbers restart with the process, so an open
        episode is re-anchored at ``replay_from_seq`` (the first sample this process reads)."""
        e = doc["episode"]
        self.generation = generation_of(doc)
        self.under, self.fires = int(doc["under"]), deque((int(t) for t in doc["fires"]), maxlen=self.fires.maxlen)
        floor = doc.get("over_floor")  # absent before: the threshold of the window that settles the run
        self.over_floor = math.inf if floor is None else float(floor)
        if "would_over" in doc:
            self.run, self.run_peak = int(doc["run"]), float(doc["run_peak"])
            self.would_over, self.would_peak = int(doc["would_over"]), float(doc["would_peak"])
        else:  # saved before holds learnt: an open episode learns nothing until its next resolve_after unders
            self.run, self.run_peak = 0, 0.0
            self.would_over, self.would_peak = (self.settings.noise_run, 0.0) if e is not None else (0, 0.0)
        if min(self.under, self.run, self.would_over) < 0 or not self.over_floor > 0 \
                or not (math.isfinite(self.run_peak) and math.isfinite(self.would_peak)):  # a floor of 0 or NaN
            raise ValueError("run counts must be >= 0, peaks finite and over_floor > 0 or null")  # broke the loop
        if e is None:
            self.episode = None
            return
        # sample numbers restart with the process: the old ones would name another message of the new one (an alert's
        # source, published before the stream's next window, e.g. an unsilenced page); -1 is none (UNKNOWN_SEQ)
        obs = {k: replace(Observation.from_doc(e[k]), start_seq=UNKNOWN_SEQ, end_seq=UNKNOWN_SEQ) if e[k] else None
               for k in ("start", "peak", "fired", "last")}
        start = obs["start"]
        if start is None or obs["peak"] is None:
            raise ValueError("an open episode needs its start and peak windows")
        source, picture = e.get("first_source"), e.get("explain")  # absent before: unknown, none
        if source is not None and not (isinstance(source, list) and len(source) == 3 and isinstance(source[0], str)
                                       and all(isinstance(x, int) and not isinstance(x, bool) for x in source[1:])):
            raise ValueError(f"first_source must be [topic, partition, offset] or null, got {source!r}")
        if picture is not None and not isinstance(picture, dict):
            raise ValueError(f"explain must be an object or null, got {type(picture).__name__}")
        paged = bool(e.get("paged", not e["silenced"]))  # absent before: paged unless silenced
        self.episode = Episode(str(e["alert_id"]), replace(start, start_seq=replay_from_seq), obs["peak"],
                               obs["fired"], obs["last"], int(e["last_over_ts"]), int(e["windows_over"]),
                               bool(e["flapping"]), bool(e["silenced"]), [float(x) for x in e["scores"]], paged,
                               int(e.get("last_paging_ts", e["last_over_ts"])),  # absent before: any over window
                               tuple(source) if source else UNKNOWN_SOURCE, picture)
        # absent before: one page sent, at the peak's severity (no update for what was already paged)
        sent = e.get("severity_sent", peak_severity(self.episode, self.settings) if paged else "")
        if sent not in ("", *SEVERITIES):
            raise ValueError(f"severity_sent must be one of {SEVERITIES} or empty, got {sent!r}")
        self.episode.severity_sent = sent
        flapping_sent = e.get("flapping_sent", bool(e["flapping"]) and paged)  # absent before: sent with the mark
        if not isinstance(flapping_sent, bool):
            raise TypeError(f"flapping_sent must be a boolean, got {flapping_sent!r}")
        self.episode.flapping_sent = flapping_sent

    def _id(self, obs: Observation) -> str:
        key = f"{self.model}|{self.stream}|{obs.start_ts}" + (f"|{self.generation}" if self.generation else "")
        return hashlib.sha256(key.encode()).hexdigest()[:20]


RATIO_CAP = 1e12  # score / threshold past it is reported as it: JSON has no infinity (a pin of 1e-310 made one)


def _ratio(obs: Observation) -> float:
    return min(obs.score / obs.threshold, RATIO_CAP)


def significant(x: float, digits: int = 6) -> float:
    """``x`` to ``digits`` significant digits: rounded to decimal places, the scores of a model on raw
    small-amplitude signals (1e-7) were published as 0.0, a threshold of 2.4e-6 as 2e-6 beside a ratio of 1.67."""
    return float(f"{x:.{digits}g}")


def severity(ratio: float, s: AlertSettings) -> str:
    return "critical" if ratio >= s.critical_ratio else "major" if ratio >= s.major_ratio else "minor"


def shown_ratio(obs: Observation) -> float:
    """``score / threshold`` as a message shows it, rounded to 4 decimals: the severity is judged on it (1.49996
    was shown 1.5 and called minor)."""
    return round(_ratio(obs), 4)


def peak_severity(ep: Episode, s: AlertSettings) -> str:
    """The severity of the episode's peak, as its message shows it."""
    return severity(shown_ratio(ep.peak), s)


def _rank(sev: str) -> int:
    return SEVERITIES.index(sev) if sev in SEVERITIES else -1


def revision(sev: str, flapping: bool) -> int:
    """What a message of an episode says, as a number that rises with each update: 2 × the severity's rank (minor
    0, major 1, critical 2) + 1 when flapping. Derived, not counted: a replay that pages after a silence at major,
    where the first run paged minor then major, sends nothing under a revision with other content."""
    return 2 * max(_rank(sev), 0) + int(flapping)


def iso(ts_ms: int) -> str:
    """ISO 8601 in UTC with its ``Z``; a time no date can say (past year 9999) as its number, never an error (one
    raised in the loop while /streams rows were built, and stopped the daemon)."""
    try:
        return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return str(ts_ms)


def _usual(usual: list[float] | None, channels: int) -> np.ndarray | None:
    """The usual (median validation) errors, where the model gives them for these ``channels``."""
    return None if usual is None or len(usual) != channels or not channels else np.asarray(usual, "float64")


def over_usual(errors: np.ndarray, usual: list[float] | None) -> np.ndarray:
    """What channels are ranked by (alerts, pictures): each channel's error over its usual one where known, else
    the raw error."""
    err = np.asarray(errors, "float64")
    base = _usual(usual, err.shape[-1])
    return err if base is None else err - base


def vs_usual(errors: np.ndarray, usual: list[float] | None) -> np.ndarray | None:
    """Each channel's error over its usual error, as a ratio; None where they are not known. A usual error of 0
    (a channel reconstructed exactly) is floored, at a millionth of the largest; a small one is not (a review: a
    channel at 20× a usual error of 1e-7 beside one of 0.5 read 4× usual), but at 1e-12 at least."""
    err = np.asarray(errors, "float64")
    base = _usual(usual, err.shape[-1])
    if base is None:
        return None
    return err / np.where(base > 0, np.maximum(base, 1e-12), max(float(base.max()) * 1e-6, 1e-12))


def top_channels(errors: np.ndarray, names: list[str], k: int = 3,
                 usual: list[float] | None = None) -> list[dict[str, Any]]:
    """The ``k`` channels that explain a window's error, with their share of it; ``ch{i}`` past the end of ``names``
    (an alert of a model with more channels, resolved under the one that replaced it).

    With ``usual`` (each channel's median validation error, from the artifact) they are ranked by how much each
    is over its usual error — its part in raising the window's score (the mean of the channels' errors) above
    normal — with the ratio ``vs_usual`` beside: by raw error, a channel the model always reconstructs badly took
    the largest share of every window's error, anomalous or not, and headed every page; by the ratio alone, a
    channel of tiny usual error at 20× its usual (0.4 % of the error) did. Without it (an artifact from before,
    or a resolve under a replaced model), by raw error."""
    err = np.asarray(errors, "float64")
    total = float(np.sum(err))
    rel = vs_usual(err, usual)
    order = np.argsort(-over_usual(err, usual), kind="stable")[:k]  # (only finite scores reach an alert)
    out = []
    for c in order:
        row: dict[str, Any] = {"channel": names[c] if c < len(names) else f"ch{c}", "error": significant(float(err[c])),
                               "share": round(float(err[c]) / total, 4) if total > 0 else 0.0}
        if rel is not None:
            row["vs_usual"] = significant(float(rel[c]), 4)
        out.append(row)
    return out


def alert_doc(stream: str, t: Transition, model: dict[str, str], channel_names: list[str],
              source: dict[str, Any], s: AlertSettings, fields: dict[str, Any] | None = None,
              channel_usual: list[float] | None = None) -> dict[str, Any]:
    """The JSON body of a ``firing`` or ``resolved`` message; ``fields`` (the status as sent, flags, a former model)
    are set before its summary is made; ``channel_usual`` ranks its channels (:func:`top_channels`)."""
    ep = t.episode
    peak, last = ep.peak, ep.last or ep.peak
    ratio = shown_ratio(peak)
    sev = severity(ratio, s)
    fired_ts = ep.fired.end_ts if ep.fired else None
    end_ts = last.end_ts if t.status == "resolved" else None
    doc = {
        "type": "anomaly", "alert_id": ep.alert_id, "stream": stream, "status": t.status,
        "revision": revision(sev, ep.flapping), "flapping": ep.flapping, "severity": sev,
        "start_ts": ep.start.start_ts, "start_time": iso(ep.start.start_ts),
        "fired_ts": fired_ts, "fired_time": iso(fired_ts) if fired_ts is not None else None,
        "end_ts": end_ts, "end_time": iso(end_ts) if end_ts is not None else None,
        "peak_score": significant(peak.score), "peak_ts": peak.end_ts, "peak_time": iso(peak.end_ts), "ratio": ratio,
        "threshold": significant(peak.threshold), "threshold_source": peak.threshold_source,
        "top_channels": top_channels(peak.channel_errors, channel_names, usual=channel_usual),
        "windows_over": ep.windows_over, "model": model, "source": source, **(fields or {}),
    }
    doc["summary"] = summary(doc)
    return doc


END_CAUSES = ("reset", "model_changed", "clock_step", "stream_gone")  # flags of a resolve its windows did not make


def summary(doc: dict[str, Any]) -> str:
    """One line for a human paged by the message: stream, severity, how far over, where, since when, what next."""
    top = doc["top_channels"]
    where = "" if len(top) < 2 else (
        f", furthest over its usual error {top[0]['channel']} ({top[0]['vs_usual']:g}× usual, {top[0]['share']:.0%} "
        "of the error)" if "vs_usual" in top[0] else f", largest share {top[0]['channel']} ({top[0]['share']:.0%} of the error)")
    # as the ratio field gives it, to 4 decimals (:g cut 1234.5678 to 1234.57, and wrote 1.23457e+06 from a million)
    ratio = f"at least {RATIO_CAP:g}" if doc["ratio"] >= RATIO_CAP else f"{doc['ratio']:.4f}".rstrip("0").rstrip(".")
    head = (f"{doc['stream']}: {doc['severity']} anomaly, error {ratio}× its threshold at the worst window{where}; "
            f"over it since {doc['start_time']}")
    if doc["status"] == "resolved":
        why = [k.replace("_", " ") for k in END_CAUSES if doc.get(k)]
        quiet = "; it was silenced: never paged" if doc.get("silenced") else ""  # (an on-call pass: forwarded, it
        return f"{head}, resolved at {doc['end_time']}" + (f" ({', '.join(why)})" if why else "") + \
            f" after {doc['windows_over']} window(s) over{quiet}"  # announced the end of a page nobody got)
    held = " (flapping: held open)" if doc["flapping"] else ""
    late = " (paged when its silence ended)" if doc.get("after_silence") else ""
    if doc["status"] == "silenced":
        return f"{head}, {doc['windows_over']} window(s) over{held}; recorded while silenced, not paged"
    return f"{head}, {doc['windows_over']} window(s) over{held}{late}; picture: tsmon inspect --alert {doc['alert_id']}"

