#!/usr/bin/env bash
# ============================================================================
#  bench/fetch_wheels.sh: the wheels gpu_check.sh installs on a lent GPU machine
# ============================================================================
#  The lent machine's image has torch, transformers, pyarrow and pandas but not `datasets`
#  (nor its dill and multiprocess; xxhash, which `import datasets` needs too, is carried in
#  case the image lacks it), and it reaches no package index. Run this here, then
#  carry bench/wheels (git-ignored, about 1.4 MB) with the call that runs gpu_check.sh, so
#  the trainer's GPU test and the end-to-end benchmark run there too. The versions are the
#  ones this checkout was tested with; the wheels are installed without their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
mkdir -p bench/wheels
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d bench/wheels datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
ls -l bench/wheels
