#!/usr/bin/env bash
# Cheap CUDA check for machines without a GPU (see NOTES.md, "CUDA without a GPU"): compiles every .cu
# under csrc/ with nvcc against the headers of the torch that `python` imports. Host and device code are
# compiled for sm_80 and sm_90; nothing is linked or run. Exits non-zero on the first compile error.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

nvcc=${NVCC:-nvcc}
if ! command -v "$nvcc" >/dev/null 2>&1; then
  if [[ -z ${NVCC:-} && -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc=/usr/local/cuda/bin/nvcc
  else
    echo "check_cuda: nvcc not found (NVCC=${NVCC:-unset}, not on PATH, no /usr/local/cuda/bin/nvcc)" >&2
    exit 1
  fi
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/check_cuda.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The CPU wheel lacks this generated header, which c10/cuda includes; the CUDA wheel's says the same.
mkdir -p "$work/include/c10/cuda/impl" "$work/obj"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$work/include/c10/cuda/impl/cuda_cmake_macros.h"

mapfile -t torch_inc < <(python -c "from torch.utils.cpp_extension import include_paths as p; print('\n'.join('-I' + i for i in p()))")
torch_version=$(python -c "import torch; print(torch.__version__.split('+')[0])")

flags=(
  "${torch_inc[@]}" "-I$work/include" -I csrc
  -std=c++20 --expt-relaxed-constexpr --extended-lambda --fmad=false -Xcompiler -fPIC
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -DROBUST_EXT_WITH_CUDA "-DROBUST_EXT_TORCH_VERSION=\"$torch_version\""
  -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
)

mapfile -t sources < <(find csrc -name '*.cu' | sort)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda: no .cu files under csrc/" >&2
  exit 1
fi

echo "check_cuda: $("$nvcc" --version | tail -n 1), torch $torch_version headers, ${#sources[@]} file(s)"
total_start=$SECONDS
for src in "${sources[@]}"; do
  echo "check_cuda: compiling $src"
  start=$SECONDS
  obj="$work/obj/$(echo "$src" | tr / _).o"
  if ! "$nvcc" "${flags[@]}" -c "$src" -o "$obj"; then
    echo "check_cuda: FAILED $src after $((SECONDS - start)) s" >&2
    exit 1
  fi
  echo "check_cuda: ok $src ($((SECONDS - start)) s)"
done
echo "check_cuda: all ${#sources[@]} file(s) compiled in $((SECONDS - total_start)) s"
