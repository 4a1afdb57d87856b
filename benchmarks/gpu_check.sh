#!/usr/bin/env bash
# The GPU checks of issue 7 as one bounded script, for a machine with CUDA (e.g. the `device` tool):
#   bash benchmarks/gpu_check.sh [OUT_DIR]            benchmarks only: under 9 minutes in all (step limits)
#   TESTS=1 bash benchmarks/gpu_check.sh [OUT_DIR]    the test suite after them (up to 10 minutes more)
# Writes JSON per check to OUT_DIR (default runs/gpu) and a summary to stdout. Needs a .venv with a CUDA
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
for f in sorted(out.glob("scorer-*.json")):
    try:
        rs = json.loads(f.read_text())
    except ValueError:
        continue
    for r in rs if isinstance(rs, list) else [rs]:
        print(f"{f.stem:24} {r['model']:6} {r['precision']:9} batch1 {r['batch1_windows_per_s']:>10,.0f}/s  "
              f"batched({r['batch_size']}) {r['batched_windows_per_s']:>12,.0f}/s  ratio {r['ratio']:7.1f}x  "
              f"micro-batch {r['daemon_batch']} {r['daemon_batch_ms']:.2f} ms  diff {r['precision_max_diff']:.2%}")
for name in ("latency", "pipeline"):
    try:
        r = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        continue
    keys = ("p50_ms", "p99_ms", "bound_ms", "batch_scoring_ms") if name == "latency" else ("pipeline_samples_per_s", "ratio")
    print(name, {k: r.get(k) for k in keys}, r.get("adaptive", {}).get("p99_ms", ""))
EOF
