"""Beat-aligned windows: the daemon's streaming cut equals the training cut, whatever the chunking."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.beats import BeatRule, beat_windows, peak_positions
from models.errors import DataError
from monitor.windows import BeatWindows


def ecg_like(n: int, rr: int = 100, seed: int = 0, premature: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Narrow R spikes every ``rr`` samples (and early ones at ``premature``) on a wandering baseline, 2 leads."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    peaks = sorted(set(range(50, n, rr)) | set(premature))
    x = 0.3 * np.sin(2 * np.pi * t / 700) + 0.02 * rng.normal(size=n)  # baseline wander + noise
    spike, t_wave = np.hanning(9)[1:8], 0.25 * np.hanning(20)  # R peak at the spike's centre (index 3)
    for p in peaks:
        for shape, at in ((spike, p - 3), (t_wave, p + 25)):
            idx = at + np.arange(len(shape))
            ok = (idx >= 0) & (idx < n)
            x[idx[ok]] += shape[ok]
    return np.stack([x, 0.5 * x], axis=1).astype("float32"), np.asarray(peaks)


RULE = {"window": 80, "pre": 48, "refractory": 16, "baseline": 12}


def test_the_rule_finds_the_r_peaks_not_the_t_waves() -> None:
    x, peaks = ecg_like(3000)
    rule = BeatRule.fit(x[:1500], **RULE)
    found = peak_positions(x[:, 0], rule)
    inside = peaks[(peaks >= rule.lookahead) & (peaks < len(x) - rule.lookahead)]
    np.testing.assert_array_equal(found, inside)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_windows_equal_the_training_windows_for_any_chunking(seed: int) -> None:
    x, _ = ecg_like(4000, seed=seed, premature=(1234, 2555))
    rule = BeatRule.fit(x[:2000], **RULE)
    want, want_ends = beat_windows(x, rule)
    sw = BeatWindows(rule, channels=2)
    rng = np.random.default_rng(seed)
    cuts = np.unique(np.r_[0, rng.integers(1, len(x), 60), len(x)])
    ts = 1_000 + 4 * np.arange(len(x), dtype="int64")
    got, seqs, starts = [], [], []
    for lo, hi in itertools.pairwise(cuts):
        w = sw.push(ts[lo:hi], x[lo:hi])
        got.append(w.values)
        seqs.append(w.end_seq)
        starts.append(w.start_ts)
        assert len(sw._buf) <= max(rule.pre, rule.lookahead) + rule.window + (hi - lo)  # bounded state
    np.testing.assert_array_equal(np.concatenate(got), want)
    np.testing.assert_array_equal(np.concatenate(seqs), want_ends + 1)  # 1-based sample number of the last sample
    np.testing.assert_array_equal(np.concatenate(starts), ts[want_ends - rule.window + 1])


def test_needed_from_never_passes_a_sample_a_future_window_uses() -> None:
    x, _ = ecg_like(3000)
    rule = BeatRule.fit(x, **RULE)
    _, ends = beat_windows(x, rule)
    sw = BeatWindows(rule, channels=2)
    ts = 4 * np.arange(len(x), dtype="int64")
    for lo in range(0, len(x), 37):
        sw.push(ts[lo : lo + 37], x[lo : lo + 37])
        future = ends[ends >= min(lo + 37, len(x))]  # windows not yet emitted
        if len(future):
            assert sw.needed_from <= future[0] - rule.window + 2  # first sample (1-based) of the next window


def test_a_gap_restarts_the_beats_and_bad_rules_are_refused() -> None:
    x, _ = ecg_like(2000)
    rule = BeatRule.fit(x, **RULE)
    sw = BeatWindows(rule, channels=2, gap_ms=100)
    ts = 4 * np.arange(len(x), dtype="int64")
    ts[1000:] += 10_000
    w = sw.push(ts, x)
    assert sw.restarts == 1 and len(w) > 0
    assert not ((w.start_ts < ts[1000]) & (w.end_ts >= ts[1000])).any()  # no window spans the gap
    with pytest.raises(DataError):
        BeatRule(80, 80, 16, 12, 0.1)
    with pytest.raises(DataError, match="too few beats"):
        BeatRule.fit(np.zeros((500, 1), "float32"), **RULE)


def test_a_beat_model_round_trips_and_the_daemon_scores_one_window_per_beat(tmp_path, make) -> None:
    """Trained with beat windows, saved, loaded by the daemon's scorer: the processor cuts the same windows,
    and the premature beat is the one over the threshold."""
    import json

    from models import artifact
    from models.data import Series, series_dataset
    from models.errors import ArtifactError
    from models.train import TrainConfig
    from models.workflow import train_detector
    from monitor.replay import as_records
    from monitor.scorer import Scorer, load_served

    x, _ = ecg_like(6000, premature=(4725,))
    ds = series_dataset(Series(x, ["a", "b"]), 80, 0, train_fraction=0.6, beat={"pre": 48, "refractory": 16,
                                                                                "baseline": 12})
    assert ds.windowing["kind"] == "beats" and ds.hop == 100  # the median beat interval
    again = series_dataset(Series(x, ["a", "b"]), 80, 0, train_fraction=0.6, beat=ds.windowing)  # a fitted rule
    assert again.windowing == ds.windowing and np.array_equal(again.train, ds.train)  # (replay-eval's baseline)
    det, training = train_detector(ds, "pca", {}, TrainConfig(epochs=1, seed=0, device="cpu"), 1.0, 1.5)
    path = artifact.save(det, tmp_path / "beats", training)
    served = load_served("*", path, None, None, "cpu")
    assert served.detector.windowing == ds.windowing
    p = make(Scorer([served]))
    ts = 1_700_000_000_000 + 3 * np.arange(len(x), dtype="int64")
    for i, rec in enumerate(as_records("ecg-1", ts, x, 77, "in")):
        p.handle([rec])
        if i % 5 == 0:
            p.score_ready()
    p.score_ready(force=True)
    p.sink.flush(1.0)
    want, _ = beat_windows(x, BeatRule.from_dict(ds.windowing))
    assert p.streams["ecg-1"].scored == len(want)
    fired = [d for d in p.sink.docs("tsmon.alerts") if d.get("status") == "firing"]
    assert len(fired) == 1 and fired[0]["start_ts"] <= ts[4725] <= fired[0]["peak_ts"] + 300
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 2  # a tsmon from before beat windows refuses it (it cut sliding ones)
    manifest["windowing"]["pre"] = 80  # pre must be inside the window
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="incompatible artifact"):
        artifact.load(path, "cpu")


@pytest.mark.parametrize("pre", [48, 10])  # 10: the window starts inside the peak's lookbehind
def test_replaying_from_needed_from_recovers_every_window_not_yet_emitted(pre: int) -> None:
    """After a crash the input is read again from the committed offset (needed_from): a fresh stream state
    fed from there must cut every window the old one had not emitted yet."""
    x, _ = ecg_like(3000, premature=(1234,))
    rule = BeatRule.fit(x, **{**RULE, "pre": pre})
    _, ends = beat_windows(x, rule)
    ts = 4 * np.arange(len(x), dtype="int64")
    for cut in (700, 1240, 2001):
        sw = BeatWindows(rule, channels=2)
        done = sw.push(ts[:cut], x[:cut])
        start = sw.needed_from - 1  # 0-based index of the first sample still needed
        again = BeatWindows(rule, channels=2).push(ts[start:], x[start:])
        recovered = set((start + again.end_seq - 1).tolist())
        missing = set(ends.tolist()) - set((done.end_seq - 1).tolist()) - recovered
        assert not missing, (cut, sorted(missing))


def test_a_nan_near_a_peak_leaves_its_beat_window_to_be_counted_not_lost() -> None:
    x, _ = ecg_like(3000)
    rule = BeatRule.fit(x[:1500], **RULE)
    wins, ends = beat_windows(x, rule)
    holed = x.copy()
    holed[1560, 0] = np.nan  # 10 samples after the R peak at 1550, on the lead the peaks are found on
    holed[2052, 1] = np.inf  # and on the other lead
    w2, e2 = beat_windows(holed, rule)
    np.testing.assert_array_equal(e2, ends)  # the same beats: before, the one at 1550 vanished, uncounted
    bad = ~np.isfinite(w2).all(axis=(1, 2))
    assert bad.sum() == 2  # left for finite_windows to drop and count
    np.testing.assert_array_equal(w2[~bad], wins[~bad])


def test_a_beat_rule_that_finds_no_beats_is_a_clear_error() -> None:
    from models.data import Series, series_dataset

    x, _ = ecg_like(3000)
    rule = BeatRule.fit(x, **RULE).to_dict()
    with pytest.raises(DataError, match="beat\\(s\\) in the first .* another recording, other units"):
        series_dataset(Series(x * 0.01, ["a", "b"]), 80, 0, 0.5, beat=rule)  # millivolts read as volts


@pytest.mark.parametrize("chunk", [7, 10_000])
def test_a_peak_exactly_pre_samples_after_the_start_gets_its_window(chunk: int) -> None:
    # the window of a peak at position pre starts at the stream's first sample: the training cut keeps it
    # (starts >= 0), and so must the streaming one
    x, _ = ecg_like(1500)
    rule = BeatRule.fit(x, **RULE)
    x = x[50 - rule.pre:]  # the first R peak (at 50) now at exactly pre
    want, want_ends = beat_windows(x, rule)
    assert want_ends[0] == rule.window - 1  # the training cut has the window starting at sample 0
    sw = BeatWindows(rule, channels=2)
    ts = 4 * np.arange(len(x), dtype="int64")
    got = [sw.push(ts[lo:lo + chunk], x[lo:lo + chunk]) for lo in range(0, len(x), chunk)]
    np.testing.assert_array_equal(np.concatenate([w.values for w in got]), want)
    np.testing.assert_array_equal(np.concatenate([w.end_seq for w in got]), want_ends + 1)
