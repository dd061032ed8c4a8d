// The L2 family's math, written once for the CPU loops and the CUDA kernels (reference.py mirrors it).
//
// Per sample (dim 0; its elements in logical row-major order):
//   step:     d = (x_adv - x) + c * dir(g),  c = alpha / ||dir(g)||,  out = clip(x + d * f)
//   project:  d = x_adv - x,                                          out = clip(x + d * f)
//   fgm:      d = c * dir(g), c = eps / ||dir(g)||,                   out = clip(x + d)
//   apgd:     z = step's out (rounded to storage), d = v - x for APGD's momentum point v of z, out = clip(x + d * f)
//   f = min(1, eps / ||d||) (eps = 0 gives f = 0: out is x);  c = 0 when ||dir(g)|| = 0
// dir(g) is g with NaN read as 0, times a power of two chosen per sample so that the sum of squares
// neither underflows nor overflows (so tiny and huge gradients step like any other); a sample with an
// infinite gradient entry moves along its infinite entries only (dir = +-1 there, 0 elsewhere: the limit
// of g / ||g||). Nothing divides by zero. Clipping comes after the projection: both the ball around x
// and the box are convex and x is in the box, so the clipped point stays in the ball.
//
// Sums of squares have one order, whatever the thread count, vector width or device: a sample is cut
// into chunks of kSumChunk elements; element k of a chunk goes to lane k % 16, each lane adds its 64
// squares in order, the 16 lanes meet in a fixed tree (lane_tree) and the chunks in another
// (chunk_tree). Accumulation is in the compute type (float for fp32/fp16/bf16, double for fp64).
//
// Random init: a direction z ~ N(0, I) from Box-Muller on the Philox words of philox.h's element
// contract (the two words of each pair (0, 1), (2, 3) of a counter give the elements that use them: the
// cosine to the even word's element, the sine to the odd one's), the radius eps * U^(1/n) with U from
// Philox stream 1 (counter = sample index), n the sample's element count: out = clip(x + z * r / ||z||).
// log, sin/cos and exp are the polynomials below (IEEE +, -, *, / and sqrt only), so the CPU and CUDA
// kernels compute the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <c10/macros/Macros.h>

#include "compute.h"
#include "philox.h"

namespace robust_ext {
namespace math {

// ---- the fixed summation order --------------------------------------------------------------------
constexpr int kSumLanes = 16;
constexpr int kSumDepth = 64;
constexpr int64_t kSumChunk = kSumLanes * kSumDepth;

C10_HOST_DEVICE C10_ALWAYS_INLINE int64_t sum_chunks(int64_t n) { return (n + kSumChunk - 1) / kSumChunk; }

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T lane_tree(T (&acc)[kSumLanes]) {
  for (int h = kSumLanes / 2; h >= 1; h /= 2)
    for (int j = 0; j < h; ++j) acc[j] = acc[j] + acc[j + h];
  return acc[0];
}

// Pairwise over the chunk partials, in place: level by level, p[i] += p[i + s] for i a multiple of 2s.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T chunk_tree(T* p, int64_t count) {
  if (count == 0) return T(0);
  for (int64_t s = 1; s < count; s *= 2)
    for (int64_t i = 0; i + s < count; i += 2 * s) p[i] = p[i] + p[i + s];
  return p[0];
}

// ---- per-sample scale of the gradient -------------------------------------------------------------
template <typename T> struct L2Limits;
template <> struct L2Limits<float> {
  static constexpr float kLow = 0x1p-60f, kHigh = 0x1p60f;
  static constexpr int kMinExp = -126, kMaxExp = 127;
};
template <> struct L2Limits<double> {
  static constexpr double kLow = 0x1p-500, kHigh = 0x1p500;
  static constexpr int kMinExp = -1022, kMaxExp = 1023;
};

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T nan_to_zero(T g) {
  return g == g ? g : T(0);
}

// |g| with comparisons only (the same code on host and device, where abs() overloads vary).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T abs_of(T v) {
  return v < T(0) ? -v : v;
}

// The first pass sums nan_to_zero(g)^2; a sum outside [kLow, kHigh] (0, tiny, huge or inf) asks for a
// second pass scaled by l2_rescale(max |g|).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE bool l2_needs_rescale(T sumsq) {
  return !(sumsq >= L2Limits<T>::kLow && sumsq <= L2Limits<T>::kHigh);
}

// 2^-e with max|g| = m * 2^e, m in [0.5, 1) (1 for a zero row, 0 for a row with an infinite entry).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T l2_rescale(T max_abs) {
  if (!(max_abs > T(0))) return T(1);
  if (max_abs == std::numeric_limits<T>::infinity()) return T(0);
  int e = 0;
  (void)std::frexp(max_abs, &e);
  using L = L2Limits<T>;
  const int k = -e < L::kMinExp ? L::kMinExp : (-e > L::kMaxExp ? L::kMaxExp : -e);
  return std::ldexp(T(1), k);
}

// dir(g) for the sample's scale s (1 unless rescaled).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T l2_direction(T g, T s) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  return g == inf ? T(1) : (g == -inf ? T(-1) : nan_to_zero(g) * s);
}

// num / sqrt(sumsq), 0 for an empty sum: alpha (step) or eps (fgm) per unit of direction norm.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T l2_coef(T num, T sumsq) {
  return sumsq > T(0) ? num / std::sqrt(sumsq) : T(0);
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T l2_delta(T x_adv, T g, T x, T c, T s) {
  return (x_adv - x) + c * l2_direction(g, s);
}

// min(1, eps / ||d||) from sumsq = ||d||^2; NaN in d propagates.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T l2_factor(T eps, T sumsq) {
  return eps == T(0) ? T(0) : (sumsq <= eps * eps ? T(1) : eps / std::sqrt(sumsq));
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T l2_out(T x, T d, T f, T lo, T hi) {
  return clamp(x + d * f, lo, hi);
}

// APGD's update, per sample: the step (above: d, f, out), its result z rounded to the storage type as the
// step op writes it, then d2 = v - x for the momentum point v (compute.h), projected and clipped as the
// projection does: out = clip(x + d2 * min(1, eps / ||d2||)). Its sums of squares have the order above.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T l2_apgd_delta(T z, T x_adv, T x_prev, T x, T m, T m1) {
  return apgd_momentum(z, x_adv, x_prev, m, m1) - x;
}

// ---- random init: uniforms, Box-Muller, radius ----------------------------------------------------
template <typename T> struct Bits;
template <> struct Bits<float> {
  using U = uint32_t;
  static constexpr int kUniform = 24;  // random bits per uniform
  static constexpr int kMant = 23, kBias = 127;
  static constexpr U kOne = 0x3F800000u, kSqrt2 = 0x3FB504F3u;
  static constexpr int kLogTerms = 7, kTrigTerms = 6, kExpTerms = 9;
  static constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = static_cast<float>(1.428606765330187e-06);
};
template <> struct Bits<double> {
  using U = uint64_t;
  static constexpr int kUniform = 32;
  static constexpr int kMant = 52, kBias = 1023;
  static constexpr U kOne = 0x3FF0000000000000ull, kSqrt2 = 0x3FF6A09E667F3BCDull;
  static constexpr int kLogTerms = 12, kTrigTerms = 10, kExpTerms = 14;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
};

constexpr double kLn2 = 0.69314718055994530942;

// k! in double (exact up to 18!, correctly rounded for 19!: as Python's float(math.factorial(k))).
C10_HOST_DEVICE constexpr double factorial(int k) {
  double f = 1.0;
  for (int j = 2; j <= k; ++j) f *= j;
  return f;
}
constexpr double kPiHalf = 1.57079632679489661923;

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE typename Bits<T>::U to_bits(T v) {
  typename Bits<T>::U u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T from_bits(typename Bits<T>::U u) {
  T v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// log(u), u = (k + 1) * 2^-B in (0, 1], k the word's top B bits: u = 2^e * y with y in [sqrt(1/2),
// sqrt(2)], log y = 2 atanh(t) = 2 (t + t^3/3 + ...), t = (y - 1) / (y + 1), |t| <= 0.172.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T log_unit(uint32_t w) {
  using B = Bits<T>;
  using U = typename B::U;
  // (k + 1) exactly: in 32-bit integers where it fits (float's 24 bits), which vectorize on AVX2 (no
  // 64-bit integer conversions there).
  T m;
  if constexpr (B::kUniform < 31) m = static_cast<T>(static_cast<int32_t>(w >> (32 - B::kUniform)) + 1);
  else m = static_cast<T>(static_cast<int64_t>(w >> (32 - B::kUniform)) + 1);
  const U bits = to_bits(m);
  int e = static_cast<int>(bits >> B::kMant) - B::kBias;
  U ybits = (bits & ((U(1) << B::kMant) - 1)) | B::kOne;
  const bool big = ybits > B::kSqrt2;
  ybits = big ? ybits - (U(1) << B::kMant) : ybits;
  e = big ? e + 1 : e;
  const T y = from_bits<T>(ybits);
  const T t = (y - T(1)) / (y + T(1));
  const T t2 = t * t;
  T p = static_cast<T>(1.0 / (2 * B::kLogTerms - 1));
  RX_UNROLL
  for (int k = B::kLogTerms - 2; k >= 0; --k) p = p * t2 + static_cast<T>(1.0 / (2 * k + 1));
  return static_cast<T>(e - B::kUniform) * static_cast<T>(kLn2) + (t + t) * p;
}

// cos and sin of 2 pi u, u = k * 2^-B in [0, 1): the quadrant q and phi in [-pi/4, pi/4) from the
// integer k exactly, then Taylor polynomials of phi.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void sincos_turn(uint32_t w, T& c, T& s) {
  using B = Bits<T>;
  constexpr int kB = B::kUniform;
  // 32-bit integers throughout (kB <= 32: the sum wraps modulo 2^32, which the mask would do), so the
  // loop vectorizes on AVX2.
  const uint32_t mask = static_cast<uint32_t>((uint64_t{1} << kB) - 1);
  const uint32_t k = ((w >> (32 - kB)) + (uint32_t{1} << (kB - 3))) & mask;
  const int32_t q = static_cast<int32_t>(k >> (kB - 2));
  const int32_t r = static_cast<int32_t>(k & ((uint32_t{1} << (kB - 2)) - 1)) - (int32_t{1} << (kB - 3));
  const T phi = static_cast<T>(r) * static_cast<T>(kPiHalf / static_cast<double>(uint64_t{1} << (kB - 2)));
  const T p2 = phi * phi;
  // sin: phi * sum_j (-1)^j phi^2j / (2j+1)!,  cos: sum_j (-1)^j phi^2j / (2j)!,  j < kTrigTerms
  constexpr int K = B::kTrigTerms;
  T ps = static_cast<T>(((K - 1) % 2 ? -1.0 : 1.0) / factorial(2 * K - 1));
  T pc = static_cast<T>(((K - 1) % 2 ? -1.0 : 1.0) / factorial(2 * K - 2));
  RX_UNROLL
  for (int j = K - 2; j >= 0; --j) {
    ps = ps * p2 + static_cast<T>((j % 2 ? -1.0 : 1.0) / factorial(2 * j + 1));
    pc = pc * p2 + static_cast<T>((j % 2 ? -1.0 : 1.0) / factorial(2 * j));
  }
  const T sn = phi * ps, cs = pc;
  c = q == 0 ? cs : (q == 1 ? -sn : (q == 2 ? -cs : sn));
  s = q == 0 ? sn : (q == 1 ? cs : (q == 2 ? -sn : -cs));
}

// Box-Muller: two normal deviates from two words.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void box_muller(uint32_t w_radius, uint32_t w_angle, T& z0, T& z1) {
  const T rad = std::sqrt(T(-2) * log_unit<T>(w_radius));
  T c, s;
  sincos_turn<T>(w_angle, c, s);
  z0 = rad * c;
  z1 = rad * s;
}

// The normal deviate of element i (logical index in the whole tensor).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T gaussian_at(int64_t i, uint32_t k0, uint32_t k1) {
  const Philox4 r = philox4x32_10(philox_counter(i), k0, k1);
  const int w = philox_word(i), p = w & 2;
  T z0, z1;
  box_muller<T>(r.w[p], r.w[p + 1], z0, z1);
  return (w & 1) ? z1 : z0;
}

// exp(y) for y <= 0 (about -23 at the least here): y = k ln2 + r, |r| <= ln2 / 2, Taylor in r.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T exp_neg(T y) {
  using B = Bits<T>;
  const T kf = std::floor(y * static_cast<T>(1.0 / kLn2) + T(0.5));
  const T r = (y - kf * B::kLn2Hi) - kf * B::kLn2Lo;
  T p = static_cast<T>(1.0 / factorial(B::kExpTerms - 1));
  RX_UNROLL
  for (int j = B::kExpTerms - 2; j >= 0; --j) p = p * r + static_cast<T>(1.0 / factorial(j));
  return std::ldexp(p, static_cast<int>(kf));
}

// The radius of sample `sample` of n elements: eps * U^(1/n), U in (0, 1] from Philox stream 1.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T l2_radius(int64_t sample, int64_t n, uint32_t k0, uint32_t k1, T eps) {
  const uint32_t w = philox4x32_10(static_cast<uint64_t>(sample), k0, k1, 1u).w[0];
  return eps * exp_neg<T>(log_unit<T>(w) / static_cast<T>(n));
}

}  // namespace math
}  // namespace robust_ext
