// The op bodies shared by the CPU and CUDA backends: checks, per-sample budgets, layouts, functional vs
// in-place. A backend supplies only `Kernels`, four loops over dense memory that call linf_math.h.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "checks.h"

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

template <class K>
struct LinfOps {
  using Tensor = at::Tensor;
  using OptTensor = c10::optional<Tensor>;

  static void step_into(const Tensor& out, const Tensor& x_adv, const Tensor& grad, const Tensor& x,
                        double alpha, double eps, double lo, double hi, const OptTensor& alpha_t,
                        const OptTensor& eps_t) {
    const Budget a = make_budget(alpha, alpha_t, x), e = make_budget(eps, eps_t, x);
    run_dense(out, [&](const Tensor& o, const Tensor& xa, const Tensor& g, const Tensor& xx) {
      K::step(o, xa, g, xx, a, e, lo, hi, dense_of(o, {&a, &e}));
    }, x_adv, grad, x);
  }

  static void check_step(const Tensor& x_adv, const Tensor& grad, const Tensor& x, double alpha, double eps,
                         double lo, double hi, const OptTensor& alpha_t, const OptTensor& eps_t) {
    check_project(x_adv, x, eps, lo, hi, eps_t);
    check_like(grad, "grad", x, "x");
    check_budget(alpha, alpha_t, "alpha", false, x);
  }

  static Tensor linf_step(const Tensor& x_adv, const Tensor& grad, const Tensor& x, double alpha, double eps,
                          double lo, double hi, const OptTensor& alpha_t, const OptTensor& eps_t) {
    check_step(x_adv, grad, x, alpha, eps, lo, hi, alpha_t, eps_t);
    Tensor out = at::empty_like(x_adv);
    step_into(out, x_adv, grad, x, alpha, eps, lo, hi, alpha_t, eps_t);
    return out;
  }

  static void linf_step_(const Tensor& x_adv, const Tensor& grad, const Tensor& x, double alpha, double eps,
                         double lo, double hi, const OptTensor& alpha_t, const OptTensor& eps_t) {
    check_step(x_adv, grad, x, alpha, eps, lo, hi, alpha_t, eps_t);
    check_writable(x_adv, {grad, x});
    step_into(x_adv, x_adv, grad, x, alpha, eps, lo, hi, alpha_t, eps_t);
  }

  static void check_project(const Tensor& x_adv, const Tensor& x, double eps, double lo, double hi,
                            const OptTensor& eps_t) {
    check_image(x, "x");
    check_like(x_adv, "x_adv", x, "x");
    check_budget(eps, eps_t, "eps", true, x);
    check_bounds(lo, hi);
  }

  static void project_into(const Tensor& out, const Tensor& x_adv, const Tensor& x, double eps, double lo,
                           double hi, const OptTensor& eps_t) {
    const Budget e = make_budget(eps, eps_t, x);
    run_dense(out, [&](const Tensor& o, const Tensor& xa, const Tensor& xx) {
      K::project(o, xa, xx, e, lo, hi, dense_of(o, {&e}));
    }, x_adv, x);
  }

  static Tensor linf_project(const Tensor& x_adv, const Tensor& x, double eps, double lo, double hi,
                             const OptTensor& eps_t) {
    check_project(x_adv, x, eps, lo, hi, eps_t);
    Tensor out = at::empty_like(x_adv);
    project_into(out, x_adv, x, eps, lo, hi, eps_t);
    return out;
  }

  static void linf_project_(const Tensor& x_adv, const Tensor& x, double eps, double lo, double hi,
                            const OptTensor& eps_t) {
    check_project(x_adv, x, eps, lo, hi, eps_t);
    check_writable(x_adv, {x});
    project_into(x_adv, x_adv, x, eps, lo, hi, eps_t);
  }

  static Tensor fgsm(const Tensor& x, const Tensor& grad, double eps, double lo, double hi,
                     const OptTensor& eps_t) {
    check_image(x, "x");
    check_like(grad, "grad", x, "x");
    check_budget(eps, eps_t, "eps", true, x);
    check_bounds(lo, hi);
    const Budget e = make_budget(eps, eps_t, x);
    Tensor out = at::empty_like(x);
    run_dense(out, [&](const Tensor& o, const Tensor& xx, const Tensor& g) {
      K::fgsm(o, xx, g, e, lo, hi, dense_of(o, {&e}));
    }, x, grad);
    return out;
  }

  // The noise of element i depends on its logical (row-major) index, so the kernel runs on a
  // contiguous tensor: any input layout gives the same values.
  static Tensor linf_random_init(const Tensor& x, double eps, double lo, double hi, const Tensor& seed,
                                 const OptTensor& eps_t) {
    check_image(x, "x");
    check_budget(eps, eps_t, "eps", true, x);
    check_bounds(lo, hi);
    TORCH_CHECK(seed.defined() && seed.dim() == 0 && seed.scalar_type() == at::kLong,
                "seed must be a 0-d int64 tensor, got ", seed.defined() ? seed.sizes() : at::IntArrayRef{});
    TORCH_CHECK(seed.is_cpu() || seed.device() == x.device(), "seed must be on the CPU or on x's device (",
                x.device(), "), got ", seed.device());
    const Budget e = make_budget(eps, eps_t, x);
    Tensor out = at::empty_like(x);
    if (x.numel() == 0) return out;
    const Tensor xc = x.contiguous();
    const Tensor oc = out.is_contiguous() ? out : at::empty(x.sizes(), x.options());
    K::random_init(oc, xc, e, lo, hi, seed, dense_of(oc, {&e}));
    if (!oc.is_same(out)) out.copy_(oc);
    return out;
  }
};

template <class K>
void register_linf_ops(torch::Library& m) {
  m.impl("linf_step", &LinfOps<K>::linf_step);
  m.impl("linf_step_", &LinfOps<K>::linf_step_);
  m.impl("linf_project", &LinfOps<K>::linf_project);
  m.impl("linf_project_", &LinfOps<K>::linf_project_);
  m.impl("fgsm", &LinfOps<K>::fgsm);
  m.impl("linf_random_init", &LinfOps<K>::linf_random_init);
}

}  // namespace robust_ext
