"""Every model kind honours the same scoring contract (river-style generic checks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data import make_windows
from models.errors import DataError, ModelConfigError
from models.evaluate import roc_auc
from models.registry import KINDS, build
from models.scaling import Scaler
from models.train import TrainConfig, fit

SMALL = {"lstm": {"embedding": 8}, "dense": {"hidden": [32], "code": 4}, "conv": {"filters": [8, 4]},
         "vae": {"hidden": [32], "latent": 4}, "pca": {"components": 4}}


def toy_windows(n: int = 300, window: int = 24, channels: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n * 4 + window)
    vals = np.stack([np.sin(2 * np.pi * t / 12 + c) for c in range(channels)], axis=1)
    vals += 0.05 * rng.normal(size=vals.shape)
    w, _ = make_windows(vals.astype("float32"), window, 4)
    return np.ascontiguousarray(w[:n])


@torch.no_grad()
def scores(model: torch.nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = model.eval().errors(torch.from_numpy(np.ascontiguousarray(x)))
    return v.window.numpy(), v.channel.numpy()


@pytest.mark.parametrize("kind", list(KINDS))
def test_shapes_and_views(kind: str) -> None:
    model = build(kind, {"window": 24, "channels": 3, **SMALL[kind]}).eval()
    if kind == "pca":
        model.fit(np.random.default_rng(0).normal(size=(40, 24, 3)).astype("float32"))
    x = torch.randn(5, 24, 3)
    with torch.no_grad():
        views = model.errors(x)
    assert views.window.shape == (5,)
    assert views.channel.shape == (5, 3)
    assert views.timestep.shape == (5, 24)
    # the three views are means of the same elementwise error
    torch.testing.assert_close(views.channel.mean(1), views.window)
    torch.testing.assert_close(views.timestep.mean(1), views.window)
    assert model.flops_per_window() > 0


@pytest.mark.parametrize("kind", list(KINDS))
def test_training_lowers_loss_and_spike_scores_higher(kind: str) -> None:
    wins = toy_windows()
    scaler = Scaler.fit(wins)
    x = scaler.transform(wins)
    model = build(kind, {"window": 24, "channels": 2, **SMALL[kind]})
    before = scores(model, x[250:])[0].mean()
    res = fit(model, x[:250], x[250:], TrainConfig(epochs=15, batch_size=32, lr=3e-3, patience=15, seed=1))
    assert scores(model, x[250:])[0].mean() < before
    if kind != "pca":
        assert res.history[-1].train_loss < res.history[0].train_loss
    spiked = x[250:].copy()
    spiked[:, 10:14, 0] += 4.0
    normal_s, _ = scores(model, x[250:])
    spike_s, spike_c = scores(model, spiked)
    assert roc_auc(np.r_[np.zeros(len(normal_s)), np.ones(len(spike_s))], np.r_[normal_s, spike_s]) > 0.9
    assert spike_c[:, 0].mean() > spike_c[:, 1].mean()  # the perturbed channel carries the error


@pytest.mark.parametrize("kind", ["lstm", "dense", "vae"])
def test_training_is_deterministic_for_a_seed(kind: str) -> None:
    x = Scaler.fit(toy_windows(120)).transform(toy_windows(120))
    outs = []
    for _ in range(2):
        torch.manual_seed(7)  # initial weights come from the global generator, as in train_detector
        m = build(kind, {"window": 24, "channels": 2, **SMALL[kind]})
        fit(m, x[:100], x[100:], TrainConfig(epochs=2, seed=7))
        outs.append(scores(m, x)[0])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_training_runs_with_its_threads_and_records_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch's default is one thread a core: on 2 cores a first `make demo` beside one busy process trained 14× slower
    (each step's threads wait on one another) and ran 25 minutes without finishing. Training takes the usable CPUs
    − 1 unless told, says how many it used (the same seed gives the same weights with as many), and gives the
    process's count back."""
    from models import train

    seen: list[int] = []
    x = Scaler.fit(toy_windows(60)).transform(toy_windows(60))
    m = build("dense", {"window": 24, "channels": 2, **SMALL["dense"]})
    before = torch.get_num_threads()
    monkeypatch.setattr(train, "usable_cpus", lambda: 3)
    res = fit(m, x[:50], x[50:], TrainConfig(epochs=1), on_epoch=lambda _: seen.append(torch.get_num_threads()))
    assert (res.threads, seen, res.to_dict()["threads"]) == (2, [2], 2) and torch.get_num_threads() == before
    monkeypatch.setattr(train, "usable_cpus", lambda: 1)
    assert fit(m, x[:50], x[50:], TrainConfig(epochs=1)).threads == 1
    assert fit(m, x[:50], x[50:], TrainConfig(epochs=1, threads=3)).threads == 3 and torch.get_num_threads() == before
    with pytest.raises(ModelConfigError, match="threads must be >= 1"):
        fit(m, x[:50], x[50:], TrainConfig(epochs=1, threads=0))


def test_denoising_and_sparsity_options_train() -> None:
    x = Scaler.fit(toy_windows(120)).transform(toy_windows(120))
    m = build("dense", {"window": 24, "channels": 2, "hidden": [16], "code": 4, "dropout": 0.1, "batch_norm": True})
    res = fit(m, x[:100], x[100:], TrainConfig(epochs=3, noise_std=0.2, sparsity=1e-3, loss="mse"))
    assert res.epochs_run == 3 and np.isfinite(res.best_val_loss)
    # 97 windows at batch 32 leave a last batch of one, which batch norm cannot train on (a traceback)
    res = fit(m, x[:97], x[100:], TrainConfig(epochs=2, batch_size=32))
    assert res.epochs_run == 2 and np.isfinite(res.best_val_loss)
    for windows, batch in ((1, 32), (97, 1)):  # one window per batch: a traceback from torch
        with pytest.raises(DataError, match="batch norm needs batches of at least 2 windows"):
            fit(m, x[:windows], x[100:], TrainConfig(epochs=1, batch_size=batch))
    conv = build("conv", {"window": 24, "channels": 2, "filters": [8, 4], "batch_norm": True})
    assert fit(conv, x[:1], x[100:], TrainConfig(epochs=1)).epochs_run == 1  # its batch norm sees the timesteps


def test_vae_elbo_score_is_larger_than_reconstruction() -> None:
    m = build("vae", {"window": 24, "channels": 2, "score": "elbo"}).eval()
    x = torch.randn(4, 24, 2)
    with torch.no_grad():
        assert (m.errors(x, elbo=True).window > m.errors(x).window).all()


@pytest.mark.parametrize("bad", [{"window": 1}, {"window": 24, "embedding": 0}, {"window": 24, "dropout": 1.5},
                                 {"window": 24, "nonsense": 3}])
def test_bad_hyper_parameters_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ModelConfigError):
        build("lstm", bad)


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ModelConfigError, match="unknown model kind"):
        build("transformer", {"window": 10})


@pytest.mark.parametrize("channels", [1, 3])
def test_batched_cpu_lstm_path_equals_nn_lstm(channels: int) -> None:
    """The hand-stepped inference path (large CPU batches) must give nn.LSTM's scores."""
    from models.lstm_ae import FUSED_MIN_BATCH

    torch.manual_seed(0)
    model = build("lstm", {"window": 30, "channels": channels, "embedding": 8}).eval()
    x = torch.randn(FUSED_MIN_BATCH + 5, 30, channels)
    with torch.no_grad():
        fast = model.errors(x)  # no grad + CPU + big batch → hand-stepped path
    with torch.enable_grad():
        ref = model.errors(x)  # autograd on → nn.LSTM path
    torch.testing.assert_close(fast.timestep, ref.timestep.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(fast.channel, ref.channel.detach(), atol=2e-6, rtol=1e-5)


def test_batched_cpu_lstm_path_is_for_inference_only() -> None:
    """The hand-stepped path has no dropout: a model in training mode under no_grad (a training-loss estimate, MC
    dropout) took it at 64 windows and more and silently dropped nothing, unlike the same call on fewer windows."""
    from models.lstm_ae import FUSED_MIN_BATCH

    torch.manual_seed(0)
    model = build("lstm", {"window": 12, "channels": 2, "embedding": 4, "dropout": 0.5}).train()
    x = torch.randn(FUSED_MIN_BATCH, 12, 2)
    with torch.no_grad():
        a, b = model(x).recon, model(x).recon
    assert not torch.equal(a, b)  # dropout applied, as nn.Dropout does in training mode


@pytest.mark.parametrize("batch", [5, 69])  # nn.LSTM path, hand-stepped path (>= FUSED_MIN_BATCH)
def test_reverse_lstm_is_the_same_network_read_back_to_front(batch: int) -> None:
    """``reverse``: the same weights emit the window last step first; both inference paths flip it back."""
    torch.manual_seed(0)
    classic = build("lstm", {"window": 30, "channels": 2, "embedding": 8}).eval()
    rev = build("lstm", {"window": 30, "channels": 2, "embedding": 8, "reverse": True}).eval()
    rev.load_state_dict(classic.state_dict())
    x = torch.randn(batch, 30, 2)
    with torch.no_grad():
        a, b = classic(x).recon, rev(x).recon
    torch.testing.assert_close(b, a.flip(1), atol=2e-6, rtol=1e-5)
    assert not torch.allclose(b, a, atol=1e-3)  # not the classic order


@pytest.mark.parametrize(("kind", "window", "params"), [
    ("dense", 140, {}), ("conv", 140, {}), ("vae", 140, {}), ("pca", 140, {"components": 4}),
    # windows that 2 ** layers does not divide: the decoder's lengths are not the encoder's (a review)
    ("conv", 141, {}), ("conv", 9, {"filters": [4, 4, 4]}), ("conv", 37, {"filters": [8, 8, 8], "kernel": 3})])
def test_flops_per_window_match_torchs_own_count(kind: str, window: int, params: dict[str, object]) -> None:
    """bench scorer's model_gflops and efficiency rest on these counts: conv counted its transposed convolutions
    at their output length, 1.5 × torch's count."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(kind, {"window": window, "channels": 2, **params}).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, window, 2))
    assert model.flops_per_window() == counter.get_total_flops()


def test_pca_reports_its_one_closed_form_epoch() -> None:
    """`train --model pca` left its progress bar at 0/1: the closed form never called on_epoch."""
    from models.train import EpochStats

    x = np.random.default_rng(0).normal(size=(60, 24, 2)).astype("float32")
    seen: list[EpochStats] = []
    result = fit(build("pca", {"window": 24, "channels": 2}), x[:50], x[50:], TrainConfig(device="cpu"), seen.append)
    assert [(s.epoch, s.epochs) for s in seen] == [(1, 1)] and result.stop_reason == "closed_form"
    assert seen[0].val_loss == result.best_val_loss and 0 < seen[0].train_loss < seen[0].val_loss
