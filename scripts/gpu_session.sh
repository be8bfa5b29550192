#!/usr/bin/env bash
# One visit to a lent GPU machine: build the extensions in place, run the CUDA tests, run the
# GPU benchmarks; logs and result tables go to $OUT (default ./gpu_out).
#
#   bash scripts/gpu_session.sh
#   TESTS="tests/test_cuda_sync_free.py" BENCH="cuda_step mask_update" bash scripts/gpu_session.sh
#
# The lent machine's default compiler breaks C++ exceptions in extensions (bench/RESULTS.md,
# "Known build quirk"), hence CC/CXX; TORCH_CUDA_ARCH_LIST=9.0 builds for Hopper only (faster).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CC=/usr/bin/gcc CXX=/usr/bin/g++
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - t0 ))s] $*"; }

stamp "environment"
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

stamp "build (python3 setup.py build_ext --inplace)"
if ! python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
python3 -c "import dsl_kernels, json; print(json.dumps(dsl_kernels.backends(), indent=1))"

stamp "tests: ${TESTS:-tests/test_cuda_sync_free.py tests/test_cuda_backend.py}"
# shellcheck disable=SC2086
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -rfE --maxfail=20 -p no:cacheprovider \
  ${TESTS:-tests/test_cuda_sync_free.py tests/test_cuda_backend.py} > "$OUT/tests.log" 2>&1
echo "pytest exit $?"
tail -40 "$OUT/tests.log"

for b in ${BENCH:-cuda_step}; do
  stamp "bench.$b"
  timeout "${BENCH_TIMEOUT:-300}" python3 -m "bench.$b" --out "$OUT" > "$OUT/bench_$b.log" 2>&1
  echo "bench.$b exit $?"
  tail -60 "$OUT/bench_$b.log"
done
stamp "done"
