#!/usr/bin/env bash
# Short GPU re-run of the end-to-end step benchmark only (after a change to the fast path):
# installs the project into the machine's CUDA Python and runs both GPU presets, ours packed
# (auto) and padded, writing JSON + log to ${OUT:-benchmarks/results}.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
  for preset in 7b-2layer 7b-2layer-v152k; do
    for packed in auto off; do
      timeout 90 "$PY" benchmarks/bench_sanitize.py --preset "$preset" --device cuda --warmup 2 \
        --iters 5 --packed "$packed" --json "$OUT_DIR/bench_${preset}_packed-${packed}_cuda.json"
    done
  done
} 2>&1 | tee "$OUT_DIR/gpu_bench.log"
