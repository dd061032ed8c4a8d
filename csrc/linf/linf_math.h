// The L-inf family's element math, written once for the CPU loops and the CUDA kernels (and mirrored
// by reference.py, operation for operation: fp32/fp64 results are bit-identical across the three).
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

#include "compute.h"
#include "philox.h"

namespace robust_ext {
namespace math {

// sign(g) as torch.sign (sign(±0) = 0), except that a NaN gradient gives 0: an element whose gradient
// is NaN is left where it is instead of being overwritten with NaN. ±inf give ±1 like any other value.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T sign_or_zero(T g) {
  return g > T(0) ? T(1) : (g < T(0) ? T(-1) : T(0));
}

// project_{|. - x|inf <= eps}(v) then clip to [lo, hi], in torchattacks' operation order
// (x + clamp(v - x, -eps, eps), then clamp): bit-exact with torchattacks' PGD update in fp32.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T linf_project(T v, T x, T eps, T lo, T hi) {
  const T delta = clamp(v - x, -eps, eps);
  return clamp(x + delta, lo, hi);
}

// One BIM/PGD step: x_adv + alpha * sign(grad), projected and clipped. alpha < 0 descends (targeted).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T linf_step(T x_adv, T grad, T x, T alpha, T eps, T lo, T hi) {
  return linf_project(x_adv + alpha * sign_or_zero(grad), x, eps, lo, hi);
}

// APGD's update: z = the step, rounded to the storage type S as the step op writes it, then the momentum
// point (compute.h), projected and clipped. momentum == 1 is the step itself (the op bodies call the step).
template <typename S, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T linf_apgd_update(T x_adv, T x_prev, T grad, T x, T alpha, T eps, T m, T m1, T lo,
                                                     T hi) {
  const T z = static_cast<T>(static_cast<S>(linf_step(x_adv, grad, x, alpha, eps, lo, hi)));
  return linf_project(apgd_momentum(z, x_adv, x_prev, m, m1), x, eps, lo, hi);
}

// FGSM: clip(x + eps * sign(grad)).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T fgsm(T x, T grad, T eps, T lo, T hi) {
  return clamp(x + eps * sign_or_zero(grad), lo, hi);
}

// Random init: clip(x + eps * u), u uniform in [-1, 1) from the element's Philox word (philox.h).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T random_init(T x, uint32_t r, T eps, T lo, T hi) {
  return clamp(x + eps * unit_symmetric<T>(r), lo, hi);
}

}  // namespace math
}  // namespace robust_ext
