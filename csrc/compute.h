// What every family's element math shares: the compute type, and clamp as ATen computes it.
//
// The math runs in compute_t<S> (float for fp32/fp16/bf16 storage, double for fp64), so the CPU loops,
// the CUDA kernels and reference.py perform the same operations in the same order with the same
// roundings: fp32/fp64 results are bit-identical across them.
#pragma once

#include <type_traits>

#include <c10/macros/Macros.h>

namespace robust_ext {

// The type the math runs in for storage type S: double for double, float for float, half and bfloat16.
template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

namespace math {

// torch.clamp(v, lo, hi) == min(max(v, lo), hi), NaN in v propagating, as ATen computes it.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T clamp(T v, T lo, T hi) {
  const T t = v < lo ? lo : v;
  return t > hi ? hi : t;
}

}  // namespace math
}  // namespace robust_ext
