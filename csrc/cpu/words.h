// Storage word <-> compute type for the CPU loops that GCC must vectorize: bf16 is the top half of an
// fp32, so widening is a shift and narrowing a shift (exact) or a round-to-nearest-even on the bits
// (c10::BFloat16's own conversions, with their NaN branch, do not vectorize).
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace robust_ext {

template <typename S> struct Word { using type = S; };
template <> struct Word<c10::BFloat16> { using type = uint16_t; };

C10_ALWAYS_INLINE float widen(float w) { return w; }
C10_ALWAYS_INLINE double widen(double w) { return w; }
C10_ALWAYS_INLINE float widen(c10::Half w) { return static_cast<float>(w); }
C10_ALWAYS_INLINE float widen(uint16_t w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Narrowing a value that is exactly representable (one of the inputs, 0 or NaN): truncation.
template <typename W, typename T> C10_ALWAYS_INLINE W narrow_exact(T v) { return static_cast<W>(v); }
template <> C10_ALWAYS_INLINE uint16_t narrow_exact<uint16_t, float>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return static_cast<uint16_t>(bits >> 16);
}

// Narrowing a computed value: round to nearest even, as static_cast<c10::BFloat16>(float), written as
// selects. NaN becomes the canonical quiet NaN 0x7FC0 (as c10's scalar conversion; ATen's vectorized
// tensor conversion keeps sign and payload: the same value, other bits).
template <typename W, typename T> C10_ALWAYS_INLINE W narrow_round(T v) { return static_cast<W>(v); }
template <> C10_ALWAYS_INLINE uint16_t narrow_round<uint16_t, float>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

}  // namespace robust_ext
