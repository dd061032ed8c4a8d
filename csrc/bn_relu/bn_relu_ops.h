// batch_norm_relu's op bodies shared by every backend: checks, the per-channel scale and shift, layouts.
// A backend supplies `K`: K::forward(w, scale, shift) writes relu(w.t * scale + shift) into w.res, and
// K::backward(w, grad_out, scale) the input gradient from the output w.t (bn_relu/bn_relu_math.h), with
// w.t non-empty and walked as planes or rows of channels (Walked).
#pragma once

#include <algorithm>
#include <cmath>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "checks.h"
#include "dense.h"

namespace robust_ext {

// How a dense tensor's elements map to channels: planes, rows of C, or neither (compute on a copy).
enum class Walk { kPlanes, kRows, kCopy };

inline Walk walk_of(const at::Tensor& t) {
  const int64_t inner = t.dim() > 2 ? t.numel() / std::max<int64_t>(1, t.size(0) * t.size(1)) : 1;
  if (t.is_contiguous()) return inner > 1 ? Walk::kPlanes : Walk::kRows;
  if ((t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)))
    return Walk::kRows;
  return Walk::kCopy;
}

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

inline void check_bn_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined() && x.dim() >= 2, name, " must be an (N, C, ...) tensor, got ",
              x.defined() ? x.sizes() : at::IntArrayRef{});
  check_float(x, name);
}

// A per-channel parameter or statistic in the compute type (undefined if absent).
inline at::Tensor channel_vector(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& ref) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK(t->dim() == 1 && t->size(0) == ref.size(1), name, " must be a 1-D tensor with one value per channel (",
              ref.size(1), "), got shape ", t->sizes());
  TORCH_CHECK(is_supported_float(t->scalar_type()), name, " must be a float tensor, got ", t->scalar_type());
  TORCH_CHECK(t->device() == ref.device(), name, " must be on the same device as the input (", ref.device(),
              "), got ", t->device());
  return t->to(compute_dtype(ref.scalar_type()));
}

// The inference-mode batch norm as x * scale + shift: scale = reciprocal(sqrt(var + eps)) * weight,
// shift = bias - mean * scale, in the same ATen ops as reference.batch_norm_relu (so bit-identical to
// it: ATen's vectorized sqrt is not always the correctly rounded one), C values each.
inline at::Tensor bn_scale(const at::Tensor& weight, const at::Tensor& var, double eps) {
  at::Tensor invstd = var.add(eps).sqrt().reciprocal();
  return (weight.defined() ? invstd.mul(weight) : invstd).contiguous();
}

inline at::Tensor bn_shift(const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& scale) {
  at::Tensor m = mean.mul(scale);
  return (bias.defined() ? bias.sub(m) : m.neg()).contiguous();
}

inline void check_bn_eps(double eps) { TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps); }

template <class K>
struct BnReluOps {
  using Tensor = at::Tensor;

  static Tensor batch_norm_relu(const Tensor& x_in, const c10::optional<Tensor>& weight_in,
                                const c10::optional<Tensor>& bias_in, const Tensor& mean_in, const Tensor& var_in,
                                double eps) {
    check_bn_input(x_in, "x");
    check_bn_eps(eps);
    const Tensor weight = channel_vector(weight_in, "weight", x_in), bias = channel_vector(bias_in, "bias", x_in);
    TORCH_CHECK(mean_in.defined() && var_in.defined(), "running_mean and running_var must be tensors");
    const Tensor mean = channel_vector(mean_in, "running_mean", x_in), var = channel_vector(var_in, "running_var", x_in);
    Tensor out = at::empty_like(x_in);
    if (x_in.numel() == 0) return out;
    const Walked w(x_in, out);
    const Tensor scale = bn_scale(weight, var, eps), shift = bn_shift(bias, mean, scale);
    K::forward(w, scale, shift);
    w.done(out);
    return out;
  }

  static Tensor batch_norm_relu_backward(const Tensor& grad_out, const Tensor& out,
                                         const c10::optional<Tensor>& weight_in, const Tensor& var_in, double eps) {
    check_bn_input(out, "out");
    check_bn_eps(eps);
    TORCH_CHECK(grad_out.defined() && grad_out.sizes() == out.sizes(), "grad_out must have the shape of out ",
                out.sizes(), ", got ", grad_out.defined() ? grad_out.sizes() : at::IntArrayRef{});
    TORCH_CHECK(grad_out.scalar_type() == out.scalar_type(), "grad_out must have out's dtype (", out.scalar_type(),
                "), got ", grad_out.scalar_type());
    TORCH_CHECK(grad_out.device() == out.device(), "grad_out must be on out's device (", out.device(), "), got ",
                grad_out.device());
    const Tensor weight = channel_vector(weight_in, "weight", out);
    TORCH_CHECK(var_in.defined(), "running_var must be a tensor");
    const Tensor var = channel_vector(var_in, "running_var", out);
    Tensor gi = at::empty_like(out);
    if (out.numel() == 0) return gi;
    const Walked w(out, gi);
    // grad_out in the walked layout (autograd may hand it in another).
    const Tensor g = w.t.is_contiguous() ? grad_out.contiguous()
                                         : grad_out.contiguous(w.t.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                                                              : at::MemoryFormat::ChannelsLast);
    K::backward(w, g, bn_scale(weight, var, eps));
    w.done(gi);
    return gi;
  }
};

template <class K>
void register_bn_relu_ops(torch::Library& m) {
  m.impl("batch_norm_relu", &BnReluOps<K>::batch_norm_relu);
  m.impl("batch_norm_relu_backward", &BnReluOps<K>::batch_norm_relu_backward);
}

}  // namespace robust_ext
