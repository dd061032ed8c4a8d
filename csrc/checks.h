// Input checks shared by every op and both backends: one place that names the argument, says what was
// expected and what came.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

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

// The largest budget magnitude: float32's max, the compute type of fp32/fp16/bf16 images. An infinite (or
// overflowing) budget times a zero gradient element would write NaN, which the ops never do.
constexpr double kMaxBudget = FLT_MAX;

// A budget (alpha or eps) is a float, or a per-sample tensor along dim 0 of x. eps must be >= 0;
// alpha may be negative (a targeted, descending step); both finite, at most kMaxBudget in magnitude.
// Values are checked without a host sync: on CUDA a bad per-sample value fails asynchronously (at the
// next synchronisation).
inline void check_budget(double value, const c10::optional<at::Tensor>& per_sample, const char* name,
                         bool non_negative, const at::Tensor& x) {
  if (!per_sample.has_value() || !per_sample->defined()) {
    TORCH_CHECK(!std::isnan(value), name, " must not be NaN");
    TORCH_CHECK(!non_negative || value >= 0, name, " must be >= 0, got ", value);
    TORCH_CHECK(std::fabs(value) <= kMaxBudget, name, " must be finite and at most ", kMaxBudget,
                " in magnitude (an infinite budget times a zero gradient would be NaN), got ", value);
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
  const char* what = non_negative ? " must be >= 0 and not NaN for every sample, and finite (at most float32's max)"
                                  : " must not be NaN for any sample, and finite (at most float32's max)";
  if (t.is_cpu()) {  // a plain loop: no temporaries on the per-step path
    const at::Tensor c = t.contiguous();
    bool bad = false;
    RX_DISPATCH_FLOATS(c.scalar_type(), "check_budget", [&] {
      const scalar_t* p = c.data_ptr<scalar_t>();
      for (int64_t i = 0; i < c.numel(); ++i) {
        const double v = static_cast<double>(p[i]);
        bad = bad || std::isnan(v) || (non_negative && v < 0) || std::fabs(v) > kMaxBudget;
      }
    });
    TORCH_CHECK(!bad, name, what);
  } else {
    at::Tensor bad = t.isnan().logical_or_(t.abs().gt(kMaxBudget));
    if (non_negative) bad.logical_or_(t.lt(0));
    at::_assert_async(bad.any().logical_not(), non_negative ? "robust_ext: a per-sample eps/alpha is negative, NaN or infinite"
                                                            : "robust_ext: a per-sample alpha is NaN or infinite");
  }
}

// APGD's momentum weight: the new iterate is x_adv + momentum (z - x_adv) + (1 - momentum)(x_adv - x_prev).
inline void check_momentum(double momentum) {
  TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, "momentum must be in [0, 1], got ", momentum);
}

// The Philox key of a random init (philox.h): a 0-d int64 tensor on the CPU or on x's device.
inline void check_seed(const at::Tensor& seed, const at::Tensor& x) {
  TORCH_CHECK(seed.defined() && seed.dim() == 0 && seed.scalar_type() == at::kLong,
              "seed must be a 0-d int64 tensor, got ", seed.defined() ? seed.sizes() : at::IntArrayRef{});
  TORCH_CHECK(seed.is_cpu() || seed.device() == x.device(), "seed must be on the CPU or on x's device (",
              x.device(), "), got ", seed.device());
}

// Whether two elements of t may share memory. ATen answers only for dense tensors (TOO_HARD otherwise);
// this is exact for any strides >= 0: sorted by stride, each dimension must step past everything the
// smaller ones reach (e.g. as_strided((4, 4), (1, 1)) fails it).
inline bool may_self_overlap(const at::Tensor& t) {
  if (t.numel() <= 1 || t.is_non_overlapping_and_dense()) return false;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dimensions that step
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;  // the largest offset the smaller dimensions reach
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return true;
    reach += stride * (size - 1);
  }
  return false;
}

// Whether a and b may share memory: the same storage and intersecting byte ranges (ATen's
// assert_no_overlap gives up, without raising, on non-dense views such as a column of x_adv).
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  const auto range = [](const at::Tensor& t) {
    int64_t lo = 0, hi = 0;
    for (int64_t d = 0; d < t.dim(); ++d) (t.stride(d) < 0 ? lo : hi) += t.stride(d) * (t.size(d) - 1);
    const auto base = reinterpret_cast<intptr_t>(t.const_data_ptr());
    return std::make_pair(base + lo * t.element_size(), base + (hi + 1) * t.element_size());
  };
  const auto [a0, a1] = range(a);
  const auto [b0, b1] = range(b);
  return a0 < b1 && b0 < a1;
}

// Writing into x_adv must not corrupt it: no element may alias another, x_adv may not partly overlap an
// input, and a per-sample budget may not overlap x_adv at all (it would be read after being written).
// (That it does not require grad, check_image has already made sure.)
inline void check_writable(const at::Tensor& x_adv, std::initializer_list<at::Tensor> inputs,
                           std::initializer_list<c10::optional<at::Tensor>> budgets = {}) {
  at::assert_no_internal_overlap(x_adv);
  TORCH_CHECK(!may_self_overlap(x_adv), "unsupported operation: more than one element of the written-to tensor "
              "refers to a single memory location. Please clone() the tensor before performing the operation.");
  for (const auto& t : inputs) at::assert_no_partial_overlap(x_adv, t);
  for (const auto& b : budgets)
    TORCH_CHECK(!(b.has_value() && b->defined() && may_overlap(x_adv, *b)),
                "unsupported operation: some elements of the input tensor and the written-to tensor refer to a "
                "single memory location, which may cause the results to be incorrect. Please clone() the tensor "
                "before performing the operation.");
}

}  // namespace robust_ext
