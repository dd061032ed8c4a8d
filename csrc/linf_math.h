// The elementwise math of every robust_ext op, written once for the CPU loops and the CUDA kernels.
//
// Each function is a template over the compute type T (float for fp32/fp16/bf16 storage, double for
// fp64), so both backends and reference.py perform the same operations in the same order with the same
// roundings: fp32/fp64 results are bit-identical across them.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/macros/Macros.h>

namespace robust_ext {

// The type the math runs in for storage type S: double for double, float for float, half and bfloat16.
template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

namespace math {

// sign(g) as torch.sign (sign(±0) = 0), except that a NaN gradient gives 0: an element whose gradient
// is NaN is left where it is instead of being overwritten with NaN. ±inf give ±1 like any other value.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T sign_or_zero(T g) {
  return g > T(0) ? T(1) : (g < T(0) ? T(-1) : T(0));
}

// torch.clamp(v, lo, hi) == min(max(v, lo), hi), NaN in v propagating, as ATen computes it.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T clamp(T v, T lo, T hi) {
  const T t = v < lo ? lo : v;
  return t > hi ? hi : t;
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

// FGSM: clip(x + eps * sign(grad)).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T fgsm(T x, T grad, T eps, T lo, T hi) {
  return clamp(x + eps * sign_or_zero(grad), lo, hi);
}

// ---- Inference-mode BatchNorm + ReLU (robust_ext::batch_norm_relu) ------------------------------
//
// relu(x * scale + shift), scale and shift per channel (batch_norm_relu_cpu.cpp derives them from the
// running statistics with ATen ops, as reference.batch_norm_relu does). A multiply then an add, never an
// FMA (the build passes -ffp-contract=off), as the reference's ATen ops. NaN propagates.
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

// ---- Random init: Philox4x32-10 (Salmon et al., SC'11), counter-based ----------------------------
//
// Element i (logical, row-major index) draws one 32-bit word of Philox(key = seed, counter = c(i)),
// c(i) = (i / 64) * 16 + i % 16, word (i / 16) % 4. So 16 consecutive counters give 64 consecutive
// elements as 4 contiguous runs of 16: a SIMD loop computes 16 counters at once and stores whole
// vectors, and the result depends only on (seed, i): not on thread count, ISA or device.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr int kLanes = 16;   // counters per block
constexpr int kBlock = 64;   // elements per block (kLanes counters x 4 words)

struct Philox4 {
  uint32_t w[4];
};

C10_HOST_DEVICE C10_ALWAYS_INLINE Philox4 philox4x32_10(uint64_t counter_lo, uint32_t k0, uint32_t k1) {
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// A 32-bit word to a uniform value in [-1, 1), exactly representable in T: 24 bits for float,
// all 32 for double.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T unit_symmetric(uint32_t r);
template <>
C10_HOST_DEVICE C10_ALWAYS_INLINE float unit_symmetric<float>(uint32_t r) {
  return static_cast<float>(static_cast<int32_t>(r >> 8) - (1 << 23)) * (1.0f / (1 << 23));
}
template <>
C10_HOST_DEVICE C10_ALWAYS_INLINE double unit_symmetric<double>(uint32_t r) {
  return static_cast<double>(static_cast<int64_t>(r) - (int64_t{1} << 31)) * (1.0 / (int64_t{1} << 31));
}

// clip(x + eps * u), u uniform in [-1, 1).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T random_init(T x, uint32_t r, T eps, T lo, T hi) {
  return clamp(x + eps * unit_symmetric<T>(r), lo, hi);
}

}  // namespace math
}  // namespace robust_ext
