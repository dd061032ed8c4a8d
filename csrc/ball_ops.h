// The op bodies of a threat model's ops (a norm ball around x, clipped to a box), shared by every family
// (linf/, l2/) and both backends: checks, per-sample budgets, functional vs in-place, layouts.
//
// A family supplies `Layout` -- Layout::run(out, kernel, inputs...) runs the kernel on the layouts it
// can walk (else on copies), Layout::shape(out, budgets) says how the kernel sees the samples -- and a
// backend supplies `K`: step, project, apgd_update, single_step and random_init loops over such tensors.
#pragma once

#include <initializer_list>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "checks.h"
#include "dense.h"

namespace robust_ext {

// Runs `kernel(out, inputs...)` on contiguous tensors: copies of the others, the result copied into out.
template <typename Kernel, typename... Ts>
void run_contiguous(const at::Tensor& out, Kernel&& kernel, const Ts&... inputs) {
  if (out.numel() == 0) return;
  bool contiguous = out.is_contiguous();
  for (const at::Tensor* t : {&inputs...}) contiguous = contiguous && t->is_contiguous();
  if (contiguous) {
    kernel(out, inputs...);
    return;
  }
  at::Tensor tmp = at::empty(out.sizes(), out.options());
  kernel(tmp, inputs.contiguous()...);
  out.copy_(tmp);
}

template <class K, class Layout>
struct BallOps {
  using Tensor = at::Tensor;
  using OptTensor = c10::optional<Tensor>;

  static void check_project(const Tensor& x_adv, const Tensor& x, double eps, double lo, double hi,
                            const OptTensor& eps_t) {
    check_image(x, "x");
    check_like(x_adv, "x_adv", x, "x");
    check_budget(eps, eps_t, "eps", true, x);
    check_bounds(lo, hi);
  }

  static void check_step(const Tensor& x_adv, const Tensor& grad, const Tensor& x, double alpha, double eps,
                         double lo, double hi, const OptTensor& alpha_t, const OptTensor& eps_t) {
    check_project(x_adv, x, eps, lo, hi, eps_t);
    check_like(grad, "grad", x, "x");
    check_budget(alpha, alpha_t, "alpha", false, x);
  }

  static void step_into(const Tensor& out, const Tensor& x_adv, const Tensor& grad, const Tensor& x,
                        double alpha, double eps, double lo, double hi, const OptTensor& alpha_t,
                        const OptTensor& eps_t) {
    const Budget a = make_budget(alpha, alpha_t, x), e = make_budget(eps, eps_t, x);
    Layout::run(out, [&](const Tensor& o, const Tensor& xa, const Tensor& g, const Tensor& xx) {
      K::step(o, xa, g, xx, a, e, lo, hi, Layout::shape(o, {&a, &e}));
    }, x_adv, grad, x);
  }

  static Tensor step(const Tensor& x_adv, const Tensor& grad, const Tensor& x, double alpha, double eps,
                     double lo, double hi, const OptTensor& alpha_t, const OptTensor& eps_t) {
    check_step(x_adv, grad, x, alpha, eps, lo, hi, alpha_t, eps_t);
    Tensor out = at::empty_like(x_adv);
    step_into(out, x_adv, grad, x, alpha, eps, lo, hi, alpha_t, eps_t);
    return out;
  }

  static void step_(const Tensor& x_adv, const Tensor& grad, const Tensor& x, double alpha, double eps,
                    double lo, double hi, const OptTensor& alpha_t, const OptTensor& eps_t) {
    check_step(x_adv, grad, x, alpha, eps, lo, hi, alpha_t, eps_t);
    check_writable(x_adv, {grad, x}, {alpha_t, eps_t});
    step_into(x_adv, x_adv, grad, x, alpha, eps, lo, hi, alpha_t, eps_t);
  }

  // APGD's update (Croce & Hein 2020): the step from x_adv, then the momentum point
  // x_adv + momentum (z - x_adv) + (1 - momentum)(x_adv - x_prev) projected and clipped, in one op.
  static void check_apgd(const Tensor& x_adv, const Tensor& x_prev, const Tensor& grad, const Tensor& x,
                         double alpha, double eps, double momentum, double lo, double hi, const OptTensor& alpha_t,
                         const OptTensor& eps_t) {
    check_step(x_adv, grad, x, alpha, eps, lo, hi, alpha_t, eps_t);
    check_like(x_prev, "x_prev", x, "x");
    check_momentum(momentum);
  }

  // momentum == 1 is the step (APGD's first iteration): the momentum point would be (z - x_adv) + x_adv,
  // which can differ from z in the last bit, and x_prev is not read.
  static void apgd_update_into(const Tensor& out, const Tensor& x_adv, const Tensor& x_prev, const Tensor& grad,
                               const Tensor& x, double alpha, double eps, double momentum, double lo, double hi,
                               const OptTensor& alpha_t, const OptTensor& eps_t) {
    if (momentum == 1.0) {
      step_into(out, x_adv, grad, x, alpha, eps, lo, hi, alpha_t, eps_t);
      return;
    }
    const Budget a = make_budget(alpha, alpha_t, x), e = make_budget(eps, eps_t, x);
    Layout::run(out, [&](const Tensor& o, const Tensor& xa, const Tensor& xp, const Tensor& g, const Tensor& xx) {
      K::apgd_update(o, xa, xp, g, xx, a, e, momentum, lo, hi, Layout::shape(o, {&a, &e}));
    }, x_adv, x_prev, grad, x);
  }

  static Tensor apgd_update(const Tensor& x_adv, const Tensor& x_prev, const Tensor& grad, const Tensor& x,
                            double alpha, double eps, double momentum, double lo, double hi, const OptTensor& alpha_t,
                            const OptTensor& eps_t) {
    check_apgd(x_adv, x_prev, grad, x, alpha, eps, momentum, lo, hi, alpha_t, eps_t);
    Tensor out = at::empty_like(x_adv);
    apgd_update_into(out, x_adv, x_prev, grad, x, alpha, eps, momentum, lo, hi, alpha_t, eps_t);
    return out;
  }

  static void apgd_update_(const Tensor& x_adv, const Tensor& x_prev, const Tensor& grad, const Tensor& x,
                           double alpha, double eps, double momentum, double lo, double hi, const OptTensor& alpha_t,
                           const OptTensor& eps_t) {
    check_apgd(x_adv, x_prev, grad, x, alpha, eps, momentum, lo, hi, alpha_t, eps_t);
    check_writable(x_adv, {x_prev, grad, x}, {alpha_t, eps_t});
    apgd_update_into(x_adv, x_adv, x_prev, grad, x, alpha, eps, momentum, lo, hi, alpha_t, eps_t);
  }

  static void project_into(const Tensor& out, const Tensor& x_adv, const Tensor& x, double eps, double lo,
                           double hi, const OptTensor& eps_t) {
    const Budget e = make_budget(eps, eps_t, x);
    Layout::run(out, [&](const Tensor& o, const Tensor& xa, const Tensor& xx) {
      K::project(o, xa, xx, e, lo, hi, Layout::shape(o, {&e}));
    }, x_adv, x);
  }

  static Tensor project(const Tensor& x_adv, const Tensor& x, double eps, double lo, double hi,
                        const OptTensor& eps_t) {
    check_project(x_adv, x, eps, lo, hi, eps_t);
    Tensor out = at::empty_like(x_adv);
    project_into(out, x_adv, x, eps, lo, hi, eps_t);
    return out;
  }

  static void project_(const Tensor& x_adv, const Tensor& x, double eps, double lo, double hi,
                       const OptTensor& eps_t) {
    check_project(x_adv, x, eps, lo, hi, eps_t);
    check_writable(x_adv, {x}, {eps_t});
    project_into(x_adv, x_adv, x, eps, lo, hi, eps_t);
  }

  // FGSM / FGM: the one-step attack from x.
  static Tensor single_step(const Tensor& x, const Tensor& grad, double eps, double lo, double hi,
                            const OptTensor& eps_t) {
    check_image(x, "x");
    check_like(grad, "grad", x, "x");
    check_budget(eps, eps_t, "eps", true, x);
    check_bounds(lo, hi);
    const Budget e = make_budget(eps, eps_t, x);
    Tensor out = at::empty_like(x);
    Layout::run(out, [&](const Tensor& o, const Tensor& xx, const Tensor& g) {
      K::single_step(o, xx, g, e, lo, hi, Layout::shape(o, {&e}));
    }, x, grad);
    return out;
  }

  // The noise of element i depends on its logical (row-major) index, so the kernel runs on a
  // contiguous tensor: any input layout gives the same values.
  static Tensor random_init(const Tensor& x, double eps, double lo, double hi, const Tensor& seed,
                            const OptTensor& eps_t) {
    check_image(x, "x");
    check_budget(eps, eps_t, "eps", true, x);
    check_bounds(lo, hi);
    check_seed(seed, x);
    const Budget e = make_budget(eps, eps_t, x);
    Tensor out = at::empty_like(x);
    run_contiguous(out, [&](const Tensor& o, const Tensor& xx) {
      K::random_init(o, xx, e, lo, hi, seed, Layout::shape(o, {&e}));
    }, x);
    return out;
  }
};

// The eight ops of a family under its schema names (robust_ext.cpp).
struct BallOpNames {
  const char *step, *step_, *project, *project_, *apgd_update, *apgd_update_, *single_step, *random_init;
};

template <class K, class Layout>
void register_ball_ops(torch::Library& m, const BallOpNames& names) {
  using Ops = BallOps<K, Layout>;
  m.impl(names.step, &Ops::step);
  m.impl(names.step_, &Ops::step_);
  m.impl(names.project, &Ops::project);
  m.impl(names.project_, &Ops::project_);
  m.impl(names.apgd_update, &Ops::apgd_update);
  m.impl(names.apgd_update_, &Ops::apgd_update_);
  m.impl(names.single_step, &Ops::single_step);
  m.impl(names.random_init, &Ops::random_init);
}

}  // namespace robust_ext
