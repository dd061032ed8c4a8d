// The L-inf ops' bodies shared by the CPU and CUDA backends: checks, per-sample budgets, layouts,
// functional vs in-place. A backend supplies only `K`, four loops over dense memory that call
// linf/linf_math.h.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "checks.h"
#include "dense.h"

namespace robust_ext {

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
    check_seed(seed, x);
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
