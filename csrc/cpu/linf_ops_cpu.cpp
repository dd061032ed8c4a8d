// CPU kernels: at::parallel_for over elements, loops the compiler vectorizes for the CPU found at run
// time (GCC target_clones: AVX-512, AVX2, baseline), the math from linf_math.h.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../linf_math.h"
#include "../linf_ops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RX_CLONES
#endif

namespace robust_ext {
namespace {

template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// The row loops: one sample's contiguous run (or part of it) with scalar budgets. In-place calls
// (out == x_adv) take their own loop: with a possible alias GCC only versions the loop and then runs the
// scalar version. Inputs may equal `out` exactly (never partly overlap it: checks.h), which keeps
// every element's reads before its write in vector code too.
template <typename S>
RX_CLONES void step_row(S* __restrict out, const S* xa, const S* __restrict g, const S* __restrict x,
                        int64_t n, compute_t<S> alpha, compute_t<S> eps, compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  auto f = [&](S v, int64_t i) {
    return static_cast<S>(math::linf_step<T>(static_cast<T>(v), static_cast<T>(g[i]), static_cast<T>(x[i]),
                                             alpha, eps, lo, hi));
  };
  if (xa == out) {
    for (int64_t i = 0; i < n; ++i) out[i] = f(out[i], i);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = f(xa[i], i);
  }
}

template <typename S>
RX_CLONES void project_row(S* __restrict out, const S* xa, const S* __restrict x, int64_t n, compute_t<S> eps,
                           compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  auto f = [&](S v, int64_t i) {
    return static_cast<S>(math::linf_project<T>(static_cast<T>(v), static_cast<T>(x[i]), eps, lo, hi));
  };
  if (xa == out) {
    for (int64_t i = 0; i < n; ++i) out[i] = f(out[i], i);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = f(xa[i], i);
  }
}

template <typename S>
RX_CLONES void fgsm_row(S* __restrict out, const S* __restrict x, const S* __restrict g, int64_t n,
                        compute_t<S> eps, compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<S>(math::fgsm<T>(static_cast<T>(x[i]), static_cast<T>(g[i]), eps, lo, hi));
}

// Elements [begin, end) of the logical index space. Whole 64-element Philox blocks run 16 counters
// at once (the vectorized part); the ragged ends take one word per element.
template <typename S>
RX_CLONES void random_init_row(S* __restrict out, const S* __restrict x, int64_t begin, int64_t end,
                               uint32_t k0, uint32_t k1, compute_t<S> eps, compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  auto one = [&](int64_t i) {
    const math::Philox4 r = math::philox4x32_10(math::philox_counter(i), k0, k1);
    out[i] = static_cast<S>(math::random_init<T>(static_cast<T>(x[i]), r.w[math::philox_word(i)], eps, lo, hi));
  };
  int64_t i = begin;
  const int64_t head_end = std::min(end, (begin + math::kBlock - 1) / math::kBlock * math::kBlock);
  for (; i < head_end; ++i) one(i);
  for (; i + math::kBlock <= end; i += math::kBlock) {
    const uint64_t c_base = static_cast<uint64_t>(i / math::kBlock) * math::kLanes;
    uint32_t w[4][math::kLanes];
    for (int l = 0; l < math::kLanes; ++l) {
      const math::Philox4 r = math::philox4x32_10(c_base + l, k0, k1);
      w[0][l] = r.w[0]; w[1][l] = r.w[1]; w[2][l] = r.w[2]; w[3][l] = r.w[3];
    }
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < math::kLanes; ++l) {
        const int64_t j = i + k * math::kLanes + l;
        out[j] = static_cast<S>(math::random_init<T>(static_cast<T>(x[j]), w[k][l], eps, lo, hi));
      }
  }
  for (; i < end; ++i) one(i);
}

// Elements per task: below this a second thread costs more than it saves.
constexpr int64_t kGrain = 32768;

// Splits [0, numel) over threads, then each thread's range at sample boundaries, so a row sees one
// alpha/eps. The split depends on the thread count; the result does not.
template <typename F>
void parallel_rows(const Dense& d, F&& row) {
  at::parallel_for(0, d.numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t s = i / d.inner;
      const int64_t stop = std::min(end, (s + 1) * d.inner);
      row(i, stop, s);
      i = stop;
    }
  });
}

template <typename T>
struct BudgetReader {
  const T* per_sample;
  T value;
  explicit BudgetReader(const Budget& b)
      : per_sample(b.per_sample.defined() ? b.per_sample.data_ptr<T>() : nullptr),
        value(static_cast<T>(b.value)) {}
  T operator[](int64_t s) const { return per_sample ? per_sample[s] : value; }
};

#define RX_DISPATCH_FLOATS(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

struct CpuKernels {
  static void step(const at::Tensor& out, const at::Tensor& xa, const at::Tensor& g, const at::Tensor& x,
                   const Budget& alpha, const Budget& eps, double lo, double hi, const Dense& d) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "linf_step", [&] {
      using T = compute_t<scalar_t>;
      const BudgetReader<T> a(alpha), e(eps);
      scalar_t* po = out.data_ptr<scalar_t>();
      const scalar_t *pxa = xa.data_ptr<scalar_t>(), *pg = g.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>();
      parallel_rows(d, [&](int64_t b, int64_t end, int64_t s) {
        step_row<scalar_t>(po + b, pxa + b, pg + b, px + b, end - b, a[s], e[s], T(lo), T(hi));
      });
    });
  }

  static void project(const at::Tensor& out, const at::Tensor& xa, const at::Tensor& x, const Budget& eps,
                      double lo, double hi, const Dense& d) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "linf_project", [&] {
      using T = compute_t<scalar_t>;
      const BudgetReader<T> e(eps);
      scalar_t* po = out.data_ptr<scalar_t>();
      const scalar_t *pxa = xa.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>();
      parallel_rows(d, [&](int64_t b, int64_t end, int64_t s) {
        project_row<scalar_t>(po + b, pxa + b, px + b, end - b, e[s], T(lo), T(hi));
      });
    });
  }

  static void fgsm(const at::Tensor& out, const at::Tensor& x, const at::Tensor& g, const Budget& eps,
                   double lo, double hi, const Dense& d) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "fgsm", [&] {
      using T = compute_t<scalar_t>;
      const BudgetReader<T> e(eps);
      scalar_t* po = out.data_ptr<scalar_t>();
      const scalar_t *px = x.data_ptr<scalar_t>(), *pg = g.data_ptr<scalar_t>();
      parallel_rows(d, [&](int64_t b, int64_t end, int64_t s) {
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
      const BudgetReader<T> e(eps);
      scalar_t* po = out.data_ptr<scalar_t>();
      const scalar_t* px = x.data_ptr<scalar_t>();
      parallel_rows(d, [&](int64_t b, int64_t end, int64_t s) {
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
