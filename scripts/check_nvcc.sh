#!/usr/bin/env bash
# Compile check of the CUDA sources without a GPU and without a CUDA build of torch.
#
#   scripts/check_nvcc.sh            # every csrc/cuda/*.cu for sm_80 and sm_90, then the bindings
#   NVCC=/path/to/nvcc JOBS=4 scripts/check_nvcc.sh
#   scripts/check_nvcc.sh --no-bindings
#
# 1. Each csrc/cuda/*.cu (raw-pointer kernels, no torch headers) is compiled to an object file
#    in a temporary directory with `nvcc -c -gencode arch=compute_80,code=sm_80
#    -gencode arch=compute_90,code=sm_90` (plus the flags torch's build adds), JOBS (default 2)
#    files at a time.
# 2. Each csrc/cuda/*.cpp (torch bindings) is syntax-checked with the host compiler against the
#    installed torch's headers (a CPU build of torch ships the c10/cuda headers except one
#    generated macro file, stubbed here) and the CUDA toolkit's headers. Skipped when torch is
#    not importable.
# Exits non-zero on the first failure, printing the compiler output.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
JOBS="${JOBS:-2}"
BINDINGS=1
[[ "${1:-}" == "--no-bindings" ]] && BINDINGS=0

command -v "$NVCC" >/dev/null || { echo "check_nvcc: nvcc not found (set NVCC)" >&2; exit 2; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
export NVCC TMP ROOT

shopt -s nullglob
cu_files=("$ROOT"/csrc/cuda/*.cu)
if (( ${#cu_files[@]} == 0 )); then
  echo "check_nvcc: no .cu files under csrc/cuda" >&2
  exit 2
fi

start=$SECONDS
echo "check_nvcc: $("$NVCC" --version | tail -n 1)"
printf '%s\n' "${cu_files[@]}" | xargs -P "$JOBS" -I{} bash -c '
  f="{}"; name="$(basename "$f")"
  # The -D flags are the ones torch.utils.cpp_extension passes to nvcc (no implicit half or
  # bfloat16 conversions or operators), so code that compiles here compiles in setup.py too.
  if "$NVCC" -c -std=c++20 -O3 -I"$ROOT/csrc" --expt-relaxed-constexpr \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      "$f" -o "$TMP/$name.o" >"$TMP/$name.log" 2>&1; then
    echo "  ok   $name (sm_80, sm_90)"
  else
    echo "  FAIL $name"; cat "$TMP/$name.log"; exit 255
  fi'

if (( BINDINGS )); then
  if TORCH_INC="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null)"; then
    CUDA_INC="$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")/include"
    # The nvcc on PATH may be a wrapper script: ask it where the toolkit is.
    if [[ ! -f "$CUDA_INC/cuda_runtime_api.h" ]]; then
      CUDA_INC="$("$NVCC" -v --dryrun -x cu /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)"
    fi
    PY_INC="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    mkdir -p "$TMP/stub/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
    export TORCH_INC CUDA_INC PY_INC
    cpp_files=("$ROOT"/csrc/cuda/*.cpp)
    if (( ${#cpp_files[@]} )); then
      printf '%s\n' "${cpp_files[@]}" | xargs -P "$JOBS" -I{} bash -c '
        f="{}"; name="$(basename "$f")"
        if "${CXX:-g++}" -std=c++20 -fsyntax-only -DDSL_KERNELS_PYTHON_MODULE -I"$ROOT/csrc" \
            -I"$TMP/stub" -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" -I"$CUDA_INC" \
            -I"$PY_INC" "$f" >"$TMP/$name.log" 2>&1; then
          echo "  ok   $name (syntax, host compiler + torch headers)"
        else
          echo "  FAIL $name"; cat "$TMP/$name.log"; exit 255
        fi'
    fi
  else
    echo "  skip bindings: torch is not importable"
  fi
fi
echo "check_nvcc: all CUDA sources compile ($((SECONDS - start)) s)"
