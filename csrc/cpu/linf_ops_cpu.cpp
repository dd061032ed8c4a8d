// CPU kernels: at::parallel_for over elements, loops the compiler vectorizes for the CPU found at run
// time (GCC target_clones: AVX-512, AVX2, baseline), the math from linf_math.h.
#include <algorithm>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../linf_math.h"
#include "../linf_ops.h"
#include "clones.h"

namespace robust_ext {
namespace {

// The row loops: one sample's contiguous run (or part of it) with scalar budgets.
//
// out[i] = f(v_i, i) with v_i = xa[i]. In-place calls (out == x_adv) take their own loop: with a possible
// alias GCC only versions the loop and then runs the scalar version. Inputs may equal `out` exactly (never
// partly overlap it: checks.h), which keeps every element's reads before its write in vector code too.
// Inlined into each target_clones row below, so it is vectorized for each ISA.
template <typename S, typename F>
C10_ALWAYS_INLINE void update_row(S* __restrict out, const S* xa, int64_t n, F f) {
  if (xa == out) {
    for (int64_t i = 0; i < n; ++i) out[i] = f(out[i], i);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = f(xa[i], i);
  }
}

template <typename S>
RX_CLONES void step_row(S* __restrict out, const S* xa, const S* __restrict g, const S* __restrict x,
                        int64_t n, compute_t<S> alpha, compute_t<S> eps, compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  update_row(out, xa, n, [&](S v, int64_t i) {
    return static_cast<S>(math::linf_step<T>(static_cast<T>(v), static_cast<T>(g[i]), static_cast<T>(x[i]),
                                             alpha, eps, lo, hi));
  });
}

template <typename S>
RX_CLONES void project_row(S* __restrict out, const S* xa, const S* __restrict x, int64_t n, compute_t<S> eps,
                           compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  update_row(out, xa, n, [&](S v, int64_t i) {
    return static_cast<S>(math::linf_project<T>(static_cast<T>(v), static_cast<T>(x[i]), eps, lo, hi));
  });
}

template <typename S>
RX_CLONES void fgsm_row(S* __restrict out, const S* __restrict x, const S* __restrict g, int64_t n,
                        compute_t<S> eps, compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<S>(math::fgsm<T>(static_cast<T>(x[i]), static_cast<T>(g[i]), eps, lo, hi));
}

// Philox words of kBlocks blocks of 16 counters each, from c_base (a multiple of 16):
// w[b][word][lane]. GCC vectorizes the 32x32->64-bit products of math::philox4x32_10 with AVX-512's
// slow 64-bit vpmullq; with AVX-512F present, the same rounds run on vpmuludq (even/odd lanes), 2.5x
// fewer instructions, and two blocks at once hide the rounds' latency chain. Bit-identical by
// construction and by tests/test_random_init.py.
constexpr int kBlocks = 2;
using Words = uint32_t[kBlocks][4][math::kLanes];

#if defined(RX_AVX512_CODE)
__attribute__((target("avx512f"))) void philox_blocks_avx512(uint64_t c_base, uint32_t k0, uint32_t k1, Words& w) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(math::kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(math::kPhiloxM1));
  const __m512i w0 = _mm512_set1_epi32(static_cast<int>(math::kPhiloxW0));
  const __m512i w1 = _mm512_set1_epi32(static_cast<int>(math::kPhiloxW1));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  constexpr __mmask16 odd = 0xAAAA;
  __m512i c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
  for (int b = 0; b < kBlocks; ++b) {
    const uint64_t base = c_base + static_cast<uint64_t>(b) * math::kLanes;
    c0[b] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base)), lanes);
    c1[b] = _mm512_set1_epi32(static_cast<int>(base >> 32));
    c2[b] = _mm512_setzero_si512();
    c3[b] = _mm512_setzero_si512();
  }
  __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
  for (int r = 0; r < math::kPhiloxRounds; ++r) {
    for (int b = 0; b < kBlocks; ++b) {
      const __m512i e0 = _mm512_mul_epu32(c0[b], m0), o0 = _mm512_mul_epu32(_mm512_srli_epi64(c0[b], 32), m0);
      const __m512i e1 = _mm512_mul_epu32(c2[b], m1), o1 = _mm512_mul_epu32(_mm512_srli_epi64(c2[b], 32), m1);
      const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(e0, 32), o0);
      const __m512i lo0 = _mm512_mask_blend_epi32(odd, e0, _mm512_slli_epi64(o0, 32));
      const __m512i hi1 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(e1, 32), o1);
      const __m512i lo1 = _mm512_mask_blend_epi32(odd, e1, _mm512_slli_epi64(o1, 32));
      c0[b] = _mm512_ternarylogic_epi32(hi1, c1[b], key0, 0x96);  // hi1 ^ c1 ^ k0
      c2[b] = _mm512_ternarylogic_epi32(hi0, c3[b], key1, 0x96);  // hi0 ^ c3 ^ k1
      c1[b] = lo1;
      c3[b] = lo0;
    }
    key0 = _mm512_add_epi32(key0, w0);
    key1 = _mm512_add_epi32(key1, w1);
  }
  for (int b = 0; b < kBlocks; ++b) {
    _mm512_storeu_si512(w[b][0], c0[b]);
    _mm512_storeu_si512(w[b][1], c1[b]);
    _mm512_storeu_si512(w[b][2], c2[b]);
    _mm512_storeu_si512(w[b][3], c3[b]);
  }
}
const bool kHasAvx512 = __builtin_cpu_supports("avx512f");
#else
constexpr bool kHasAvx512 = false;
void philox_blocks_avx512(uint64_t, uint32_t, uint32_t, Words&) {}
#endif

RX_CLONES void philox_blocks_generic(uint64_t c_base, uint32_t k0, uint32_t k1, Words& w) {
  for (int b = 0; b < kBlocks; ++b)
    for (int l = 0; l < math::kLanes; ++l) {
      const math::Philox4 r = math::philox4x32_10(c_base + b * math::kLanes + l, k0, k1);
      w[b][0][l] = r.w[0]; w[b][1][l] = r.w[1]; w[b][2][l] = r.w[2]; w[b][3][l] = r.w[3];
    }
}

// Elements [begin, end) of the logical index space, in runs of kBlocks aligned 64-element Philox blocks:
// each run's words are computed at once and stored for the run's elements inside [begin, end).
template <typename S>
RX_CLONES void random_init_row(S* __restrict out, const S* __restrict x, int64_t begin, int64_t end,
                               uint32_t k0, uint32_t k1, compute_t<S> eps, compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  constexpr int64_t kStep = kBlocks * math::kBlock;
  for (int64_t i = begin; i < end;) {
    const int64_t run = i / math::kBlock * math::kBlock;
    const int64_t stop = std::min(end, run + kStep);
    Words w;
    const uint64_t c_base = static_cast<uint64_t>(run / math::kBlock) * math::kLanes;
    if (kHasAvx512) {
      philox_blocks_avx512(c_base, k0, k1, w);
    } else {
      philox_blocks_generic(c_base, k0, k1, w);
    }
    // w[b][k][l] belongs to element run + 64 b + 16 k + l: w's memory order is the elements' order.
    const uint32_t* __restrict words = &w[0][0][0];
    for (int64_t j = i; j < stop; ++j)
      out[j] = static_cast<S>(math::random_init<T>(static_cast<T>(x[j]), words[j - run], eps, lo, hi));
    i = stop;
  }
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
