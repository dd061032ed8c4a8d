// Philox4x32-10 (Salmon et al., SC'11): the counter-based generator behind every random init, host and
// device. A result depends only on (seed, counter): not on thread count, vector width, layout or device.
//
// The element -> word contract all random inits share: element i (logical, row-major index of the whole
// tensor) draws word (i / 16) % 4 of Philox(key = seed, counter = c(i)), c(i) = (i / 64) * 16 + i % 16.
// So 16 consecutive counters give 64 consecutive elements as 4 contiguous runs of 16: a SIMD loop
// computes 16 counters at once and stores whole vectors. Draws that are not per element (the L2 init's
// radius) use other streams: the third counter word (`stream`) is 0 for the per-element draws.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

// RX_UNROLL before a loop with a constant trip count: unrolled fully, so that a loop around it (one
// element per iteration) vectorizes -- GCC vectorizes no loop nest holding inner loops.
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define RX_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define RX_UNROLL _Pragma("GCC unroll 16")
#else
#define RX_UNROLL
#endif

namespace robust_ext {
namespace math {

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

C10_HOST_DEVICE C10_ALWAYS_INLINE Philox4 philox4x32_10(uint64_t counter_lo, uint32_t k0, uint32_t k1,
                                                       uint32_t stream = 0) {
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = stream, c3 = 0;
  RX_UNROLL
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

// The counter and word element i draws (the contract above).
C10_HOST_DEVICE C10_ALWAYS_INLINE uint64_t philox_counter(int64_t i) {
  return static_cast<uint64_t>(i / kBlock) * kLanes + static_cast<uint64_t>(i % kLanes);
}
C10_HOST_DEVICE C10_ALWAYS_INLINE int philox_word(int64_t i) { return static_cast<int>((i / kLanes) % 4); }

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

}  // namespace math
}  // namespace robust_ext
