// What the op bodies of the elementwise families (linf/, l2/) share on the schema side, whatever the
// backend: per-sample budgets, the dense layout the kernels walk, and the copy around other layouts.
#pragma once

#include <initializer_list>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

namespace robust_ext {

// alpha or eps as a kernel sees it: one value, or `per_sample` (contiguous, compute dtype) indexed by
// sample.
struct Budget {
  double value = 0.0;
  at::Tensor per_sample;
};

// What a kernel gets: `out` and the inputs share one dense layout in which every sample (dim 0) is one
// contiguous run of `inner` elements, so element i of memory belongs to sample i / inner.
struct Dense {
  int64_t numel;
  int64_t inner;
};

inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline Budget make_budget(double value, const c10::optional<at::Tensor>& per_sample, const at::Tensor& x) {
  Budget b{value, {}};
  if (per_sample.has_value() && per_sample->defined())
    b.per_sample = per_sample->to(compute_dtype(x.scalar_type())).contiguous();
  return b;
}

// The kernels' fast path: all tensors in one non-overlapping, dense layout with samples outermost.
inline bool same_dense_layout(const at::Tensor& ref, std::initializer_list<at::Tensor> others) {
  if (!ref.is_non_overlapping_and_dense()) return false;
  if (ref.dim() > 0 && ref.size(0) > 1 && ref.stride(0) * ref.size(0) != ref.numel()) return false;
  for (const auto& t : others)
    if (t.strides() != ref.strides()) return false;
  return true;
}

// With scalar budgets the whole tensor is one run (kernels then never split at sample boundaries).
inline Dense dense_of(const at::Tensor& t, std::initializer_list<const Budget*> budgets) {
  const int64_t n = t.numel();
  bool per_sample = false;
  for (const Budget* b : budgets) per_sample = per_sample || b->per_sample.defined();
  const int64_t inner = (!per_sample || t.dim() == 0 || t.size(0) == 0) ? n : n / t.size(0);
  return Dense{n, inner};
}

// Runs `kernel(out, inputs...)` on the fast path when the layouts allow, else on contiguous copies
// (arbitrary strides cost a copy each way, never a wrong result).
template <typename Kernel, typename... Ts>
void run_dense(const at::Tensor& out, Kernel&& kernel, const Ts&... inputs) {
  if (out.numel() == 0) return;
  if (same_dense_layout(out, {inputs...})) {
    kernel(out, inputs...);
    return;
  }
  at::Tensor tmp = at::empty(out.sizes(), out.options());
  kernel(tmp, inputs.contiguous()...);
  out.copy_(tmp);
}

}  // namespace robust_ext
