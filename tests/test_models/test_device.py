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


@pytest.fixture
def cuda_stand_in(monkeypatch: pytest.MonkeyPatch) -> tuple[list[torch.dtype], list[str]]:
    """bench_scorer on a "CUDA" detector whose tensors stay on the CPU: copies to CUDA, syncs, autocast and the device's
    name stood in for, the GEMM shrunk to 64² on the CPU; returns the dtypes the GEMM reference was asked for and the
    precisions autocast was asked for."""
    from models import benchmark

    real_to, real_gemm, real_autocast = torch.Tensor.to, benchmark._gemm, benchmark.autocast
    gemm_dtypes: list[torch.dtype] = []
    asked: list[str] = []

    def to(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            return self
        return real_to(self, *args, **kwargs)  # type: ignore[arg-type]

    def gemm(_device: torch.device, n: int | None = None, dtype: torch.dtype = torch.float32) -> object:
        gemm_dtypes.append(dtype)
        return real_gemm(torch.device("cpu"), 64, *([dtype] if dtype != torch.float32 else []))

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(benchmark, "_sync", lambda _d: None)
    monkeypatch.setattr(benchmark, "_gemm", gemm)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None: "stand-in GPU")
    monkeypatch.setattr(benchmark, "autocast", lambda _d, p: (asked.append(p), real_autocast(torch.device("cpu"), p))[1])
    return gemm_dtypes, asked


def test_bench_scorer_runs_and_labels_the_precision_the_daemon_serves(
        cuda_stand_in: tuple[list[torch.dtype], list[str]]) -> None:
    """`tsmon bench scorer --precision bfloat16` on CUDA ran the LSTM under bfloat16 autocast, which cuDNN runs in
    float16, and labelled it "bfloat16" (the daemon's Scorer serves and says float16 since its review): gpu_check.sh
    judged an "lstm bfloat16" row that was float16."""
    from models import benchmark

    asked = cuda_stand_in[1]
    det = detector("lstm")
    det.device = torch.device("cuda")
    r = benchmark.bench_scorer(det, batch_size=64, seconds=0.01, batch1_windows=2, daemon_batch=8,
                               precision="bfloat16")
    assert asked == ["float16"] and r["precision"] == "float16"
    det = detector("dense")
    det.device = torch.device("cuda")
    r = benchmark.bench_scorer(det, batch_size=64, seconds=0.01, batch1_windows=2, daemon_batch=8,
                               precision="bfloat16")
    assert asked[-1] == "bfloat16" and r["precision"] == "bfloat16"  # only cuDNN's RNNs ignore the dtype


def test_bench_scorer_sets_a_reduced_precision_model_against_the_gemm_rate_of_that_precision(
        cuda_stand_in: tuple[list[torch.dtype], list[str]]) -> None:
    """`--precision float16` on CUDA divided the float16 model's GFLOP/s by the float32 GEMM rate (no tensor cores):
    an efficiency flattering by construction (above 1 possibly); float32 keeps the float32 GEMM."""
    from models import benchmark

    for precision, dtype in (("float16", torch.float16), ("float32", torch.float32)):
        det = detector("dense")
        det.device = torch.device("cuda")
        benchmark.bench_scorer(det, batch_size=64, seconds=0.01, batch1_windows=2, daemon_batch=8, precision=precision)
        assert cuda_stand_in[0][-1] == dtype


def test_bench_scorer_measures_the_daemon_micro_batch_with_the_daemon_scoring_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon scores on CPU with the usable CPUs − 1 threads (its consuming thread needs a core); the benchmark's
    `daemon_batch_ms` was measured with every thread, up to 2 × flattering on 2 cores. Torch's threads are restored."""
    from models import benchmark

    det, seen = detector("dense"), []
    score = det.score_tensor
    monkeypatch.setattr(det, "score_tensor", lambda x: (seen.append((len(x), torch.get_num_threads())), score(x))[1])
    own = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        r = benchmark.bench_scorer(det, batch_size=64, seconds=0.01, batch1_windows=2, daemon_batch=8, daemon_threads=1)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(own)
    assert r["daemon_batch_threads"] == 1
    assert {t for n, t in seen if n == 64} == {3} and {t for n, t in seen if n == 1} == {3}
    assert sum(t == 1 for n, t in seen if n == 8) >= 10  # five rounds, a warm-up call and at least one timed each
