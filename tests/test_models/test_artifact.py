"""Artifacts round-trip exactly; damaged ones fail with one clear line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models import artifact
from models.data import read_series, series_dataset
from models.errors import ArtifactError, ModelConfigError
from models.registry import build
from models.train import TrainConfig
from models.workflow import train_detector

QUANTILES = {"0.5", "0.9", "0.95", "0.99", "0.995", "0.999", "max"}


@pytest.fixture(scope="module", params=["lstm", "pca", "conv"])
def trained(request: pytest.FixtureRequest, series_csv: Path, tmp_path_factory: pytest.TempPathFactory):
    ds = series_dataset(read_series(series_csv), window=40, hop=10)
    params = {"lstm": {"embedding": 8}, "pca": {}, "conv": {"filters": [8, 4]}}[request.param]
    det, training = train_detector(ds, request.param, params, TrainConfig(epochs=2, seed=3, device="cpu"))
    path = artifact.save(det, tmp_path_factory.mktemp("art") / request.param, training)
    return det, ds, path


def test_round_trip_gives_identical_scores(trained) -> None:
    det, ds, path = trained
    again = artifact.load(path, device="cpu")
    a, b = det.score(ds.test), again.score(ds.test)
    np.testing.assert_array_equal(a.window, b.window)
    np.testing.assert_array_equal(a.channel, b.channel)
    assert again.threshold == det.threshold and again.channel_names == ["ch0", "ch1"]
    assert again.channel_usual == det.channel_usual  # what alerts rank channels by


def test_the_usual_error_of_each_channel_is_the_median_over_the_validation_windows(trained, tmp_path: Path) -> None:
    det, ds, path = trained
    assert det.channel_usual == pytest.approx(np.median(det.score(ds.val).channel, axis=0).tolist())
    assert len(det.channel_usual) == 2 and all(v > 0 for v in det.channel_usual)
    older = _copy(path, tmp_path)  # an artifact from before it: read, alerts rank channels by raw error
    _edit(older, validation_channel_error_median=None)
    assert artifact.load(older).channel_usual == []


def test_manifest_has_what_operators_need(trained) -> None:
    _, _, path = trained
    m = json.loads((path / "manifest.json").read_text())
    assert QUANTILES <= set(m["validation_error_quantiles"])
    assert m["threshold"]["value"] > 0 and m["window"] == 40 and m["hop"] == 10
    assert m["channels"] == ["ch0", "ch1"] and m["normalisation"]["method"] == "standard"
    assert len(m["training"]["data"]["sha256"]) == 64
    assert {"tsmon", "torch"} <= set(m["versions"]) and m["created_at"]
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in path.iterdir())  # never pickle


def _copy(path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "weights.safetensors").write_bytes((p / "weights.safetensors").read_bytes()[:100]), "truncated"),
    (lambda p: (p / "weights.safetensors").unlink(), "missing its weights"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "corrupt manifest"),
    (lambda p: (p / "manifest.json").unlink(), "not a tsmon model artifact"),
    (lambda p: _edit(p, format_version=99), "artifact format 99"),
    (lambda p: _edit(p, kind="transformer"), "incompatible artifact"),
    (lambda p: _edit(p, threshold=None), "lacks threshold"),
    # a hand-edited null read "'NoneType' object is not subscriptable" (or "… not iterable")
    (lambda p: _null(p, "threshold"), "threshold must be an object, got None"),
    (lambda p: _null(p, "params"), "params must be an object, got None"),
    (lambda p: _null(p, "normalisation"), "normalisation must be an object, got None"),
    # each of these was taken, and scored every window normal (NaN) or anomalous (< 0), or raised a traceback
    (lambda p: _edit(p, threshold={"quantile": 0.95, "margin": 1.0, "value": float("nan")}), "finite value > 0"),
    (lambda p: _edit(p, threshold={"quantile": 0.95, "margin": 1.0, "value": -1.0}), "finite value > 0"),
    (lambda p: _edit(p, channels=2), "list of names"),
    (lambda p: _edit(p, validation_error_quantiles=[1, 2]), "must be an object"),
    (lambda p: _edit(p, validation_error_quantiles={"0.5": float("nan")}), "finite errors >= 0"),
    (lambda p: _edit(p, validation_channel_error_median=[0.1]), "list of 2 error"),
    (lambda p: _edit(p, validation_channel_error_median=[0.1, -1.0]), "finite errors >= 0"),
    (lambda p: _edit(p, validation_channel_error_median={"ch0": 1}), "list of 2 error"),
    (lambda p: _edit(p, training="x"), "training must be an object"),  # loaded; eval then raised a traceback
    (lambda p: _edit(p, weights={"file": "weights.safetensors"}), "no sha256"),
    (lambda p: _nan_weights(p), "hold NaN or inf"),
    # the models review: each of these raised a traceback (OverflowError, IndexError at the first score,
    # RecursionError, a dtype mismatch in the first matmul) or scored every window anomalous
    (lambda p: _raw(p, "threshold", '{"quantile": 0.95, "margin": 1.0, "value": 1' + "0" * 400 + "}"), "out of range"),
    (lambda p: _edit(p, hop=10**30), "out of range"),
    (lambda p: _edit(p, hop=2**40), r"hop must be an integer in 1\.\."),
    # README: an artifact's hop longer than its window is refused at load; the daemon refused it, but score and
    # eval took it and skipped the samples between windows (30 of every 50 never scored) without a word
    (lambda p: _edit(p, hop=41), r"hop 41 is longer than its window \(40 samples\)"),
    (lambda p: (p / "manifest.json").write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    (lambda p: _half_weights(p), "not float32"),
    (lambda p: _normalisation(p, scale=[1e-300, 1e-300]), r"finite \(in float32\)"),
    (lambda p: _normalisation(p, method="bogus"), "method 'bogus' is not one of"),
    # a wrong type said only Python's words ("could not convert string to float: 'x'", "unhashable type: 'list'"),
    # or was taken: a string "0.1" as the threshold, [] as sliding windows
    (lambda p: _normalisation(p, center="x"), r"normalisation\.center must be a list of numbers, got 'x'"),
    (lambda p: _normalisation(p, scale=[1, "2"]), r"normalisation\.scale\[1\] must be a number, got '2'"),
    (lambda p: _normalisation(p, window_spread=[True, 1]), r"normalisation\.window_spread\[0\] must be a number"),
    (lambda p: _edit(p, threshold={"quantile": 0.95, "margin": 1.0, "value": "0.1"}),
     "threshold.value must be a number, got '0.1'"),
    (lambda p: _edit(p, validation_error_quantiles={"0.5": "a"}), r"validation_error_quantiles\['0\.5'\] must be"),
    (lambda p: _edit(p, validation_channel_error_median=[0.1, "x"]), r"median\[1\] must be a number, got 'x'"),
    (lambda p: _edit(p, kind=["lstm"]), r"kind must be a name, got \['lstm'\]"),
    (lambda p: _edit(p, windowing=[]), r"windowing must be an object, got \[\]"),
])
def test_damaged_artifacts_fail_with_one_line(trained, tmp_path: Path, damage, message: str) -> None:
    _, _, path = trained
    copy = _copy(path, tmp_path)
    damage(copy)
    with pytest.raises(ArtifactError, match=message) as err:
        artifact.load(copy)
    assert "\n" not in str(err.value)


def _edit(path: Path, **changes: object) -> None:
    m = json.loads((path / "manifest.json").read_text())
    for k, v in changes.items():
        if v is None:
            m.pop(k)
        else:
            m[k] = v
    (path / "manifest.json").write_text(json.dumps(m))


def _null(path: Path, key: str) -> None:
    m = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**m, key: None}))


def _raw(path: Path, key: str, text: str) -> None:
    """Set ``key`` to JSON text that json.dumps would not write (an integer of 400 digits)."""
    m = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**m, key: "@@"}).replace('"@@"', text))


def _normalisation(path: Path, **changes: object) -> None:
    m = json.loads((path / "manifest.json").read_text())
    _edit(path, normalisation={**m["normalisation"], **changes})


def _half_weights(path: Path) -> None:
    from safetensors.torch import load, save

    state = {n: t.half() if t.is_floating_point() else t for n, t in load((path / "weights.safetensors").read_bytes()).items()}
    blob = save(state)
    (path / "weights.safetensors").write_bytes(blob)
    m = json.loads((path / "manifest.json").read_text())
    _edit(path, weights={**m["weights"], "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)})


def _nan_weights(path: Path) -> None:
    from safetensors.torch import load, save

    state = load((path / "weights.safetensors").read_bytes())
    name = next(n for n, t in state.items() if t.is_floating_point())  # BatchNorm counters are int64
    state[name] = torch.full_like(state[name], float("nan"))
    blob = save(state)
    (path / "weights.safetensors").write_bytes(blob)
    m = json.loads((path / "manifest.json").read_text())
    _edit(path, weights={**m["weights"], "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)})


def test_pca_weights_for_another_window_are_incompatible(series_csv: Path, tmp_path: Path) -> None:
    # PCA buffers are sized at fit time, so torch's strict loading does not check them
    ds = series_dataset(read_series(series_csv), window=40, hop=10)
    det, _ = train_detector(ds, "pca", {}, TrainConfig(device="cpu"))
    copy = artifact.save(det, tmp_path / "pca")
    m = json.loads((copy / "manifest.json").read_text())
    _edit(copy, window=16, params={**m["params"], "window": 16})
    with pytest.raises(ArtifactError, match=r"has shape \[(\d, )?80\] for windows of 32"):  # was a RuntimeError at the first score
        artifact.load(copy)


def test_params_that_would_build_a_huge_model_are_refused_before_it_is_built(series_csv: Path, tmp_path: Path) -> None:
    """A manifest whose params were edited (the weights left alone, their sha256 still right) had the model built
    before the weights were found not to fit: 12.6 GiB for hidden [40000, 40000], and a raw RuntimeError from the
    allocator for 2^20 (security review). Its shapes are checked first, on torch's meta device."""
    import resource

    ds = series_dataset(read_series(series_csv), window=40, hop=10)
    det, _ = train_detector(ds, "dense", {"hidden": [8], "code": 4}, TrainConfig(epochs=1, device="cpu"))
    copy = artifact.save(det, tmp_path / "dense")
    m = json.loads((copy / "manifest.json").read_text())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for hidden in ([40_000, 40_000], [1 << 20, 1 << 20]):
        _edit(copy, params={**m["params"], "hidden": hidden})
        with pytest.raises(ArtifactError, match="do not fit a dense model|weights, over the 500,000,000"):
            artifact.load(copy)
    pca, _ = train_detector(ds, "pca", {}, TrainConfig(device="cpu"))
    pca_copy = artifact.save(pca, tmp_path / "pca")
    pm = json.loads((pca_copy / "manifest.json").read_text())
    _edit(pca_copy, params={**pm["params"], "components": 5_000_000})  # built before compared: 1.6 GB here
    with pytest.raises(ArtifactError, match=r"params.components is 5000000, the weights hold \d+"):
        artifact.load(pca_copy)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: nothing the size was made
    with pytest.raises(ModelConfigError, match="lstm with these hyper-parameters holds 6,000,580,001 weights"):
        build("lstm", {"window": 20, "channels": 1, "embedding": 10_000})  # `tsmon train --embedding 10000`: 22 GiB
    with pytest.raises(ModelConfigError, match="too large to build"):
        build("lstm", {"window": 20, "channels": 1, "embedding": 10**9})  # a torch traceback


def test_a_pca_fitted_past_the_size_cap_is_refused_at_train_not_at_load(series_csv: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its component count is known only after the fit (built with one): train saved an artifact load refused."""
    import models.registry

    monkeypatch.setattr(models.registry, "MAX_PARAMETERS", 200)
    ds = series_dataset(read_series(series_csv), window=40, hop=10)
    with pytest.raises(ModelConfigError, match="pca with these hyper-parameters holds .* over the 200"):
        train_detector(ds, "pca", {}, TrainConfig(device="cpu"))


def test_weights_of_another_shape_are_incompatible(trained, tmp_path: Path) -> None:
    det, _, path = trained
    if det.kind != "lstm":
        pytest.skip("one kind is enough")
    copy = _copy(path, tmp_path)
    m = json.loads((copy / "manifest.json").read_text())
    m["params"]["embedding"] = 16
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="do not fit a lstm model"):
        artifact.load(copy)


def test_missing_artifact_and_channel_mismatch(trained, tmp_path: Path) -> None:
    _, _, path = trained
    with pytest.raises(ArtifactError, match="not found"):
        artifact.load(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="expects 2 channel"):
        artifact.load(path, expect_channels=3)


def test_a_downsampled_model_scores_the_averaged_windows_and_round_trips(series_csv: Path, tmp_path: Path) -> None:
    """--downsample 4: windows of 40 samples, an LSTM of 10 steps; every caller still sees 40-sample windows."""
    from models.detector import Detector, pool

    ds = series_dataset(read_series(series_csv), window=40, hop=10)
    det, training = train_detector(ds, "lstm", {"embedding": 8}, TrainConfig(epochs=2, seed=3, device="cpu"),
                                   downsample=4)
    assert det.window == 40 and det.model.config.window == 10 and det.downsample == 4
    s = det.score(ds.test)
    assert s.window.shape == (len(ds.test),) and s.channel.shape == (len(ds.test), 2)
    assert s.timestep.shape == (len(ds.test), 40)  # back at the stream's rate: each step's error 4 times
    np.testing.assert_array_equal(s.timestep[:, ::4], s.timestep[:, 3::4])
    # the same model at its own rate, fed windows averaged by hand, gives the same errors
    plain = Detector(det.model, det.scaler, det.threshold, det.quantiles, det.loss, det.channel_names, det.hop)
    centred = det.scaler.transform(ds.test)
    means = np.stack([centred[:, 4 * i : 4 * i + 4].mean(1) for i in range(10)], axis=1)  # samples 0-3, 4-7, …
    by_hand = plain.score_tensor(torch.from_numpy(means.astype("float32")))[0].numpy()
    np.testing.assert_allclose(s.window, by_hand, rtol=1e-5)
    ramp = np.arange(2 * 8 * 1, dtype="float32").reshape(2, 8, 1)
    np.testing.assert_array_equal(pool(ramp, 4)[:, :, 0], [[1.5, 5.5], [9.5, 13.5]])
    recon, _ = det.reconstruct(ds.test[:3])
    assert recon.shape == (3, 40, 2)
    np.testing.assert_array_equal(recon[:, ::4], recon[:, 3::4])  # one model step per 4 samples
    from models.workflow import baseline

    assert baseline(ds, det).downsample == 4  # the PCA it is compared with sees the same averaged windows
    path = artifact.save(det, tmp_path / "ds4", training)
    again = artifact.load(path, device="cpu")
    assert again.downsample == 4 and again.window == 40
    np.testing.assert_array_equal(again.score(ds.test).window, s.window)
    m = json.loads((path / "manifest.json").read_text())
    assert m["window"] == 40 and m["params"]["window"] == 10 and m["downsample"] == 4
    assert m["format_version"] == 2  # a tsmon that cannot average says so instead of "window differs"
    m["downsample"] = 3  # 10 × 3 ≠ 40
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="downsample 3"):
        artifact.load(path, device="cpu")
    with pytest.raises(Exception, match="divide the window"):
        train_detector(ds, "pca", {}, TrainConfig(epochs=1, device="cpu"), downsample=3)


def test_an_lstm_artifact_from_before_reverse_reads_as_the_classic_order(series_csv: Path, tmp_path: Path) -> None:
    """Format 3 marks a reversed lstm; the classic order is written without the key (format 1), as an older tsmon
    wrote it and still reads it."""
    ds = series_dataset(read_series(series_csv), window=40, hop=10)
    cfg = TrainConfig(epochs=1, seed=3, device="cpu")
    rev, training = train_detector(ds, "lstm", {"embedding": 8, "reverse": True}, cfg)
    m = json.loads((artifact.save(rev, tmp_path / "rev", training) / "manifest.json").read_text())
    assert m["params"]["reverse"] is True and m["format_version"] == 3
    classic, training = train_detector(ds, "lstm", {"embedding": 8}, cfg)
    path = artifact.save(classic, tmp_path / "classic", training)
    m = json.loads((path / "manifest.json").read_text())
    assert "reverse" not in m["params"] and m["format_version"] == 1  # as an older tsmon wrote it, and reads it
    again = artifact.load(path, device="cpu")
    assert again.model.config.reverse is False
    np.testing.assert_array_equal(again.score(ds.test).window, classic.score(ds.test).window)


def test_a_save_that_fails_leaves_the_previous_artifact_whole(trained, tmp_path: Path) -> None:
    # the weights used to be written before the manifest was serialised: a NaN in it (a --threshold-margin nan)
    # left new weights beside the old manifest, and the artifact failed its sha256 check from then on
    det, ds, path = trained
    copy = _copy(path, tmp_path)
    broken = dataclasses.replace(det, threshold=dataclasses.replace(det.threshold, value=float("nan")))
    with pytest.raises(ValueError, match="JSON"):
        artifact.save(broken, copy)
    np.testing.assert_array_equal(artifact.load(copy, device="cpu").score(ds.test).window, det.score(ds.test).window)
    assert sorted(p.name for p in copy.iterdir()) == ["manifest.json", "weights.safetensors"]


def test_the_same_weights_give_the_same_file_in_every_process() -> None:
    """safetensors writes its metadata keys in a per-process hash order: two keys gave two files (and two
    sha256, the model version in alert ids) for the same weights, about every other run."""
    import subprocess
    import sys

    code = ("import hashlib, torch; from models.artifact import weights_blob; "
            "print(hashlib.sha256(weights_blob({'w': torch.arange(6.0).reshape(2, 3)}, 'lstm')).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[2]).stdout for _ in range(6)}
    assert len(digests) == 1


def test_two_saves_to_one_directory_leave_one_whole_artifact(series_csv: Path, tmp_path: Path) -> None:
    """Two trainings to one --out (two `make demo` at once, a retrain while one runs) shared fixed temporary names:
    they renamed each other's files into place, and the artifact was left unloadable in 84–199 of 300 trials —
    with one of them reporting success. Saves now take turns, each file written whole before it is renamed."""
    import threading

    ds = series_dataset(read_series(series_csv), window=40, hop=10)
    a, _ = train_detector(ds, "pca", {}, TrainConfig(epochs=1, seed=0, device="cpu"))
    b, _ = train_detector(ds, "pca", {"components": 2}, TrainConfig(epochs=1, seed=0, device="cpu"))
    out = tmp_path / "race"
    errors: list[BaseException] = []

    def go(det: Any) -> None:
        try:
            artifact.save(det, out)
        except BaseException as exc:  # noqa: BLE001 - counted
            errors.append(exc)

    for _ in range(40):
        savers = [threading.Thread(target=go, args=(d,)) for d in (a, b)]
        for t in savers:
            t.start()
        for t in savers:
            t.join()
        loaded = artifact.load(out, "cpu")
        assert loaded.model.config.to_dict()["components"] in (a.model.config.components, 2)
    assert errors == [] and sorted(p.name for p in out.iterdir()) == ["manifest.json", "weights.safetensors"]


def test_weights_of_another_size_are_refused_before_they_are_read(trained, tmp_path: Path) -> None:
    """A weights file grown to 1 GiB was read whole (1.36 GB) before its sha256 told it apart."""
    _, _, path = trained
    copy = _copy(path, tmp_path)
    with open(copy / "weights.safetensors", "ab") as f:
        f.truncate(1 << 30)  # sparse: no disk taken
    with pytest.raises(ArtifactError, match="bytes, the manifest says"):
        artifact.load(copy, "cpu")


def test_a_folder_that_may_take_an_artifact_is_taken_and_a_killed_save_is_cleared(trained, tmp_path: Path) -> None:
    """Review: a folder holding only a .gitkeep, a fresh volume's lost+found, or the weights a killed first save
    left was refused as "another program's directory"; a killed save's temporary files piled up."""
    det, _, _ = trained
    out = tmp_path / "vol"
    (out / "lost+found").mkdir(parents=True)
    (out / ".gitkeep").write_text("")
    (out / "weights.safetensors").write_bytes(b"half")
    stale = out / ".tsmon-tmp-0badc0de"
    stale.mkdir()
    (stale / "weights.safetensors").write_bytes(b"x" * 1000)
    artifact.check_target(out)
    artifact.save(det, out)
    assert not stale.exists() and artifact.load(out, "cpu").kind == det.kind
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="holds no tsmon artifact"):
        artifact.check_target(tmp_path / "app")


@pytest.mark.parametrize("name", ["manifest.json", "weights.safetensors"])
def test_a_file_of_the_artifact_given_for_it_names_its_directory(trained, name: str) -> None:
    """`--model art/manifest.json` said "art/manifest.json is not a tsmon model artifact (no manifest.json)"."""
    _, _, path = trained
    with pytest.raises(ArtifactError, match=f"is a file of the artifact: give its directory, {re.escape(str(path))}$"):
        artifact.load(path / name)
