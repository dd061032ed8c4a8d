#!/usr/bin/env bash
# Cheap CUDA check for machines without a GPU (NOTES.md, "CUDA without a GPU"): compiles every CUDA
# kernel file setup.py builds (csrc/**/cuda/*.cu, one folder per op family) with nvcc against the
# headers of the torch that `python` imports, host and device code for sm_80 and sm_90. Nothing is
# linked or run. Exits non-zero on the first compile error or a missing nvcc.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

nvcc=${NVCC:-nvcc}
if ! command -v "$nvcc" >/dev/null 2>&1; then
  if [[ -n ${NVCC:-} ]]; then
    echo "check_cuda: FAILED: NVCC=$NVCC is not an executable" >&2
    exit 1
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc=/usr/local/cuda/bin/nvcc
  else
    echo "check_cuda: FAILED: nvcc is neither on PATH nor at /usr/local/cuda/bin/nvcc (set NVCC)" >&2
    exit 1
  fi
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/check_cuda.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The CPU wheel lacks this generated header that c10/cuda includes; the stand-in says what the CUDA
# wheel's says.
mkdir -p "$work/include/c10/cuda/impl" "$work/obj"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$work/include/c10/cuda/impl/cuda_cmake_macros.h"

# Command substitution, not process substitution: a python or torch that fails stops the script here.
torch_info=$(python -c "
import torch
from torch.utils.cpp_extension import include_paths
print(torch.__version__)
print('\n'.join('-I' + p for p in include_paths()))")
mapfile -t torch_inc < <(tail -n +2 <<< "$torch_info")

flags=(
  "${torch_inc[@]}" "-I$work/include" -I csrc
  -std=c++20 --expt-relaxed-constexpr --extended-lambda --fmad=false -Xcompiler -fPIC
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -DROBUST_EXT_WITH_CUDA
  -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
)

mapfile -t sources < <(find csrc -path '*/cuda/*.cu' -type f | sort)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda: FAILED: no csrc/**/cuda/*.cu file" >&2
  exit 1
fi

echo "check_cuda: $nvcc ($("$nvcc" --version | tail -n 1)), torch $(head -n 1 <<< "$torch_info") headers" \
     "from $(command -v python), ${#sources[@]} file(s)"
now_us() { echo "${EPOCHREALTIME/[.,]/}"; }
elapsed() { local d=$(( $(now_us) - $1 )); printf '%d.%d' $((d / 1000000)) $((d / 100000 % 10)); }
t_all=$(now_us)
for src in "${sources[@]}"; do
  echo "check_cuda: compiling $src"
  t0=$(now_us)
  if ! "$nvcc" "${flags[@]}" -c "$src" -o "$work/obj/$(tr / _ <<< "$src").o"; then
    echo "check_cuda: FAILED: $src ($(elapsed "$t0") s)" >&2
    exit 1
  fi
  echo "check_cuda: ok: $src ($(elapsed "$t0") s)"
done
echo "check_cuda: all ${#sources[@]} file(s) compiled in $(elapsed "$t_all") s"
