#!/usr/bin/env bash
# ============================================================================
#  bench/gpu_check.sh: every GPU-only test and benchmark of mofast in one call
# ============================================================================
#  Run on a machine with one CUDA GPU (e.g. through the device tool, carrying bench/wheels
#  after `bash bench/fetch_wheels.sh` here, so the trainer's GPU test can import datasets):
#      bash bench/gpu_check.sh
#  It builds the native extension against the machine's own torch (no dependency is
#  installed: a lent machine reaches no registry), runs the tests marked `gpu`, then each
#  kernel benchmark with its correctness pass first, and appends CSV rows that name the
#  device under bench/results/. With $OUT set (the device tool's output folder), the log
#  and the results are copied there after every step, so a run cut short still returns
#  what it did. Each step has its own time limit, and every limit is cut to what is left
#  of a budget of 7.5 minutes for the whole call, kill grace included: a step that would
#  start with less than 15 s left is skipped and reported. A failing step is reported and
#  the rest go on.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT_DIR=${OUT:-}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
KILL_GRACE_S=10
LOG=bench/results/gpu_check.log
mkdir -p bench/results
: >"$LOG"
failures=()
summary=()
# Piped through tee, Python would hold its output back, and a step killed at its limit
# would leave nothing in the log.
export PYTHONUNBUFFERED=1

save() {
  [[ -n "$OUT_DIR" ]] || return 0
  tar -cf "$OUT_DIR/results.tar" bench/results
  cp "$LOG" "$OUT_DIR/"
}

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - SECONDS - KILL_GRACE_S))
  if ((left < 15)); then
    echo "=== $name: skipped, ${left}s left of the ${BUDGET_S}s budget" | tee -a "$LOG"
    failures+=("$name (skipped: out of time)")
    summary+=("$(printf '%-16s skipped (out of time)' "$name")")
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after="$KILL_GRACE_S" "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start))
  echo "=== $name: exit $rc after ${took}s" | tee -a "$LOG"
  [[ $rc -eq 0 ]] || failures+=("$name (exit $rc)")
  summary+=("$(printf '%-16s exit %-3s %4ss of %ss' "$name" "$rc" "$took" "$limit")")
  save
}

# ----------------------------------------------------------------------------
#  Build and environment
# ----------------------------------------------------------------------------
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$LOG"
# What the build and the tests depend on, so a failed build explains itself.
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.util, os, shutil, sys, sysconfig
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print(f"python {sys.version.split()[0]} at {sys.executable}; Python.h: {os.path.exists(header)}")
for tool in ("cmake", "ninja", "c++", "g++", "nvcc"):
    print(f"{tool}: {shutil.which(tool)}")
for name in ("torch", "triton", "transformers", "pytest", "hypothesis", "datasets", "quadprog",
             "torchjd", "liger_kernel"):
    print(f"{name}: {'yes' if importlib.util.find_spec(name) else 'MISSING'}")
import torch, triton
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")
EOF
step build 120 "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e .
if compgen -G "bench/wheels/*.whl" >/dev/null; then
  # datasets is not on the lent machine's image: bench/fetch_wheels.sh puts its wheels in
  # bench/wheels (carry it) for the trainer's GPU test and the end-to-end benchmark. No
  # dependency resolution: the image's pyarrow and pandas are used as they are.
  step wheels 30 "$PY" -m pip install -q --no-index --no-deps bench/wheels/*.whl
fi

# ----------------------------------------------------------------------------
#  Tests that need a GPU (sync debug mode, CUDA graphs, bf16 at real sizes)
# ----------------------------------------------------------------------------
# Only the files that hold GPU tests: collecting the others imports packages that the
# lent machine lacks (test_data.py imports datasets), and one collection error stops the
# whole run.
mapfile -t gpu_test_files < <(grep -lE "requires_cuda|mark\.gpu" tests/test_*.py)
step gpu-tests 130 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${gpu_test_files[@]}"

# ----------------------------------------------------------------------------
#  Kernel benchmarks: correctness first, then time against their baselines
# ----------------------------------------------------------------------------
step bench-gram 50 "$PY" bench/bench_gram.py --repeats 20
step bench-combine 30 "$PY" bench/bench_combine.py --repeats 20
# The defaults' P is a multiple of 16; an odd P leaves Triton no alignment to vectorise
# with (2-byte loads for bf16). One shape of each shows what that costs.
step bench-odd-P 40 bash -c "$PY bench/bench_gram.py --P 50000017 --k 8 --dtype bfloat16 \
  --repeats 10 && $PY bench/bench_combine.py --P 50000017 --k 8 --dtypes bf16:bf16 --repeats 10"
step bench-min-norm 35 "$PY" bench/bench_min_norm.py --problems 2000 --subset 100
step bench-logprobs 70 "$PY" bench/bench_logprobs.py --device cuda --repeats 2
step bench-scaling 60 "$PY" bench/bench_scaling.py --device cuda --repeats 5
if "$PY" -c "import datasets" 2>/dev/null; then
  step bench-e2e 60 "$PY" bench/bench_e2e.py --device cuda
else
  echo "=== bench-e2e: not run (datasets is not installed)" | tee -a "$LOG"
fi

# ----------------------------------------------------------------------------
#  Results
# ----------------------------------------------------------------------------
{
  echo "=== summary (${SECONDS}s in all)"
  printf '%s\n' "${summary[@]}"
} | tee -a "$LOG"
save
if [[ ${#failures[@]} -gt 0 ]]; then
  printf 'FAILED: %s\n' "${failures[@]}" | tee -a "$LOG"
  save
  exit 1
fi
echo "all GPU checks passed" | tee -a "$LOG"
save
