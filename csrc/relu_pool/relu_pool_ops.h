// relu_max_pool2d's op bodies shared by every backend: checks, layouts, allocation. A backend supplies
// `K`: K::forward(x, out, code, channels_last) on the pooled shapes, K::backward(grad_out, code, grad_in,
// channels_last) -- all tensors dense in the given layout, none empty.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"

namespace robust_ext {

inline at::MemoryFormat pool_layout_of(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                      : at::MemoryFormat::Contiguous;
}

template <class K>
struct ReluPoolOps {
  using Tensor = at::Tensor;

  static std::tuple<Tensor, Tensor> relu_max_pool2d(const Tensor& x_in) {
    TORCH_CHECK(x_in.defined() && x_in.dim() == 4, "x must be a 4-D (N, C, H, W) tensor, got ",
                x_in.defined() ? x_in.sizes() : at::IntArrayRef{});
    check_float(x_in, "x");
    TORCH_CHECK(x_in.size(2) >= 2 && x_in.size(3) >= 2, "x must be at least 2x2 in H and W, got ", x_in.sizes());
    const auto fmt = pool_layout_of(x_in);
    const Tensor x = x_in.contiguous(fmt);
    Tensor out = at::empty({x.size(0), x.size(1), x.size(2) / 2, x.size(3) / 2}, x.options().memory_format(fmt));
    Tensor code = at::empty(out.sizes(), x.options().dtype(at::kByte).memory_format(fmt));
    if (out.numel() == 0) return {out, code};
    K::forward(x, out, code, fmt == at::MemoryFormat::ChannelsLast);
    return {out, code};
  }

  static Tensor relu_max_pool2d_backward(const Tensor& grad_out, const Tensor& code, int64_t in_h, int64_t in_w,
                                         bool channels_last) {
    TORCH_CHECK(code.defined() && code.dim() == 4 && code.scalar_type() == at::kByte,
                "code must be the 4-D uint8 tensor relu_max_pool2d returned");
    TORCH_CHECK(grad_out.defined() && grad_out.sizes() == code.sizes(), "grad_out must have the shape of the "
                "pooled output ", code.sizes(), ", got ", grad_out.defined() ? grad_out.sizes() : at::IntArrayRef{});
    TORCH_CHECK(is_supported_float(grad_out.scalar_type()), "grad_out must be a float tensor, got ",
                grad_out.scalar_type());
    TORCH_CHECK(grad_out.device() == code.device(), "grad_out and code must be on the same device, got ",
                grad_out.device(), " and ", code.device());
    TORCH_CHECK(in_h / 2 == code.size(2) && in_w / 2 == code.size(3), "input size (", in_h, ", ", in_w,
                ") does not pool to ", code.sizes());
    const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    const Tensor c = code.contiguous(fmt), g = grad_out.contiguous(fmt);
    // Odd sizes leave the last row/column outside every window: those are zero.
    Tensor gi = at::empty({c.size(0), c.size(1), in_h, in_w}, g.options().memory_format(fmt));
    if (in_h % 2 || in_w % 2) gi.zero_();
    if (g.numel() == 0) return gi;
    K::backward(g, c, gi, channels_last);
    return gi;
  }
};

template <class K>
void register_relu_pool_ops(torch::Library& m) {
  m.impl("relu_max_pool2d", &ReluPoolOps<K>::relu_max_pool2d);
  m.impl("relu_max_pool2d_backward", &ReluPoolOps<K>::relu_max_pool2d_backward);
}

}  // namespace robust_ext
