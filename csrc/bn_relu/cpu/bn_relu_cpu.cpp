// batch_norm_relu's CPU kernels: relu(batch_norm(x)) with the running statistics (inference mode) in one pass,
// and its input gradient in one pass.
//
// In inference mode a BatchNorm layer is x * scale[c] + shift[c] (bn_scale, bn_shift in bn_relu_ops.h). ATen
// runs it and the ReLU as two ops forward and two backward, and under bf16 autocast its batch_norm
// returns float32, so every layer also converts back to bf16 for the next convolution. Here the forward
// reads x and writes y in x's dtype; the backward reads grad_out and y and writes the input gradient.
// The math is bn_relu/bn_relu_math.h's.
//
// Layouts: NCHW-contiguous (and any contiguous N x C x ...) runs per channel plane with a scalar scale;
// channels_last (2-D/3-D) and contiguous N x C run along rows of C with the scale vector. Elements are
// split between threads by flat index, so a few huge planes parallelize as well as many small ones.
// Other strides compute on a contiguous copy (Walked, bn_relu_ops.h). The result has x's strides
// (empty_like), as the fake kernel in robust_ext/batchnorm.py says.
#include <algorithm>
#include <cmath>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "bn_relu/bn_relu_math.h"
#include "bn_relu/bn_relu_ops.h"
#include "checks.h"
#include "compute.h"
#include "cpu/clones.h"
#include "cpu/words.h"

namespace robust_ext {
namespace {

// Elements [b, e) of a dense tensor, walked either as channel planes (channel c of sample n is the run
// [(n*C + c) * inner, ... + inner): one scale per run) or as rows of C channels (channels innermost:
// scale[c] per element). One call per thread chunk; the loops over a run vectorize.
template <typename W, typename T>
RX_CLONES void forward_planes(const W* __restrict x, int64_t b, int64_t e, int64_t inner, int64_t C,
                              const T* __restrict scale, const T* __restrict shift, W* __restrict y) {
  const int64_t p0 = b / inner;
  for (int64_t i = b, c = p0 % C, off = b - p0 * inner; i < e; off = 0, c = c + 1 == C ? 0 : c + 1) {
    const int64_t n = std::min(e - i, inner - off);
    const T s = scale[c], t = shift[c];
    const W* xr = x + i;
    W* yr = y + i;
    for (int64_t j = 0; j < n; ++j) yr[j] = narrow_round<W>(math::affine_relu<T>(widen(xr[j]), s, t));
    i += n;
  }
}

// Rows of C channels: the per-channel vectors repeated to a period of L = a multiple of C near kPeriod
// (a row of C = 16 alone is one vector: too short a loop), so each segment is one long vector loop and
// a chunk costs one division.
constexpr int64_t kPeriod = 1024;

template <typename T>
C10_ALWAYS_INLINE const T* period(const T* v, int64_t C, T* buf, int64_t& L) {
  if (C > kPeriod / 2) {
    L = C;
    return v;
  }
  L = (kPeriod / C) * C;
  for (int64_t j = 0; j < L; ++j) buf[j] = v[j % C];
  return buf;
}

template <typename W, typename T>
RX_CLONES void forward_rows(const W* __restrict x, int64_t b, int64_t e, int64_t C, const T* scale,
                            const T* shift, W* __restrict y) {
  T sbuf[kPeriod], tbuf[kPeriod];
  int64_t L;
  const T* __restrict s = period(scale, C, sbuf, L);
  const T* __restrict t = period(shift, C, tbuf, L);
  for (int64_t i = b, off = b % L; i < e; off = 0) {
    const int64_t n = std::min(e - i, L - off);
    const W* xr = x + i;
    W* yr = y + i;
    for (int64_t j = 0; j < n; ++j) yr[j] = narrow_round<W>(math::affine_relu<T>(widen(xr[j]), s[off + j], t[off + j]));
    i += n;
  }
}

template <typename W, typename T>
RX_CLONES void backward_planes(const W* __restrict g, const W* __restrict y, int64_t b, int64_t e, int64_t inner,
                               int64_t C, const T* __restrict scale, W* __restrict gi) {
  const int64_t p0 = b / inner;
  for (int64_t i = b, c = p0 % C, off = b - p0 * inner; i < e; off = 0, c = c + 1 == C ? 0 : c + 1) {
    const int64_t n = std::min(e - i, inner - off);
    const T s = scale[c];
    const W* gr = g + i;
    const W* yr = y + i;
    W* ir = gi + i;
    for (int64_t j = 0; j < n; ++j) ir[j] = narrow_round<W>(math::affine_relu_grad<T>(widen(gr[j]), widen(yr[j]), s));
    i += n;
  }
}

template <typename W, typename T>
RX_CLONES void backward_rows(const W* __restrict g, const W* __restrict y, int64_t b, int64_t e, int64_t C,
                             const T* scale, W* __restrict gi) {
  T sbuf[kPeriod];
  int64_t L;
  const T* __restrict s = period(scale, C, sbuf, L);
  for (int64_t i = b, off = b % L; i < e; off = 0) {
    const int64_t n = std::min(e - i, L - off);
    const W* gr = g + i;
    const W* yr = y + i;
    W* ir = gi + i;
    for (int64_t j = 0; j < n; ++j)
      ir[j] = narrow_round<W>(math::affine_relu_grad<T>(widen(gr[j]), widen(yr[j]), s[off + j]));
    i += n;
  }
}

constexpr int64_t kGrain = 32768;

struct CpuKernels {
  static void forward(const Walked& w, const at::Tensor& scale_t, const at::Tensor& shift_t) {
    RX_DISPATCH_FLOATS(w.t.scalar_type(), "batch_norm_relu", [&] {
      using Wd = typename Word<scalar_t>::type;
      using T = compute_t<scalar_t>;
      const T* scale = scale_t.const_data_ptr<T>();
      const T* shift = shift_t.const_data_ptr<T>();
      const Wd* px = static_cast<const Wd*>(w.t.const_data_ptr());
      Wd* py = static_cast<Wd*>(w.res.data_ptr());
      at::parallel_for(0, w.t.numel(), kGrain, [&](int64_t b, int64_t e) {
        if (w.walk == Walk::kPlanes) forward_planes<Wd, T>(px, b, e, w.inner, w.C, scale, shift, py);
        else forward_rows<Wd, T>(px, b, e, w.C, scale, shift, py);
      });
    });
  }

  static void backward(const Walked& w, const at::Tensor& g, const at::Tensor& scale_t) {
    RX_DISPATCH_FLOATS(w.t.scalar_type(), "batch_norm_relu_backward", [&] {
      using Wd = typename Word<scalar_t>::type;
      using T = compute_t<scalar_t>;
      const T* scale = scale_t.const_data_ptr<T>();
      const Wd* pg = static_cast<const Wd*>(g.const_data_ptr());
      const Wd* py = static_cast<const Wd*>(w.t.const_data_ptr());
      Wd* pi = static_cast<Wd*>(w.res.data_ptr());
      at::parallel_for(0, w.t.numel(), kGrain, [&](int64_t b, int64_t e) {
        if (w.walk == Walk::kPlanes) backward_planes<Wd, T>(pg, py, b, e, w.inner, w.C, scale, pi);
        else backward_rows<Wd, T>(pg, py, b, e, w.C, scale, pi);
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(robust_ext, CPU, m) {
  register_bn_relu_ops<CpuKernels>(m);
}

}  // namespace robust_ext
