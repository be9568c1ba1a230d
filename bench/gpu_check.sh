#!/usr/bin/env bash
# ============================================================================
#  bench/gpu_check.sh: every GPU-only test and benchmark of mofast in one call
# ============================================================================
#  Run on a machine with one CUDA GPU (e.g. through the device tool):
#      bash bench/gpu_check.sh
#  It builds the native extension against the machine's own torch (no dependency is
#  installed: a lent machine reaches no registry), runs the tests marked `gpu`, then each
#  kernel benchmark with its correctness pass first, and appends CSV rows that name the
#  device under bench/results/. With $OUT set (the device tool's output folder), the
#  results and the log are copied there. Each step has its own time limit so the whole
#  call stays under 8 minutes on one H200; a failing step is reported and the rest go on.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT_DIR=${OUT:-}
LOG=bench/results/gpu_check.log
mkdir -p bench/results
: >"$LOG"
failures=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
  [[ $rc -eq 0 ]] || failures+=("$name (exit $rc)")
}

# ----------------------------------------------------------------------------
#  Build and environment
# ----------------------------------------------------------------------------
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$LOG"
step build 90 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
if [[ -d bench/wheels ]]; then
  # datasets is not on the lent machine's image; carry its wheels in bench/wheels to run
  # the end-to-end benchmark there.
  step wheels 30 "$PY" -m pip install -q --no-index --find-links bench/wheels datasets
fi

# ----------------------------------------------------------------------------
#  Tests that need a GPU (sync debug mode, CUDA graphs, bf16 at real sizes)
# ----------------------------------------------------------------------------
step gpu-tests 90 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider

# ----------------------------------------------------------------------------
#  Kernel benchmarks: correctness first, then time against their baselines
# ----------------------------------------------------------------------------
step bench-gram 35 "$PY" bench/bench_gram.py --repeats 20
step bench-combine 25 "$PY" bench/bench_combine.py --repeats 20
step bench-min-norm 40 "$PY" bench/bench_min_norm.py --problems 2000 --subset 100
step bench-logprobs 70 "$PY" bench/bench_logprobs.py --device cuda --repeats 2
step bench-scaling 40 "$PY" bench/bench_scaling.py --device cuda --repeats 5
if "$PY" -c "import datasets" 2>/dev/null; then
  step bench-e2e 60 "$PY" bench/bench_e2e.py --device cuda
fi

# ----------------------------------------------------------------------------
#  Results
# ----------------------------------------------------------------------------
if [[ -n "$OUT_DIR" ]]; then
  tar -cf "$OUT_DIR/results.tar" bench/results
  cp "$LOG" "$OUT_DIR/"
fi
if [[ ${#failures[@]} -gt 0 ]]; then
  printf 'FAILED: %s\n' "${failures[@]}"
  exit 1
fi
echo "all GPU checks passed"
