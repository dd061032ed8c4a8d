// Inference-mode BatchNorm + ReLU (robust_ext::batch_norm_relu): the element math, for every backend.
//
// relu(x * scale + shift), scale and shift per channel (bn_relu_ops.h derives them from the running
// statistics with ATen ops, as reference.batch_norm_relu does). A multiply then an add, never an FMA
// (the build passes -ffp-contract=off / --fmad=false), as the reference's ATen ops. NaN propagates.
#pragma once

#include <c10/macros/Macros.h>

namespace robust_ext {
namespace math {

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T affine_relu(T x, T scale, T shift) {
  const T v = x * scale + shift;
  return v <= T(0) ? T(0) : v;
}

// Its input gradient from the output: ReLU passes grad_out where out is not <= 0 (so a NaN output
// passes it, as ATen's threshold_backward), then the affine map scales it -- a stopped gradient too, so
// its zero takes the sign of scale as in ATen's batch_norm backward.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T affine_relu_grad(T grad_out, T out, T scale) {
  return (out <= T(0) ? T(0) : grad_out) * scale;
}

}  // namespace math
}  // namespace robust_ext
