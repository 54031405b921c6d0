#!/usr/bin/env bash
# GPU checks for one H100 (or H200) machine, in one call of under 8 minutes:
#   nvidia-smi; install the project if needed (offline, keeping the machine's CUDA torch, and the
#   optional fused-loss baselines liger-kernel / cut-cross-entropy when the machine has them);
#   the CUDA-marked tests; bench_sanitize.py (all sides: ours, strong, strong_liger, strong_cce,
#   published, naive) on randomly initialised full-depth Qwen1.5-4B and Llama-2-7B shapes, bf16,
#   at 4 x 1024 tokens and at the engine's token budget (8 x 1024), activation checkpointing off
#   and on; benchmarks/bench_kernels.py if time is left.
# Everything (JSON + log + junit XML) goes to ${OUT:-benchmarks/results}.
#
# Each step runs under `timeout` and the whole script under a wall-clock budget (BUDGET_S), so a
# slow step cannot eat the time of the ones after it. A failing step is logged and the script
# goes on; the exit status is non-zero when any step failed or was skipped. The benchmark runs go
# in order of priority (4 x 1024 first); those the budget leaves out are listed as skipped and
# can be run by a second call, e.g. ROWS=8 TESTS=0 bash benchmarks/run_gpu.sh.
#
# Usage (from anywhere):  bash benchmarks/run_gpu.sh
# Environment: OUT (output folder), PYTHON (interpreter to use), BUDGET_S (default 450 s),
#              ITERS (timed steps per side, default 2), MODELS (default "qwen1.5-4b llama2-7b"),
#              ROWS (rows of 1024 tokens, default "4 8"), CKPT (default "off on"),
#              TESTS (1: run the CUDA tests, default 1).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT_DIR="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_run.log"
BUDGET_S="${BUDGET_S:-450}"   # 7.5 min of steps; kill grace (5 s per step at most) stays under 8 min
ITERS="${ITERS:-2}"
MODELS="${MODELS:-qwen1.5-4b llama2-7b}"
ROWS="${ROWS:-4 8}"
CKPT="${CKPT:-off on}"
TESTS="${TESTS:-1}"
START_S=$(date +%s)
export PYTHONUNBUFFERED=1
# Triton's cache is shared by the tests and the benchmarks: kernels compile once.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/sande_fast_triton_cache}"

PY=""
declare -a SUMMARY=()
FAILED=0

# step NAME LIMIT_S CMD...: runs CMD under `timeout`, capped by what is left of the budget.
step() {
    local name=$1 limit=$2
    shift 2
    local now left rc t0
    now=$(date +%s)
    left=$(( BUDGET_S - (now - START_S) ))
    if (( left < 15 )); then
        echo "### SKIP $name: ${left}s of the ${BUDGET_S}s budget left"
        SUMMARY+=("$name: skipped (budget)")
        FAILED=1
        return 1
    fi
    (( limit > left )) && limit=$left
    echo
    echo "### $name (limit ${limit}s, $(( now - START_S ))s elapsed): $*"
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@"
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    if (( rc == 124 || rc == 137 )); then
        echo "### $name: TIMED OUT after ${took}s"
        SUMMARY+=("$name: timeout after ${took}s")
        FAILED=1
    elif (( rc != 0 )); then
        echo "### $name: FAILED rc=$rc after ${took}s"
        SUMMARY+=("$name: rc=$rc after ${took}s")
        FAILED=1
    else
        echo "### $name: ok in ${took}s"
        SUMMARY+=("$name: ok in ${took}s")
    fi
    return "$rc"
}

# The first interpreter whose torch sees a GPU (the machine's preinstalled CUDA torch).
pick_python() {
    local cand
    for cand in "${PYTHON:-}" python3 python /opt/torch/.venv/bin/python3; do
        if [[ -z "$cand" ]] || ! command -v "$cand" >/dev/null 2>&1; then
            continue
        fi
        if "$cand" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
            >/dev/null 2>&1; then
            PY=$(command -v "$cand")
            export PY
            return 0
        fi
    done
    return 1
}

# Whether the project imports from outside the checkout (i.e. it is installed, planner built).
# shellcheck disable=SC2317  # run through `bash -c` (exported), not called directly
project_importable() {
    (cd /tmp && "$PY" -c 'import sande_fast._planner, sande_fast.kernels, sande_fast.steps, transformers') \
        >/dev/null 2>&1
}

# shellcheck disable=SC2317  # run through `bash -c` (exported), not called directly
install_project() {
    # The fused-loss baselines, when the machine's package cache has them (the bench notes them
    # as skipped otherwise); never their dependencies, which could replace the CUDA torch.
    "$PY" -m pip install -q --no-deps --no-index liger-kernel cut-cross-entropy 2>/dev/null ||
        echo "liger-kernel / cut-cross-entropy not installable offline: those sides are skipped"
    if project_importable; then
        echo "sande_fast already installed for $PY"
        return 0
    fi
    # --no-deps: never let pip replace the machine's CUDA torch (or anything else);
    # --no-build-isolation --no-index: the build uses the installed setuptools/pybind11, offline.
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . ||
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1
    project_importable || {
        echo "installed, but 'import sande_fast' still fails:"
        (cd /tmp && "$PY" -c 'import sande_fast._planner, sande_fast.kernels, sande_fast.steps')
        return 1
    }
}

# shellcheck disable=SC2317  # run through `bash -c` (exported), not called directly
env_report() {
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu:", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
try:
    import triton, transformers
    print("triton", triton.__version__, "transformers", transformers.__version__)
except ImportError as e:
    print("missing:", e)
EOF
}

main() {
    echo "run_gpu.sh in $ROOT, output in $OUT_DIR, budget ${BUDGET_S}s, $(date -u +%FT%TZ)"
    step nvidia-smi 15 nvidia-smi
    if ! pick_python; then
        echo "no python with a CUDA-enabled torch found (tried \$PYTHON, python3, python)"
        return 1
    fi
    echo "python: $PY"
    # `timeout` runs programs, not shell functions: the helpers run in a child bash.
    export -f env_report project_importable install_project
    step env 30 bash -c env_report
    if ! step install 120 bash -c install_project; then
        echo "cannot import the project; stopping"
        print_summary
        return 1
    fi

    # -P (Python >= 3.11) keeps the checkout off sys.path[0], so the installed package imports.
    local isolate=()
    "$PY" -P -c pass >/dev/null 2>&1 && isolate=(-P)
    if [[ "$TESTS" == 1 ]]; then
        step cuda-tests 100 "$PY" "${isolate[@]}" -m pytest -q -m cuda -p no:cacheprovider \
            --junitxml="$OUT_DIR/pytest_cuda.xml" tests
    fi
    # One process per configuration (a 7B model and its optimizer state fill most of the GPU).
    # Llama-2-7B takes the SGD optimizer (fp32 masters + momentum, 8 bytes a weight) because
    # AdamW's 12 bytes a weight plus gradients and activations do not fit 140 GiB with room for
    # the naive side; the optimizer step is shared by all sides, so the comparison is unchanged.
    local rows ckpt model opt flag limit
    for rows in $ROWS; do
        for ckpt in $CKPT; do
            for model in $MODELS; do
                opt=adamw
                limit=70
                if [[ "$model" == llama2-7b ]]; then opt=sgd; limit=90; fi
                flag=()
                [[ "$ckpt" == on ]] && flag=(--checkpointing)
                step "bench-$model-${rows}x1024-ckpt-$ckpt" "$limit" "$PY" \
                    benchmarks/bench_sanitize.py --preset "$model" --device cuda --rows "$rows" \
                    "${flag[@]}" --optimizer "$opt" --warmup 1 --iters "$ITERS" \
                    --json "$OUT_DIR/bench_${model}_${rows}x1024_ckpt-${ckpt}_cuda.json"
            done
        done
    done
    step bench-kernels 45 "$PY" benchmarks/bench_kernels.py --json "$OUT_DIR/bench_kernels.json"
    print_summary
    return "$FAILED"
}

print_summary() {
    echo
    echo "### summary ($(( $(date +%s) - START_S ))s total)"
    local line
    for line in "${SUMMARY[@]}"; do
        echo "  $line"
    done
}

# The pipeline runs main in a subshell; its status comes back through PIPESTATUS.
main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
