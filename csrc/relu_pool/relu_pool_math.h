// relu_max_pool2d's window math (max_pool2d(relu(x), kernel 2, stride 2)), for every backend.
//
// Semantics equal relu-then-max_pool2d(kernel 2, stride 2, no padding, floor mode), gradient included:
// the first maximal tap in row-major window order takes the gradient; a window whose maximum is <= 0
// outputs +0 with no gradient; NaN anywhere in a window gives NaN, its last NaN tap taking the gradient.
// (Bit-level only: ATen gives -0 when the first tap is -0.0, and keeps a NaN's payload; we give +0 and
// the canonical quiet NaN.)
#pragma once

#include <cstdint>
#include <limits>

#include <c10/macros/Macros.h>

namespace robust_ext {
namespace math {

// The code of an output that takes no gradient (taps are 0-3).
constexpr uint8_t kNoGrad = 4;

// The window math, in two halves that both layouts share. A window is two columns, left (taps 0, 2)
// and right (taps 1, 3), of a top and a bottom tap; tap codes are 0-3 in row-major order.
//
// column(): the column's max, NaN if either tap is; bit = 1 when the bottom tap wins (ties go to the
// top), or, with a NaN, when the bottom tap is NaN (ATen's max_pool2d keeps the last NaN).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void column(T top, T bot, T& v, int& bit) {
  const bool tn = top != top, bn = bot != bot;
  v = (tn | bn) ? std::numeric_limits<T>::quiet_NaN() : (bot > top ? bot : top);
  bit = bn ? 1 : (tn ? 0 : (bot > top ? 1 : 0));
}

// combine(): the output from the two columns (exactly one of the taps, 0 or NaN: the caller narrows it
// to the storage type without rounding). Equal maxima go to the smaller tap code (the first in
// row-major order, as ATen's max_pool2d); a NaN window outputs NaN and its last NaN tap takes the
// gradient (ReLU's backward passes a NaN output's gradient); a maximum <= 0 outputs 0, no gradient.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void combine(T l, int bl, T r, int br, T& out, uint8_t& code) {
  // int, not uint8_t, arithmetic: GCC then vectorizes the loops around this at the float width.
  const int kl = 2 * bl, kr = 1 + 2 * br;
  const bool ln = l != l, rn = r != r;
  const bool pick_r = (r > l) | ((r == l) & (kr < kl));
  const T m = pick_r ? r : l;
  const int k = pick_r ? kr : kl;
  const int k_nan = rn ? (ln ? (kr > kl ? kr : kl) : kr) : kl;
  out = (ln | rn) ? std::numeric_limits<T>::quiet_NaN() : (m > T(0) ? m : T(0));
  code = static_cast<uint8_t>((ln | rn) ? k_nan : (m > T(0) ? k : int{kNoGrad}));
}

}  // namespace math
}  // namespace robust_ext
