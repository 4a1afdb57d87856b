"""Pictures for people: a window, its reconstruction, the error per timestep and the threshold."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: pictures go to files, never to a screen
import matplotlib.pyplot as plt
import numpy as np

from models.detector import Detector
from models.files import replace_atomically


def window_figure(detector: Detector, window: np.ndarray, out: str | Path, title: str = "") -> Path:
    """Save a PNG of one raw window ``[W, C]``: signal vs reconstruction per channel, then the error."""
    x = np.asarray(window, dtype="float32")[None]
    recon, scores = detector.reconstruct(x)
    recon = recon[0]
    c = detector.channels
    fig, axes = plt.subplots(c + 1, 1, figsize=(10, 2.2 * (c + 1)), sharex=True, squeeze=False)
    t = np.arange(detector.window)
    for i in range(c):
        ax = axes[i, 0]
        name = detector.names[i]
        ax.plot(t, x[0, :, i], label=f"{name} (input)", color="tab:blue")
        ax.plot(t, recon[:, i], label="reconstruction", color="tab:orange", linestyle="--")
        ax.set_ylabel(name)
        ax.set_title(f"{name}: channel error {scores.channel[0, i]:.4g}", fontsize=9, loc="left")
        ax.legend(loc="upper right", fontsize=8)
    ax = axes[c, 0]
    ax.fill_between(t, scores.timestep[0], color="tab:red", alpha=0.5, label="error per timestep")
    ax.axhline(float(scores.window[0]), color="tab:red", linestyle="--",
               label=f"window score {scores.window[0]:.4g} (mean of the error)")
    ax.axhline(detector.threshold.value, color="black", linestyle=":",
               label=f"threshold {detector.threshold.value:.4g} (for the window score)")
    ax.set_xlabel("timestep")
    ax.set_ylabel(f"{detector.loss} error (normalised units)")
    ax.legend(loc="upper right", fontsize=8)
    verdict = "ANOMALY" if not scores.window[0] <= detector.threshold.value else "normal"
    ratio = scores.window[0] / detector.threshold.value if detector.threshold.value > 0 else float("inf")
    heading = f"{title} score {scores.window[0]:.4g} = {ratio:.2f}× threshold {detector.threshold.value:.4g}: {verdict}"
    fig.suptitle("\n".join(textwrap.wrap(heading, 100)))  # one line was cut off at both sides (a new user's pass)
    return save_figure(fig, out)


def save_figure(fig: Any, out: str | Path) -> Path:
    """Lay out, write as PNG (creating the folder), and free the figure."""
    fig.tight_layout()
    try:  # whole or not at all: a full disk left a cut PNG that still read as one
        return replace_atomically(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
