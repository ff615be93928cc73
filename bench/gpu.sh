#!/usr/bin/env bash
# The prepared GPU check: on a machine with one CUDA GPU and PyTorch already installed, without
# network, from the repository root:
#
#     bash bench/gpu.sh OUT_DIR              # about 8 minutes at most
#     bash bench/gpu.sh --dry-run OUT_DIR    # every step but the GPU's: on any machine, in a minute
#
# It installs the project without dependencies or build isolation (pip install --no-deps
# --no-build-isolation -e .), after checking what that cannot fetch: the runtime dependencies
# (numpy, pluggy, tqdm, torchmetrics) and the test tools (pytest, pytest-benchmark), one line for
# each one missing. Then, each step under its own time limit and all within DEADLINE seconds (480;
# the benchmarks time 5 rounds per contender, BENCH_ROUNDS):
#   tests      pytest -m cuda: every CUDA test (cudagraph, compile, precision, resume, export, fsdp)
#   compiled   the CUDA rows of bench/test_compiled.py on the MLP job: eager, fused, compile,
#              cudagraph, bf16-mixed, 16-mixed, and the hand-written graph
#   fsdp       the CUDA rows of bench/test_fsdp.py: FSDP2 on the GPU (one process over NCCL), by
#              hand and by the engine, and its sharded checkpoints (async, synchronous)
# OUT_DIR gets a log per step (NN-step.log), the tests' JUnit XML, the benchmarks' JSON
# (bench-*.json, pytest-benchmark's format: python bench/plot.py reads it), environment.txt and
# summary.txt (a line per step: its status and seconds). Exit status: 0 when every step passed,
# 1 when one failed or ran out of time, 2 when the machine lacks what the check needs.
#
# --dry-run runs the same steps with every GPU call left out: the dependency check, pip's
# install resolved but not done (--dry-run), and pytest collecting the selected tests and
# benchmark rows (--collect-only) instead of running them. tests/test_gpu_check.py runs it on the
# CPU in CI.
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
fi
if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu.sh [--dry-run] OUT_DIR" >&2
    exit 2
fi
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
DEADLINE=${DEADLINE:-480}
START=$SECONDS
STEP=0
FAILED=0
LAST=""
: >"$OUT/summary.txt"

say() { echo "gpu check: $*"; }

# run NAME LIMIT COMMAND...: one step, its output in OUT/NN-NAME.log, its line in summary.txt.
run() {
    local name=$1 limit=$2 left begin status
    shift 2
    STEP=$((STEP + 1))
    local log
    log=$(printf '%s/%02d-%s.log' "$OUT" "$STEP" "$name")
    left=$((DEADLINE - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        echo "$name: skipped (out of time)" >>"$OUT/summary.txt"
        say "$name: skipped, out of time"
        FAILED=1
        LAST="skipped"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "$name (at most ${limit} s) ..."
    begin=$SECONDS
    echo "\$ $*" >"$log"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    status=$?
    case $status in
        0) status="ok" ;;
        124 | 137) status="timed out after ${limit} s"; FAILED=1 ;;
        5) status="ok (nothing selected)" ;;
        *) status="failed (exit $status)"; FAILED=1 ;;
    esac
    echo "$name: $status, $((SECONDS - begin)) s" >>"$OUT/summary.txt"
    say "$name: $status; log: $log"
    LAST=$status
}

# What pip cannot fetch without a network, each missing one in a line.
missing=0
for module in torch numpy pluggy tqdm torchmetrics setuptools pytest pytest_benchmark; do
    if ! "$PYTHON" -c "import $module" >/dev/null 2>&1; then
        case $module in
            torch) why="PyTorch with CUDA, the check's premise" ;;
            setuptools) why="the build backend: pip install -e . builds the project with it (no build isolation)" ;;
            pytest | pytest_benchmark) why="runs the tests and the benchmarks" ;;
            *) why="a runtime dependency of the engine" ;;
        esac
        echo "gpu check: missing: ${module//_/-} ($why)" >&2
        echo "missing: ${module//_/-}" >>"$OUT/summary.txt"
        missing=1
    fi
done
if [ $missing -ne 0 ]; then
    echo "gpu check: install what is missing (from a wheel copied here: pip install --no-index FILE.whl), then rerun" >&2
    exit 2
fi

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "python: $("$PYTHON" --version 2>&1) ($PYTHON)"
    "$PYTHON" - <<'EOF'
import torch
print(f"torch: {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"GPUs: {torch.cuda.device_count()}" + "".join(
    f"\n  {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())))
print(f"NCCL: {torch.cuda.nccl.version() if torch.cuda.is_available() else 'unused (no GPU)'}")
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    echo "CPU: $(nproc) cores"
    [ $DRY -eq 1 ] && echo "dry run: nothing ran on a GPU"
} >"$OUT/environment.txt" 2>&1

if [ $DRY -eq 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu check: PyTorch sees no CUDA GPU (torch.cuda.is_available() is False): see $OUT/environment.txt" >&2
    echo "no CUDA GPU" >>"$OUT/summary.txt"
    exit 2
fi

if [ $DRY -eq 1 ]; then
    run install 120 "$PYTHON" -m pip install --dry-run --no-deps --no-build-isolation --no-index -e .
    COLLECT=(--collect-only -q -q) # against the steps' -v: one node id a line
else
    run install 120 "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -e .
    COLLECT=()
fi
[ "$LAST" = "ok" ] && run import 60 "$PYTHON" -m engine --version
if [ "$LAST" != "ok" ]; then
    say "the project is not installed: nothing else can run (see the step's log)"
    exit 1
fi

PYTEST=("$PYTHON" -m pytest -p no:cacheprovider -o addopts="")
# Only the files that hold CUDA tests are collected: a test tool another file imports
# (hypothesis) cannot stop the step. -v: a line per test as it ends, so that a step cut off by its
# time limit still tells what passed.
mapfile -t CUDA_TESTS < <(grep -rl --include='test_*.py' 'pytest.mark.cuda' tests | sort)
run tests 210 "${PYTEST[@]}" "${CUDA_TESTS[@]}" -m cuda -v -rs --junitxml "$OUT/tests.xml" \
    ${COLLECT[@]+"${COLLECT[@]}"}
export BENCH_ROUNDS=5 # timed rounds per contender, after its warm-up rounds
run compiled 110 "${PYTEST[@]}" bench/test_compiled.py -m cuda -k "mlp and not reduce and not auto" -v -rs \
    --benchmark-json "$OUT/bench-compiled.json" ${COLLECT[@]+"${COLLECT[@]}"}
run fsdp 120 "${PYTEST[@]}" bench/test_fsdp.py -m cuda -v -rs \
    --benchmark-json "$OUT/bench-fsdp.json" ${COLLECT[@]+"${COLLECT[@]}"}

say "done in $((SECONDS - START)) s; $OUT/summary.txt:"
cat "$OUT/summary.txt"
exit $FAILED
