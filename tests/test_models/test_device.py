"""Device-agnostic scoring and the scorer benchmark's honesty, CUDA parts stood in for on a CPU-only machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from models.detector import Detector, Threshold
from models.registry import build
from models.scaling import Scaler

FLAGS = (torch.backends.cudnn.rnn, torch.backends.cudnn.conv, torch.backends.cuda.matmul)


@pytest.fixture
def tf32_flags() -> Iterator[None]:
    """torch's defaults (TF32 for cuDNN's RNNs and convolutions), restored afterwards: the flags are process-wide."""
    before = [f.fp32_precision for f in FLAGS]
    try:
        yield
    finally:
        for f, value in zip(FLAGS, before, strict=True):
            f.fp32_precision = value


def detector(kind: str = "lstm", window: int = 16, channels: int = 1) -> Detector:
    model = build(kind, {"window": window, "channels": channels, **({"embedding": 4} if kind == "lstm" else {})})
    scaler = Scaler(tuple([0.0] * channels), tuple([1.0] * channels))
    return Detector(model.eval(), scaler, Threshold(0.99, 1.0, 1.0), {}, "l1", [f"ch{i}" for i in range(channels)],
                    window)


def test_a_detector_put_on_cuda_scores_in_ieee_float32(tf32_flags: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the daemon's Scorer turned cuDNN's TF32 off: `tsmon bench scorer --device cuda` measured the LSTM in TF32
    (its "float32" figures, and its efficiency against an IEEE float32 GEMM, were not what the daemon serves; its
    precision_max_diff compared against TF32), and `score`, `eval` and the threshold `train` derives scored in TF32."""
    det = detector()
    monkeypatch.setattr(det.model, "to", lambda *_a, **_k: det.model)  # the CUDA part stood in for
    assert FLAGS[0].fp32_precision == "tf32"  # torch's default
    det.to(torch.device("cuda"))
    assert [f.fp32_precision for f in FLAGS] == ["ieee"] * 3
