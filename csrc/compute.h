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

// APGD's momentum point x_adv + m (z - x_adv) + (1 - m)(x_adv - x_prev) (Croce & Hein 2020), in the order of
// the reference implementation and of the composed ops it replaces, one rounding per operation (no FMA:
// setup.py): ((z - x_adv) * m + x_adv) + (x_adv - x_prev) * m1, where m1 = 1 - m is rounded from double (as
// torch rounds the Python float `1.0 - momentum`).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T apgd_momentum(T z, T x_adv, T x_prev, T m, T m1) {
  return ((z - x_adv) * m + x_adv) + (x_adv - x_prev) * m1;
}

}  // namespace math
}  // namespace robust_ext
