// Input checks shared by every op and both backends: one place that names the argument, says what was
// expected and what came.
#pragma once

#include <cmath>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/_assert_async.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace robust_ext {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The storage dtypes every op takes.
#define RX_DISPATCH_FLOATS(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

// The ops have no derivative: refuse inputs autograd would differentiate instead of silently dropping
// or mis-attributing gradients.
inline void check_no_grad(const at::Tensor& t, const char* name) {
  TORCH_CHECK(!(c10::GradMode::is_enabled() && t.requires_grad()), name,
              " requires grad, but robust_ext ops are not differentiable; call them under torch.no_grad() "
              "or pass ", name, ".detach()");
}

// A defined tensor of a supported float dtype.
inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_image(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  check_float(t, name);
  check_no_grad(t, name);
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_image(t, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the same shape as ", ref_name, " ", ref.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

inline void check_bounds(double clip_min, double clip_max) {
  TORCH_CHECK(!std::isnan(clip_min) && !std::isnan(clip_max), "clip_min and clip_max must not be NaN");
  TORCH_CHECK(clip_min <= clip_max, "clip_min must be <= clip_max, got clip_min=", clip_min,
              " and clip_max=", clip_max);
}

// A budget (alpha or eps) is a float, or a per-sample tensor along dim 0 of x. eps must be >= 0;
// alpha may be negative (a targeted, descending step). Values are checked without a host sync: on
// CUDA a bad per-sample value fails asynchronously (at the next synchronisation).
inline void check_budget(double value, const c10::optional<at::Tensor>& per_sample, const char* name,
                         bool non_negative, const at::Tensor& x) {
  if (!per_sample.has_value() || !per_sample->defined()) {
    TORCH_CHECK(!std::isnan(value), name, " must not be NaN");
    TORCH_CHECK(!non_negative || value >= 0, name, " must be >= 0, got ", value);
    return;
  }
  const at::Tensor& t = *per_sample;
  TORCH_CHECK(is_supported_float(t.scalar_type()), name,
              " as a tensor must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(x.dim() >= 1, name, " is a per-sample tensor, so x needs a batch dimension (dim 0), got a 0-d x");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), name,
              " as a tensor must be 1-D with one value per sample (", x.size(0), "), got shape ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), name, " must be on the same device as x (", x.device(), "), got ",
              t.device());
  check_no_grad(t, name);
  if (t.numel() == 0) return;
  const char* what = non_negative ? " must be >= 0 and not NaN for every sample" : " must not be NaN for any sample";
  if (t.is_cpu()) {  // a plain loop: no temporaries on the per-step path
    const at::Tensor c = t.contiguous();
    bool bad = false;
    RX_DISPATCH_FLOATS(c.scalar_type(), "check_budget", [&] {
      const scalar_t* p = c.data_ptr<scalar_t>();
      for (int64_t i = 0; i < c.numel(); ++i) {
        const double v = static_cast<double>(p[i]);
        bad = bad || std::isnan(v) || (non_negative && v < 0);
      }
    });
    TORCH_CHECK(!bad, name, what);
  } else {
    const at::Tensor bad = non_negative ? t.lt(0).logical_or_(t.isnan()).any() : t.isnan().any();
    at::_assert_async(bad.logical_not(), non_negative ? "robust_ext: a per-sample eps/alpha is negative or NaN"
                                                      : "robust_ext: a per-sample alpha is NaN");
  }
}

// The Philox key of a random init (philox.h): a 0-d int64 tensor on the CPU or on x's device.
inline void check_seed(const at::Tensor& seed, const at::Tensor& x) {
  TORCH_CHECK(seed.defined() && seed.dim() == 0 && seed.scalar_type() == at::kLong,
              "seed must be a 0-d int64 tensor, got ", seed.defined() ? seed.sizes() : at::IntArrayRef{});
  TORCH_CHECK(seed.is_cpu() || seed.device() == x.device(), "seed must be on the CPU or on x's device (",
              x.device(), "), got ", seed.device());
}

// Writing into x_adv must not corrupt it: no element may alias another, and x_adv may not partly overlap
// an input. (That it does not require grad, check_image has already made sure.)
inline void check_writable(const at::Tensor& x_adv, std::initializer_list<at::Tensor> inputs) {
  at::assert_no_internal_overlap(x_adv);
  for (const auto& t : inputs) at::assert_no_partial_overlap(x_adv, t);
}

}  // namespace robust_ext
