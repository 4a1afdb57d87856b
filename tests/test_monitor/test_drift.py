"""The drift guard tells a settled new normal from a sustained anomaly, and the calibrator obeys it."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.calibrator import Calibrator, CalibratorSettings
from monitor.drift import DriftSettings, assess, ks_2samp, level_shift

S = DriftSettings(window=600, min_windows=200)
rng = np.random.default_rng(7)


def normal(n: int, scale: float = 1.0) -> np.ndarray:
    return scale * rng.lognormal(0.0, 0.25, n)


def test_ks_matches_known_values() -> None:
    same_d, same_p = ks_2samp(normal(300), normal(300))
    shifted_d, shifted_p = ks_2samp(normal(300), normal(300, 1.5))
    assert same_p > 0.05 and shifted_p < 1e-6 and shifted_d > same_d
    assert ks_2samp(np.arange(10.0), np.arange(10.0)) == (0.0, 1.0)


def test_a_settled_level_shift_is_a_new_normal() -> None:
    recent = normal(600, 3.0)
    assert level_shift(recent, 1.5, S)
    v = assess(recent, float(np.quantile(recent, 0.95)), S, reference=normal(500))
    assert v.accept and v.reason.startswith("stable level")


def test_a_rising_error_is_still_changing() -> None:
    recent = normal(600) * np.linspace(2, 6, 600)
    v = assess(recent, float(np.quantile(recent, 0.95)), S)
    assert not v.accept and v.reason.startswith("still changing")


def test_normal_mixed_with_anomalies_is_refused() -> None:
    recent = np.where(rng.random(600) < 0.3, normal(600, 8.0), normal(600))
    v = assess(recent, 2.0, S)
    assert not v.accept and "would stay over" in v.reason
    v = assess(recent, float(np.quantile(recent, 0.95)), S, reference=normal(500))
    assert not v.accept and "not shaped like the normal ones" in v.reason


def test_too_little_evidence_is_refused() -> None:
    assert assess(normal(50), 10.0, S).reason.startswith("insufficient evidence")


def calibrator() -> Calibrator:
    c = Calibrator(CalibratorSettings(window=500, min_samples=100, drift=S))
    c.register("s", 1.5)
    c.observe("s", normal(500))
    return c


def test_calibrator_accepts_a_new_normal_and_refuses_an_anomaly() -> None:
    c = calibrator()
    c.observe_all("s", normal(600, 3.0))
    (_, new), = c.recalibrate().values()
    assert new.reason.startswith("new normal") and new.value > 3.0 and new.version == 1

    c = calibrator()
    c.observe_all("s", normal(600) * np.linspace(3, 6, 600))  # worsening: an incident, not a new normal
    refused: dict[str, str] = {}
    assert c.recalibrate(refused=refused) == {} and refused["s"].startswith(("still changing", "sustained anomaly"))
    assert c.threshold("s").value == 1.5


def test_a_shadow_during_a_level_shift_shows_the_new_normal_target_recalibrate_takes() -> None:
    """An operator pass: shadow gave the ordinary path's candidate (the current threshold, 600 over) while
    recalibrate took the new-normal path to 0.79; "shadow first shows what it would set" (README)."""
    c = calibrator()
    c.observe_all("s", normal(600, 3.0))
    value, _, shifted = c.candidate("s", 0.95)
    (_, new), = c.recalibrate(commanded=True).values()
    assert shifted and new.reason.startswith("new normal") and new.value == pytest.approx(value)
    assert calibrator().candidate("s", 0.95)[2] is False  # no shift: the ordinary path, as before


def test_a_new_normal_refused_because_the_ceiling_cut_its_target_says_so() -> None:
    """An operator pass: "sustained anomaly: 24.8 % would stay over 0.7898", where 0.7898 was calibrator.ceiling ×
    the artifact's and the level's own q × margin would have left 5 % over; nothing named the ceiling."""
    c = Calibrator(CalibratorSettings(window=500, min_samples=100, ceiling=2.0, drift=S))
    c.register("s", 1.5)
    c.observe("s", normal(500))
    c.observe_all("s", normal(600, 3.0))  # the settled new normal the test above accepts, its target over 2 × 1.5
    refused: dict[str, str] = {}
    assert c.recalibrate(refused=refused) == {}
    assert refused["s"].startswith("sustained anomaly") and "was capped at calibrator.ceiling (2 × the artifact's " \
        "1.5): raise the ceiling, or pin" in refused["s"], refused
    c = Calibrator(CalibratorSettings(window=500, min_samples=100, ceiling=2.0, drift=S))  # capped, but refused for
    c.register("s", 1.5, margin=1.5)  # another reason (still rising): raising the ceiling would change nothing
    c.observe("s", normal(500))
    c.observe_all("s", np.linspace(1.9, 2.6, 600))
    rising: dict[str, str] = {}
    assert c.recalibrate(refused=rising) == {} and rising["s"].startswith("still changing")
    assert "capped" not in rising["s"], rising
    c = Calibrator(CalibratorSettings(window=500, min_samples=100, drift=S))  # accepted at the ceiling: said so
    c.register("s", 1.0, margin=1.5)
    c.observe("s", normal(500))
    c.observe_all("s", normal(600, 2.7))
    (_, new), = c.recalibrate().values()
    assert new.value == 4.0 and new.reason.startswith("new normal") and new.reason.endswith(
        " (at calibrator.ceiling, 4 × the artifact's)"), new.reason
    c = Calibrator(CalibratorSettings(window=500, min_samples=100, ceiling=100.0, drift=S))  # no cap: no word of one
    c.register("s", 1.5)
    c.observe_all("s", normal(600) * np.linspace(3, 6, 600))  # an incident worsening: refused on its own
    uncapped: dict[str, str] = {}
    assert c.recalibrate(refused=uncapped) == {} and "capped" not in uncapped["s"], uncapped


def test_an_accepted_new_normal_is_not_walked_back_by_the_old_levels_errors() -> None:
    """The normal evidence still held the old level's errors: each later scheduled recalibration took the
    threshold max_change lower (4.55 → 3.64 → 2.91 → 2.33), until most of the new normal's windows paged."""
    c = Calibrator(CalibratorSettings(window=2000, min_samples=200, drift=S))
    c.register("s", 1.5)
    c.observe("s", normal(2000))  # the old normal, as learnt
    c.observe_all("s", normal(600, 3.0))  # settled at 3x: nearly every window over 1.5
    (_, accepted), = c.recalibrate().values()
    assert accepted.reason.startswith("new normal")
    for _ in range(5):  # then the new normal goes on: its windows under the threshold are fed as normal
        batch = normal(30, 3.0)
        c.observe("s", batch[batch < c.threshold("s").value])
        c.observe_censored("s", int(np.sum(batch >= c.threshold("s").value)), c.threshold("s").value)
        c.observe_all("s", batch)
        c.recalibrate()
    assert c.threshold("s").value >= 0.9 * accepted.value
    assert float(np.mean(normal(10_000, 3.0) > c.threshold("s").value)) < 0.1


def test_an_operator_raise_passes_the_mixture_test() -> None:
    c = Calibrator(CalibratorSettings(window=500, min_samples=100, drift=S))
    c.register("s", 1.0)
    c.observe("s", normal(300, 2.0))
    c.observe_all("s", np.where(rng.random(600) < 0.4, normal(600, 10.0), normal(600)))
    refused: dict[str, str] = {}
    assert c.recalibrate(commanded=True, refused=refused) == {} and "would stay over" in refused["s"]


@pytest.mark.parametrize("enabled", [False])
def test_guard_off_changes_nothing_for_the_scheduled_path(enabled: bool) -> None:
    c = Calibrator(CalibratorSettings(window=500, min_samples=100, drift=DriftSettings(enabled=enabled)))
    c.register("s", 2.0)  # well above q0.95 of normal(500) (~1.5): a change whatever the draw
    c.observe("s", normal(500))
    # the recent windows at a new level: not the guard's to judge here, and no reason to lower the threshold
    c.observe_all("s", normal(600, 3.0))
    assert c.recalibrate() == {}
    c.observe_all("s", normal(600))  # at the normal level: the scheduled path lowers it, the guard not consulted
    (_, new), = c.recalibrate().values()
    assert new.reason.startswith("scheduled")


@pytest.mark.parametrize("thin", [35, 140])
def test_a_small_hop_still_leaves_the_guard_enough_windows_to_accept_a_new_normal(thin: int) -> None:
    """The guard needs 20 non-overlapping recent windows; with window/hop = 35 or more, drift.window = 600 held fewer,
    and every new normal was refused ("insufficient evidence"), an operator's recalibrate too."""
    gen = np.random.default_rng(0)
    c = Calibrator(CalibratorSettings(drift=DriftSettings()), clock=lambda: 0.0)
    c.register("s", 1.0, thin=thin)
    base = gen.lognormal(np.log(0.5), 0.2, 2000)
    c.observe("s", base)
    c.observe_all("s", base)
    c.observe_all("s", gen.lognormal(np.log(2.0), 0.2, 25 * thin))  # a clean × 4 level, same shape
    refused: dict[str, str] = {}
    (_, new), = c.recalibrate(refused=refused).values()
    assert not refused and new.reason.startswith("new normal") and 2.2 < new.value < 3.5


def test_the_recent_ring_keeps_its_size_through_a_restore() -> None:
    """register() sized it to 20 non-overlapping windows, restore() rebuilt it at drift.window: after every restart
    or rebalance a small-hop stream refused every new normal again."""
    c = Calibrator(CalibratorSettings(drift=DriftSettings()), clock=lambda: 0.0)
    c.register("s", 1.0, thin=40)
    c.observe_all("s", np.ones(800))
    doc = c.export("s")
    again = Calibrator(CalibratorSettings(drift=DriftSettings()), clock=lambda: 0.0)
    again.register("s", 1.0, thin=40)
    again.restore("s", doc)
    assert again._streams["s"].recent.maxlen == 800 and len(again._streams["s"].recent) == 800


def test_overlapping_windows_are_thinned_to_independent_ones_before_the_ks_tests() -> None:
    """Windows overlapping by hop = W/4 share their samples: four errors are worth one. The guard judges every
    ``thin``-th error (ignoring it, no test noticed: every test fed independent draws)."""
    rng = np.random.default_rng(3)
    recent = np.repeat(rng.lognormal(0.0, 0.2, 60), 4)  # 60 independent windows, each seen 4 times
    thinned = assess(recent[:64], 5.0, DriftSettings(min_windows=10), thin=4)
    assert not thinned.accept and "16 non-overlapping windows" in thinned.reason
    assert assess(recent, 5.0, DriftSettings(min_windows=10), thin=4).accept


def test_an_accepted_new_normal_replaces_the_normal_evidence() -> None:
    # left in place, the old level's errors made the next scheduled runs walk the threshold back down: after the
    # shift to 3.0 the normal evidence is the recent windows', so its median is at the new level, not at 1.0
    c = calibrator()
    c.observe_all("s", normal(600, 3.0))
    (_, new), = c.recalibrate().values()
    assert new.reason.startswith("new normal")
    median, _, shifted = c.candidate("s", 0.5)
    assert not shifted and median > 2.0
