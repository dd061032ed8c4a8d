// batch_norm_relu on CPU: relu(batch_norm(x)) with the running statistics (inference mode) in one pass,
// and its input gradient in one pass.
//
// In inference mode a BatchNorm layer is x * scale[c] + shift[c] (math::bn_scale, math::bn_shift). ATen
// runs it and the ReLU as two ops forward and two backward, and under bf16 autocast its batch_norm
// returns float32, so every layer also converts back to bf16 for the next convolution. Here the forward
// reads x and writes y in x's dtype; the backward reads grad_out and y and writes the input gradient.
// The math is linf_math.h's.
//
// Layouts: NCHW-contiguous (and any contiguous N x C x ...) runs per channel plane with a scalar scale;
// channels_last (2-D/3-D) and contiguous N x C run along rows of C with the scale vector. Elements are
// split between threads by flat index, so a few huge planes parallelize as well as many small ones.
// Other strides compute on a contiguous copy. The result has x's strides (empty_like), as the fake
// kernel in robust_ext/batchnorm.py says.
#include <algorithm>
#include <cmath>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../checks.h"
#include "../linf_math.h"
#include "clones.h"
#include "words.h"

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

// How a dense tensor's elements map to channels: planes, rows of C, or neither (compute on a copy).
enum class Walk { kPlanes, kRows, kCopy };

Walk walk_of(const at::Tensor& t) {
  const int64_t inner = t.dim() > 2 ? t.numel() / std::max<int64_t>(1, t.size(0) * t.size(1)) : 1;
  if (t.is_contiguous()) return inner > 1 ? Walk::kPlanes : Walk::kRows;
  if ((t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)))
    return Walk::kRows;
  return Walk::kCopy;
}

constexpr int64_t kGrain = 32768;

// What the loops walk for a result `out` (empty_like the input): the input itself when it is planes or
// rows, else a contiguous copy, with the result then going to a contiguous buffer that done() copies
// into `out`. C and inner (elements per channel plane) for the walk.
struct Walked {
  at::Tensor t, res;
  Walk walk;
  int64_t C, inner;
  Walked(const at::Tensor& t_in, const at::Tensor& out) : walk(walk_of(t_in)) {
    t = walk == Walk::kCopy ? t_in.contiguous() : t_in;
    res = walk == Walk::kCopy ? at::empty_like(t) : out;
    if (walk == Walk::kCopy) walk = walk_of(t);
    C = t.size(1);
    inner = t.numel() / std::max<int64_t>(1, t.size(0) * C);
  }
  void done(at::Tensor& out) const {
    if (!res.is_same(out)) out.copy_(res);
  }
};

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined() && x.dim() >= 2, name, " must be an (N, C, ...) tensor, got ",
              x.defined() ? x.sizes() : at::IntArrayRef{});
  check_float(x, name);
}

// A per-channel parameter or statistic in the compute type (undefined if absent).
at::Tensor channel_vector(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& ref) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK(t->dim() == 1 && t->size(0) == ref.size(1), name, " must be a 1-D tensor with one value per channel (",
              ref.size(1), "), got shape ", t->sizes());
  TORCH_CHECK(is_supported_float(t->scalar_type()), name, " must be a float tensor, got ", t->scalar_type());
  TORCH_CHECK(t->device() == ref.device(), name, " must be on the same device as the input (", ref.device(),
              "), got ", t->device());
  return t->to(compute_type(ref.scalar_type()));
}

// The inference-mode batch norm as x * scale + shift: scale = reciprocal(sqrt(var + eps)) * weight,
// shift = bias - mean * scale, in the same ATen ops as reference.batch_norm_relu (so bit-identical to
// it: ATen's vectorized sqrt is not always the correctly rounded one), C values each.
at::Tensor bn_scale(const at::Tensor& weight, const at::Tensor& var, double eps) {
  at::Tensor invstd = var.add(eps).sqrt().reciprocal();
  return (weight.defined() ? invstd.mul(weight) : invstd).contiguous();
}

at::Tensor bn_shift(const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& scale) {
  at::Tensor m = mean.mul(scale);
  return (bias.defined() ? bias.sub(m) : m.neg()).contiguous();
}

void check_eps(double eps) { TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps); }

at::Tensor batch_norm_relu(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight_in,
                           const c10::optional<at::Tensor>& bias_in, const at::Tensor& mean_in,
                           const at::Tensor& var_in, double eps) {
  check_input(x_in, "x");
  check_eps(eps);
  const at::Tensor weight = channel_vector(weight_in, "weight", x_in), bias = channel_vector(bias_in, "bias", x_in);
  TORCH_CHECK(mean_in.defined() && var_in.defined(), "running_mean and running_var must be tensors");
  const at::Tensor mean = channel_vector(mean_in, "running_mean", x_in), var = channel_vector(var_in, "running_var", x_in);
  at::Tensor out = at::empty_like(x_in);
  if (x_in.numel() == 0) return out;
  const Walked w(x_in, out);
  RX_DISPATCH_FLOATS(w.t.scalar_type(), "batch_norm_relu", [&] {
    using Wd = typename Word<scalar_t>::type;
    using T = compute_t<scalar_t>;
    const at::Tensor scale_t = bn_scale(weight, var, eps), shift_t = bn_shift(bias, mean, scale_t);
    const T* scale = scale_t.const_data_ptr<T>();
    const T* shift = shift_t.const_data_ptr<T>();
    const Wd* px = static_cast<const Wd*>(w.t.const_data_ptr());
    Wd* py = static_cast<Wd*>(w.res.data_ptr());
    at::parallel_for(0, w.t.numel(), kGrain, [&](int64_t b, int64_t e) {
      if (w.walk == Walk::kPlanes) forward_planes<Wd, T>(px, b, e, w.inner, w.C, scale, shift, py);
      else forward_rows<Wd, T>(px, b, e, w.C, scale, shift, py);
    });
  });
  w.done(out);
  return out;
}

at::Tensor batch_norm_relu_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                    const c10::optional<at::Tensor>& weight_in, const at::Tensor& var_in, double eps) {
  check_input(out, "out");
  check_eps(eps);
  TORCH_CHECK(grad_out.defined() && grad_out.sizes() == out.sizes(), "grad_out must have the shape of out ",
              out.sizes(), ", got ", grad_out.defined() ? grad_out.sizes() : at::IntArrayRef{});
  TORCH_CHECK(grad_out.scalar_type() == out.scalar_type(), "grad_out must have out's dtype (", out.scalar_type(),
              "), got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == out.device(), "grad_out must be on out's device (", out.device(), "), got ",
              grad_out.device());
  const at::Tensor weight = channel_vector(weight_in, "weight", out);
  TORCH_CHECK(var_in.defined(), "running_var must be a tensor");
  const at::Tensor var = channel_vector(var_in, "running_var", out);
  at::Tensor gi = at::empty_like(out);
  if (out.numel() == 0) return gi;
  const Walked w(out, gi);
  // grad_out in the walked layout (autograd may hand it in another).
  const at::Tensor g = w.t.is_contiguous() ? grad_out.contiguous()
                                           : grad_out.contiguous(w.t.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                                                                : at::MemoryFormat::ChannelsLast);
  RX_DISPATCH_FLOATS(w.t.scalar_type(), "batch_norm_relu_backward", [&] {
    using Wd = typename Word<scalar_t>::type;
    using T = compute_t<scalar_t>;
    const at::Tensor scale_t = bn_scale(weight, var, eps);
    const T* scale = scale_t.const_data_ptr<T>();
    const Wd* pg = static_cast<const Wd*>(g.const_data_ptr());
    const Wd* py = static_cast<const Wd*>(w.t.const_data_ptr());
    Wd* pi = static_cast<Wd*>(w.res.data_ptr());
    at::parallel_for(0, w.t.numel(), kGrain, [&](int64_t b, int64_t e) {
      if (w.walk == Walk::kPlanes) backward_planes<Wd, T>(pg, py, b, e, w.inner, w.C, scale, pi);
      else backward_rows<Wd, T>(pg, py, b, e, w.C, scale, pi);
    });
  });
  w.done(gi);
  return gi;
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_ext, CPU, m) {
  m.impl("batch_norm_relu", &batch_norm_relu);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward);
}

}  // namespace robust_ext
