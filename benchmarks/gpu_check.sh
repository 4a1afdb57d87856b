#!/usr/bin/env bash
# The GPU checks of issue 7 as one bounded script, for a machine with CUDA (e.g. the `device` tool):
#   bash benchmarks/gpu_check.sh [OUT_DIR]            benchmarks only: under 9 minutes in all (step limits)
#   TESTS=1 bash benchmarks/gpu_check.sh [OUT_DIR]    the test suite after them (up to 10 minutes more)
# Writes JSON per check to OUT_DIR (default runs/gpu) and a summary to stdout, which ends with each GPU target
# met or MISSED (exit 1 if any is missed or none could be judged). Needs a .venv with a CUDA
# build of torch (`make venv TORCH=torch==2.13.0` on a CUDA host pulls one) and the ECG5000 LSTM artifact
# (`make demo` trains it, or pass MODEL=DIR). Each step has its own time limit; a failed step is reported
# and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu}
MODEL=${MODEL:-artifacts/ecg5000-lstm}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
step() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name"
    if timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"; then echo "ok"; else echo "FAILED ($?): see $OUT/$name.log"; fi
}
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"
# scorer: batch 1 vs the daemon's micro-batch vs a large batch, float32 and the reduced precisions
for p in float32 float16 bfloat16; do
    step "scorer-lstm-$p" 60 $PY -m monitor bench scorer --device cuda --precision "$p" --seconds 2 --json
done
step scorer-all-kinds 90 $PY -m monitor bench scorer --device cuda --kind all --seconds 1 --json
step latency 150 $PY -m monitor bench latency --device cuda --model "$MODEL" --seconds 10 --overload-s 2 --json
step pipeline 120 $PY -m monitor bench pipeline --device cuda --model "$MODEL" --json
if [ -n "${TESTS:-}" ]; then
    echo "== tests"
    timeout 600 $PY -m pytest -q -x -p no:cacheprovider > "$OUT/pytest.log" 2>&1; echo "pytest exit $?"; tail -3 "$OUT/pytest.log"
fi
$PY - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
verdicts = []  # (target, measured, met): the GPU targets of README's GPU section, judged on this run's figures


def judge(target: str, measured: str, met: bool) -> None:
    verdicts.append((target, measured, met))


for f in sorted(out.glob("scorer-*.json")):
    try:
        rs = json.loads(f.read_text())
    except ValueError:
        continue
    for r in rs if isinstance(rs, list) else [rs]:
        print(f"{f.stem:24} {r['model']:6} {r['precision']:9} batch1 {r['batch1_windows_per_s']:>10,.0f}/s  "
              f"batched({r['batch_size']}) {r['batched_windows_per_s']:>12,.0f}/s  ratio {r['ratio']:7.1f}x  "
              f"micro-batch {r['daemon_batch']} {r['daemon_batch_ms']:.2f} ms  diff {r['precision_max_diff']:.2%}")
        if f.stem.startswith("scorer-lstm-"):  # the default model at window 140, one row per precision
            tag = f"lstm {r['precision']}"
            judge(f"{tag}: batched >= 50 000 windows/s", f"{r['batched_windows_per_s']:,.0f}/s",
                  r["batched_windows_per_s"] >= 50_000)
            judge(f"{tag}: batched >= 50x the batch-1 loop", f"{r['ratio']:.1f}x", r["ratio"] >= 50)
            judge(f"{tag}: micro-batch of {r['daemon_batch']} <= 10 ms", f"{r['daemon_batch_ms']:.2f} ms",
                  r["daemon_batch_ms"] <= 10)
for name in ("latency", "pipeline"):
    try:
        r = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        continue
    keys = ("p50_ms", "p99_ms", "bound_ms", "batch_scoring_ms") if name == "latency" else ("pipeline_samples_per_s", "ratio")
    print(name, {k: r.get(k) for k in keys}, r.get("adaptive", {}).get("p99_ms", ""))
    if name == "latency":
        judge("latency: p99 <= max_delay_ms + 2 x one batch", f"{r['p99_ms']} ms against {r['bound_ms']} ms",
              bool(r["within_bound"]))
print("== targets")
for target, measured, met in verdicts:
    print(f"{'met' if met else 'MISSED':7} {target}: {measured}")
if not verdicts:
    print("none judged: no scorer or latency figures were written")
sys.exit(0 if verdicts and all(met for _, _, met in verdicts) else 1)
EOF
