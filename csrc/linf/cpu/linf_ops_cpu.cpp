// The L-inf ops' CPU kernels: at::parallel_for over elements, loops the compiler vectorizes for the CPU
// found at run time (GCC target_clones: AVX-512, AVX2, baseline), the math from linf/linf_math.h.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu/clones.h"
#include "cpu/philox_blocks.h"
#include "cpu/rows.h"
#include "linf/linf_math.h"
#include "linf/linf_ops.h"

namespace robust_ext {
namespace {

// The row loops: one sample's contiguous run (or part of it) with scalar budgets.
template <typename S>
RX_CLONES void step_row(S* __restrict out, const S* xa, const S* __restrict g, const S* __restrict x,
                        int64_t n, compute_t<S> alpha, compute_t<S> eps, compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  cpu::update_row(out, xa, n, [&](S v, int64_t i) RX_INLINE_LAMBDA {
    return static_cast<S>(math::linf_step<T>(static_cast<T>(v), static_cast<T>(g[i]), static_cast<T>(x[i]),
                                             alpha, eps, lo, hi));
  });
}

template <typename S>
RX_CLONES void project_row(S* __restrict out, const S* xa, const S* __restrict x, int64_t n, compute_t<S> eps,
                           compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  cpu::update_row(out, xa, n, [&](S v, int64_t i) RX_INLINE_LAMBDA {
    return static_cast<S>(math::linf_project<T>(static_cast<T>(v), static_cast<T>(x[i]), eps, lo, hi));
  });
}

// x_prev may be x_adv itself (APGD's first momentum step) or, in place, out: not __restrict, and every
// element is read before it is written.
template <typename S>
RX_CLONES void apgd_row(S* __restrict out, const S* xa, const S* xp, const S* __restrict g, const S* __restrict x,
                        int64_t n, compute_t<S> alpha, compute_t<S> eps, compute_t<S> m, compute_t<S> m1,
                        compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  cpu::update_row(out, xa, n, [&](S v, int64_t i) RX_INLINE_LAMBDA {
    return static_cast<S>(math::linf_apgd_update<S, T>(static_cast<T>(v), static_cast<T>(xp[i]), static_cast<T>(g[i]),
                                                       static_cast<T>(x[i]), alpha, eps, m, m1, lo, hi));
  });
}

template <typename S>
RX_CLONES void fgsm_row(S* __restrict out, const S* __restrict x, const S* __restrict g, int64_t n,
                        compute_t<S> eps, compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<S>(math::fgsm<T>(static_cast<T>(x[i]), static_cast<T>(g[i]), eps, lo, hi));
}

// Elements [begin, end) of the logical index space, their words from aligned Philox runs.
template <typename S>
RX_CLONES void random_init_row(S* __restrict out, const S* __restrict x, int64_t begin, int64_t end,
                               uint32_t k0, uint32_t k1, compute_t<S> eps, compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  const auto words_run = [&](int64_t i, int64_t stop, int64_t run, const cpu::PhiloxWords& w) RX_INLINE_LAMBDA {
    const uint32_t* __restrict words = &w[0][0][0];
    for (int64_t j = i; j < stop; ++j)
      out[j] = static_cast<S>(math::random_init<T>(static_cast<T>(x[j]), words[j - run], eps, lo, hi));
  };
  cpu::for_philox_runs(begin, end, k0, k1, words_run);
}

struct CpuKernels {
  static void step(const at::Tensor& out, const at::Tensor& xa, const at::Tensor& g, const at::Tensor& x,
                   const Budget& alpha, const Budget& eps, double lo, double hi, const Dense& d) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "linf_step", [&] {
      using T = compute_t<scalar_t>;
      const cpu::BudgetReader<T> a(alpha), e(eps);
      scalar_t* po = out.data_ptr<scalar_t>();
      const scalar_t *pxa = xa.data_ptr<scalar_t>(), *pg = g.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>();
      cpu::parallel_rows(d, [&](int64_t b, int64_t end, int64_t s) {
        step_row<scalar_t>(po + b, pxa + b, pg + b, px + b, end - b, a[s], e[s], T(lo), T(hi));
      });
    });
  }

  static void project(const at::Tensor& out, const at::Tensor& xa, const at::Tensor& x, const Budget& eps,
                      double lo, double hi, const Dense& d) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "linf_project", [&] {
      using T = compute_t<scalar_t>;
      const cpu::BudgetReader<T> e(eps);
      scalar_t* po = out.data_ptr<scalar_t>();
      const scalar_t *pxa = xa.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>();
      cpu::parallel_rows(d, [&](int64_t b, int64_t end, int64_t s) {
        project_row<scalar_t>(po + b, pxa + b, px + b, end - b, e[s], T(lo), T(hi));
      });
    });
  }

  static void apgd_update(const at::Tensor& out, const at::Tensor& xa, const at::Tensor& xp, const at::Tensor& g,
                          const at::Tensor& x, const Budget& alpha, const Budget& eps, double momentum, double lo,
                          double hi, const Dense& d) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "linf_apgd_update", [&] {
      using T = compute_t<scalar_t>;
      const cpu::BudgetReader<T> a(alpha), e(eps);
      const T m = static_cast<T>(momentum), m1 = static_cast<T>(1.0 - momentum);
      scalar_t* po = out.data_ptr<scalar_t>();
      const scalar_t *pxa = xa.data_ptr<scalar_t>(), *pxp = xp.data_ptr<scalar_t>(), *pg = g.data_ptr<scalar_t>(),
                     *px = x.data_ptr<scalar_t>();
      cpu::parallel_rows(d, [&](int64_t b, int64_t end, int64_t s) {
        apgd_row<scalar_t>(po + b, pxa + b, pxp + b, pg + b, px + b, end - b, a[s], e[s], m, m1, T(lo), T(hi));
      });
    });
  }

  static void single_step(const at::Tensor& out, const at::Tensor& x, const at::Tensor& g, const Budget& eps,
                          double lo, double hi, const Dense& d) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "fgsm", [&] {
      using T = compute_t<scalar_t>;
      const cpu::BudgetReader<T> e(eps);
      scalar_t* po = out.data_ptr<scalar_t>();
      const scalar_t *px = x.data_ptr<scalar_t>(), *pg = g.data_ptr<scalar_t>();
      cpu::parallel_rows(d, [&](int64_t b, int64_t end, int64_t s) {
        fgsm_row<scalar_t>(po + b, px + b, pg + b, end - b, e[s], T(lo), T(hi));
      });
    });
  }

  static void random_init(const at::Tensor& out, const at::Tensor& x, const Budget& eps, double lo, double hi,
                          const at::Tensor& seed, const Dense& d) {
    const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
    const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
    RX_DISPATCH_FLOATS(out.scalar_type(), "linf_random_init", [&] {
      using T = compute_t<scalar_t>;
      const cpu::BudgetReader<T> e(eps);
      scalar_t* po = out.data_ptr<scalar_t>();
      const scalar_t* px = x.data_ptr<scalar_t>();
      cpu::parallel_rows(d, [&](int64_t b, int64_t end, int64_t s) {
        random_init_row<scalar_t>(po, px, b, end, k0, k1, e[s], T(lo), T(hi));
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(robust_ext, CPU, m) {
  register_linf_ops<CpuKernels>(m);
}

}  // namespace robust_ext
