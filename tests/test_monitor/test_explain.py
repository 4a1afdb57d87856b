"""The ``explain`` payload of a firing alert, its picture, and ``tsmon inspect --alert``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from models import artifact
from models.detector import Detector
from models.errors import DataError
from monitor import explain
from monitor.alerts import AlertState, Observation, alert_doc
from monitor.cli import main
from monitor.commands.tail_cmd import as_line
from tests.conftest import STREAM_PERIOD_MS, STREAM_WINDOW, sine_stream

PNG = b"\x89PNG\r\n\x1a\n"
KEYS = ["version", "start_ts", "end_ts", "window", "step", "channels", "channels_total", "values", "reconstruction",
        "timestep_error", "channel_error", "score", "threshold", "loss_units"]


def arrays(w: int, c: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(w, c)).astype("float32")
    recon = values + 0.1 * rng.normal(size=(w, c)).astype("float32")
    err = np.abs(values - recon).mean(axis=1)
    return values, recon, err, np.abs(values - recon).mean(axis=0)


def test_payload_shape_and_size() -> None:
    values, recon, err, ch = arrays(140)
    p = explain.payload(values, recon, err, ch, ["a", "b"], 0.5, 0.123456789, 1000, 2390)
    assert list(p) == KEYS
    assert p["version"] == 1 and p["window"] == 140 and p["step"] == 1 and p["channels"] == ["a", "b"]
    assert (p["start_ts"], p["end_ts"], p["threshold"], p["score"]) == (1000, 2390, 0.5, 0.12346)
    assert [len(s) for s in p["values"]] == [140, 140] and [len(s) for s in p["reconstruction"]] == [140, 140]
    assert len(p["timestep_error"]) == 140 and len(p["channel_error"]) == 2
    assert p["values"][1][7] == float(f"{values[7, 1]:.5g}")
    size = len(json.dumps(p))
    assert size < 12_000, size


def test_long_window_is_downsampled_and_spikes_survive() -> None:
    values, recon, err, ch = arrays(2000)
    err[1234] = 99.0
    p = explain.payload(values, recon, err, ch, ["a", "b"], 0.5, 1.0, 0, 1, max_points=256)
    assert p["window"] == 2000 and p["step"] == 8
    assert all(len(s) == 250 for s in (*p["values"], *p["reconstruction"], p["timestep_error"]))
    assert p["timestep_error"][1234 // 8] == 99.0 and max(p["timestep_error"]) == 99.0
    assert p["values"][0][10] == float(f"{values[80, 0]:.5g}")  # every 8th sample
    assert len(json.dumps(p)) < 20_000
    explain.check(p)


def test_a_window_of_many_channels_keeps_the_largest_errors_and_fits_a_message(tmp_path: Path) -> None:
    """Its size grew with the channels: 256 made a firing alert of 1.1 MB, over the producer's 1 MB request limit,
    so the page was never delivered. Past max_channels only the channels with the largest error are carried."""
    values, recon, err, ch = arrays(720, c=256)
    ch[[5, 200]] = [50.0, np.nan]  # the one that broke the score, and a non-finite one
    p = explain.payload(values, recon, err, ch, [f"sensor-{i}" for i in range(256)], 0.5, 3.0, 0, 1)
    assert p["channels_total"] == 256 and len(p["channels"]) == len(p["values"]) == len(p["channel_error"]) == 16
    assert p["version"] == 2  # a reader taking channel_error[i] for the model's channel i must notice
    order = np.argsort(-np.nan_to_num(ch, nan=np.inf))[:16]
    assert p["channels"] == [f"sensor-{i}" for i in sorted(order)] and {"sensor-5", "sensor-200"} <= set(p["channels"])
    assert len(json.dumps(p)) < 100_000
    explain.check(p)
    assert explain.render({"stream": "s", "explain": p}, tmp_path / "many.png").read_bytes().startswith(PNG)
    usual = np.ones(256)
    usual[5], usual[7] = 1000.0, 0.001  # sensor-5 always errs that much, sensor-7 never: the alert ranks them so
    ranked = explain.payload(values, recon, err, ch, [f"sensor-{i}" for i in range(256)], 0.5, 3.0, 0, 1,
                             usual=usual.tolist())
    assert "sensor-7" not in p["channels"] and "sensor-7" in ranked["channels"] and "sensor-200" in ranked["channels"]
    assert "sensor-5" not in ranked["channels"]
    assert len(ranked["channel_vs_usual"]) == 16 and "channel_vs_usual" not in p  # kept channels' ratios only


def test_the_pictures_bars_mark_the_channel_the_alert_names_first(tmp_path: Path) -> None:
    """From the on-call pass: the page said "furthest over its usual error sig (14.91× usual, 35% of the error)"
    while its picture's tallest bar was a white-noise channel at 0.85× its usual error (45 %): the bars showed raw
    shares only. With the model's usual errors the payload carries each channel's ratio; the bars are labelled
    with it and the channel the alert ranks first is drawn in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values, recon, err, _ = arrays(140, c=3)
    ch = np.array([0.45, 0.35, 0.20])  # vib (noisy), sig (stepped), sig2
    p = explain.payload(values, recon, err, ch, ["vib", "sig", "sig2"], 0.5, 1.0, 0, 1, usual=[0.53, 0.0235, 0.2])
    explain.check(p)
    assert p["channel_vs_usual"] == pytest.approx([0.849, 14.89, 1.0], abs=0.01)
    fig, ax = plt.subplots()
    explain._contribution(ax, p["channels"], np.array(p["channel_error"]), np.array(p["channel_vs_usual"]))
    red = [i for i, bar in enumerate(ax.patches) if bar.get_facecolor() == matplotlib.colors.to_rgba("tab:red")]
    labels = [t.get_text() for t in ax.texts]
    plt.close(fig)
    assert red == [1] and labels == ["45% · 0.849× usual", "35% · 14.9× usual", "20% · 1× usual"]
    assert explain.render({"stream": "s", "explain": p}, tmp_path / "usual.png").read_bytes().startswith(PNG)
    with pytest.raises(DataError, match="channel_vs_usual must hold one value per channel"):
        explain.check({**p, "channel_vs_usual": [1.0]})


def test_non_finite_floats_become_null() -> None:
    values, recon, err, ch = arrays(40)
    values[3, 0], recon[5, 1], err[7], ch[1] = np.nan, np.inf, -np.inf, np.nan
    p = explain.payload(values, recon, err, ch, ["a", "b"], float("inf"), float("nan"), 0, 1)
    text = json.dumps(p, allow_nan=False)  # raises on NaN/inf
    assert p["values"][0][3] is None and p["reconstruction"][1][5] is None and p["timestep_error"][7] is None
    assert p["channel_error"][1] is None and p["score"] is None and p["threshold"] is None
    assert "NaN" not in text and "Infinity" not in text


def test_downsampled_block_of_nan_is_null() -> None:
    values, recon, err, ch = arrays(20)
    err[4:8] = np.nan  # one whole block of step 4
    err[9] = np.nan  # part of a block: the block's max ignores it
    p = explain.payload(values, recon, err, ch, ["a", "b"], 1.0, 1.0, 0, 1, max_points=5)
    assert p["step"] == 4 and p["timestep_error"][1] is None and p["timestep_error"][2] is not None


def test_payload_rejects_mismatched_shapes() -> None:
    values, recon, err, ch = arrays(40)
    with pytest.raises(DataError, match="shapes do not match"):
        explain.payload(values, recon[:30], err, ch, ["a", "b"], 1.0, 1.0, 0, 1)
    with pytest.raises(DataError, match="channel name"):
        explain.payload(values, recon, err, ch, ["a"], 1.0, 1.0, 0, 1)


@pytest.fixture(scope="module")
def detector(stream_model: Path) -> Detector:
    return artifact.load(stream_model, "cpu")


@pytest.fixture(scope="module")
def firing_doc(detector: Detector) -> dict[str, Any]:
    return firing_alert(detector)


def firing_alert(detector: Detector) -> dict[str, Any]:
    """A firing alert message for a +3 burst on ch0, with the explain payload of its peak window."""
    ts, values = sine_stream(400, bursts=(200,))
    state, thr, transitions = AlertState("plant-1", "sine-pca"), detector.threshold.value, []
    for start in range(160, 260, 10):
        win = values[start : start + STREAM_WINDOW]
        s = detector.score(win[None])
        obs = Observation(int(ts[start]), int(ts[start + STREAM_WINDOW - 1]), start, start + STREAM_WINDOW - 1,
                          float(s.window[0]), thr, "model", s.channel[0])
        transitions += state.update(obs).transitions
    assert transitions and transitions[0].status == "firing"
    ep = transitions[0].episode
    doc = alert_doc("plant-1", transitions[0], {"name": "sine-pca"}, ["ch0", "ch1"], {}, state.settings)
    seq = ep.peak.start_seq
    doc["explain"] = explain.for_window(detector, values[seq : seq + STREAM_WINDOW], thr, ep.peak.start_ts,
                                        ep.peak.end_ts)
    return json.loads(json.dumps(doc, allow_nan=False))  # as a consumer reads it back


def test_for_window_matches_the_detector(detector: Detector, firing_doc: dict[str, Any]) -> None:
    e = firing_doc["explain"]
    assert e["window"] == STREAM_WINDOW and e["step"] == 1 and e["channels"] == ["ch0", "ch1"]
    assert e["end_ts"] - e["start_ts"] == (STREAM_WINDOW - 1) * STREAM_PERIOD_MS
    assert e["score"] == pytest.approx(firing_doc["peak_score"], rel=1e-4) and e["score"] > e["threshold"]
    assert e["channel_error"][0] > e["channel_error"][1]  # the burst is on ch0
    assert np.mean(e["timestep_error"]) == pytest.approx(e["score"], rel=1e-3)
    assert len(json.dumps(e)) < 20_000


def test_render_writes_a_png(firing_doc: dict[str, Any], tmp_path: Path) -> None:
    path = explain.render(firing_doc, tmp_path / "sub" / "alert.png")
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 20_000


def test_render_draws_a_downsampled_payload_with_nulls(tmp_path: Path) -> None:
    values, recon, err, ch = arrays(1000, c=3)
    values[10, 0] = np.nan
    doc = {"alert_id": "x", "stream": "s", "severity": "minor", "ratio": 1.2,
           "explain": explain.payload(values, recon, err, ch, ["a", "b", "c"], 0.5, float("nan"), 0, 1)}
    assert explain.render(doc, tmp_path / "a.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("explain"), "has no 'explain'"),
    (lambda d: d["explain"].pop("timestep_error"), "lacks key"),
    (lambda d: d["explain"]["values"][0].pop(), "every series must hold 40 points"),
    (lambda d: d["explain"]["channel_error"].append(1.0), "one value per channel"),
    (lambda d: d["explain"].update(version=9), "version 9 unsupported"),
    (lambda d: d["explain"].update(step=0), "positive integers"),
    (lambda d: d["explain"]["values"][1].__setitem__(0, "x"), "not a number"),
])
def test_render_refuses_a_malformed_doc(firing_doc: dict[str, Any], tmp_path: Path, change: Any,
                                        message: str) -> None:
    doc = json.loads(json.dumps(firing_doc))
    change(doc)
    with pytest.raises(DataError, match=message):
        explain.render(doc, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    try:
        main(["--log-format", "json", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_cli_inspect_alert_file(firing_doc: dict[str, Any], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    one = tmp_path / "alert.json"
    one.write_text(json.dumps(firing_doc, indent=2))
    code, err = run(capsys, "inspect", "--alert", str(one), "--out", str(tmp_path / "one.png"))
    assert code == 0 and (tmp_path / "one.png").read_bytes()[:8] == PNG and "picture_written" in err
    resolved = {k: v for k, v in firing_doc.items() if k != "explain"} | {"status": "resolved"}
    lines = tmp_path / "alerts.jsonl"  # the first message with an explain is drawn
    lines.write_text("\n".join(json.dumps(d) for d in (resolved, firing_doc, firing_doc)) + "\n")
    code, _ = run(capsys, "inspect", "--alert", str(lines), "--out", str(tmp_path / "lines.png"))
    assert code == 0 and (tmp_path / "lines.png").read_bytes()[:8] == PNG
    # what `tsmon tail` writes (each message in an envelope): it was "no alert message with an 'explain' object"
    tailed = tmp_path / "tailed.jsonl"
    envelope = [as_line(SimpleNamespace(topic="tsmon.alerts", partition=0, offset=n, timestamp=0, key=b"s", headers=[],
                                        value=json.dumps(d).encode())) for n, d in enumerate((resolved, firing_doc))]
    tailed.write_text("\n".join(json.dumps(e) for e in envelope) + "\n")
    code, err = run(capsys, "inspect", "--alert", str(tailed), "--out", str(tmp_path / "tailed.png"))
    assert code == 0 and (tmp_path / "tailed.png").read_bytes()[:8] == PNG, err


def test_cli_inspect_alert_errors(firing_doc: dict[str, Any], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from monitor.broker import free_port

    no_explain = tmp_path / "resolved.jsonl"
    no_explain.write_text(json.dumps({k: v for k, v in firing_doc.items() if k != "explain"}) + "\n")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('{"a": 1}\nnot json\n')
    out = str(tmp_path / "x.png")
    cases = [
        (["--alert", str(no_explain)], "DataError: ", "no alert message with an 'explain'"),
        (["--alert", str(garbage)], "DataError: ", ":2: not JSON"),
        (["--alert", str(tmp_path / "missing.json")], "DataError: alert file", "not found"),
        (["--alert", "0123456789abcdef0123", "--bootstrap", f"127.0.0.1:{free_port()}"], "BrokerError: cannot reach",
         "--bootstrap"),
    ]
    for args, start, part in cases:
        code, err = run(capsys, "inspect", *args, "--out", out)
        last = err.strip().splitlines()[-1]
        assert code == 1 and last.startswith(start) and part in last and "Traceback" not in err, (args, err)
    assert not Path(out).exists()


def test_cli_inspect_needs_exactly_one_source(stream_model: Path, firing_doc: dict[str, Any], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    one = tmp_path / "alert.json"
    one.write_text(json.dumps(firing_doc))
    for args in ([], ["--model", str(stream_model), "--alert", str(one)]):
        code, err = run(capsys, "inspect", *args, "--out", str(tmp_path / "x.png"))
        assert code == 2 and "exactly one of --model" in err and "Traceback" not in err


def test_the_demo_keeps_its_scorecard_when_its_alert_cannot_be_written(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`tsmon demo --model` in a folder it cannot write played the whole run, then ended with exit 1 and no
    scorecard on writing the alert's picture beside the model."""
    from monitor.demo import strongest_alert_picture

    values, recon, err, ch = arrays(140)
    alert = {"type": "anomaly", "status": "firing", "ratio": 3.0, "alert_id": "a1", "stream": "s",
             "explain": explain.payload(values, recon, err, ch, ["a", "b"], 0.5, 1.5, 0, 1)}
    blocked = tmp_path / "a_file"
    blocked.write_text("x")
    assert strongest_alert_picture([alert], blocked / "models") is None  # a file where the folder should be
    out, err_ = capsys.readouterr()
    assert "demo_alert_not_written" in out + err_
    shown = strongest_alert_picture([alert], tmp_path)
    assert shown is not None and Path(shown["png"]).stat().st_size > 0
