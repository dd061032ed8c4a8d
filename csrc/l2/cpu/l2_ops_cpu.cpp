// The L2 ops' CPU kernels: per sample, one or two sums of squares in l2/l2_math.h's fixed order, then
// the write. Loops compiled per ISA (GCC target_clones) and vectorized: the 16 summation lanes are one
// AVX-512 or two AVX2 registers, with no reassociation.
//
// Threads: with enough samples each thread takes whole samples and runs a sample's passes back to back,
// so the second and third passes read what the first left in cache (from memory that is one sweep:
// the step reads grad, then x_adv and x, and writes). The step and APGD's update sum the next sample's
// gradient inside this sample's d pass (two independent add chains in one loop), and ask for the next
// sample's rows before the write pass, which reads only cached data. With few samples every pass is
// split over the chunks of all samples, the per-chunk partial sums kept in a buffer. Either way each
// chunk's partial sum is the same, so the result does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu/clones.h"
#include "cpu/philox_blocks.h"
#include "cpu/rows.h"
#include "cpu/words.h"
#include "l2/l2_math.h"
#include "l2/l2_ops.h"

namespace robust_ext {
namespace {

using math::kSumChunk;
using math::kSumLanes;

// The sum of term(i)^2 over one chunk's `len` elements, in the lanes of l2_math.h.
template <typename T, typename F>
C10_ALWAYS_INLINE T chunk_sum(int64_t len, F term) {
  T acc[kSumLanes] = {};
  // A counted loop: under Python's -fwrapv, `i + 16 <= len` has no known trip count and GCC vectorizes
  // the lanes with permutes (5x slower).
  const int64_t rows = len / kSumLanes, tail = len - rows * kSumLanes;
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < kSumLanes; ++j) {
      const T v = term(r * kSumLanes + j);
      acc[j] = acc[j] + v * v;
    }
  for (int j = 0; j < tail; ++j) {
    const T v = term(rows * kSumLanes + j);
    acc[j] = acc[j] + v * v;
  }
  return math::lane_tree(acc);
}

// Two chunks' sums in one loop: their lanes are independent chains, so the core overlaps them (one
// chunk's chain of adds is latency-bound on AVX2). Each sum has the order of chunk_sum.
template <typename T, typename F, typename G>
C10_ALWAYS_INLINE void chunk_sum2(int64_t len, F term, G term2, T& sum, T& sum2) {
  T acc[kSumLanes] = {}, acc2[kSumLanes] = {};
  const int64_t rows = len / kSumLanes, tail = len - rows * kSumLanes;
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < kSumLanes; ++j) {
      const T v = term(r * kSumLanes + j), w = term2(r * kSumLanes + j);
      acc[j] = acc[j] + v * v;
      acc2[j] = acc2[j] + w * w;
    }
  for (int j = 0; j < tail; ++j) {
    const T v = term(rows * kSumLanes + j), w = term2(rows * kSumLanes + j);
    acc[j] = acc[j] + v * v;
    acc2[j] = acc2[j] + w * w;
  }
  sum = math::lane_tree(acc);
  sum2 = math::lane_tree(acc2);
}

// part[c] for chunks [c0, c1) of a sample of n elements: term(i) is element i's value.
template <typename T, typename F>
C10_ALWAYS_INLINE void chunk_sums(int64_t n, int64_t c0, int64_t c1, T* part, F term) {
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t b = c * kSumChunk;
    part[c] = chunk_sum<T>(std::min(kSumChunk, n - b), [&](int64_t i) RX_INLINE_LAMBDA { return term(b + i); });
  }
}

// How a sample's gradient enters its sums and d, as l2_math.h's dir(g) with the sample's scale s: kClean,
// g as it is: the first pass sums g^2 unchecked, and a sum that is a number (no NaN entry) at scale 1 (no
// infinite entry) proves dir(g) = g; kNanToZero, nan_to_zero(g) (a NaN entry, scale 1); kScaled,
// l2_direction(g, s). The same bits each way; the loops are compute-bound on AVX2, and kClean is the
// common one with the fewest instructions.
enum class Dir { kClean, kNanToZero, kScaled };

template <Dir kDir, typename T>
C10_ALWAYS_INLINE T dir_of(T g, T s) {
  if constexpr (kDir == Dir::kClean) return g;
  else if constexpr (kDir == Dir::kNanToZero) return math::nan_to_zero(g);
  else return math::l2_direction(g, s);
}

// f(std::integral_constant<Dir, d>{}): a run-time Dir to the loop compiled for it.
template <typename F>
C10_ALWAYS_INLINE void with_dir(Dir d, F&& f) {
  switch (d) {
    case Dir::kClean: f(std::integral_constant<Dir, Dir::kClean>{}); break;
    case Dir::kNanToZero: f(std::integral_constant<Dir, Dir::kNanToZero>{}); break;
    default: f(std::integral_constant<Dir, Dir::kScaled>{});
  }
}

// The sums of dir(g)^2 (kClean: the first pass; the others run again in grad_coef).
template <typename S, Dir kDir>
RX_CLONES void grad_sums(const S* __restrict g, int64_t n, int64_t c0, int64_t c1, compute_t<S> s,
                         compute_t<S>* __restrict part) {
  using T = compute_t<S>;
  chunk_sums<T>(n, c0, c1, part, [&](int64_t i) RX_INLINE_LAMBDA { return dir_of<kDir>(widen(g[i]), s); });
}

template <typename S>
RX_CLONES compute_t<S> grad_max_abs(const S* __restrict g, int64_t n) {
  using T = compute_t<S>;
  T m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T v = math::abs_of(math::nan_to_zero(widen(g[i])));
    m = v > m ? v : m;
  }
  return m;
}

// d = (x_adv - x) + c * dir(g) (l2_math.h l2_delta) for a sample's Dir; without a gradient (kGrad false:
// projection) x_adv - x.
template <typename T, bool kGrad, Dir kDir>
C10_ALWAYS_INLINE T delta_of(T a, T g, T b, T c, T s) {
  if (!kGrad) return a - b;
  return (a - b) + c * dir_of<kDir>(g, s);
}

template <typename S, bool kGrad, Dir kDir, bool kKeep>
RX_CLONES void delta_sums(const S* __restrict xa, const S* __restrict g, const S* __restrict x, int64_t n,
                          int64_t c0, int64_t c1, compute_t<S> c, compute_t<S> s, compute_t<S>* __restrict part,
                          compute_t<S>* __restrict kept) {
  using T = compute_t<S>;
  chunk_sums<T>(n, c0, c1, part, [&](int64_t i) RX_INLINE_LAMBDA {
    const T d = delta_of<T, kGrad, kDir>(widen(xa[i]), kGrad ? widen(g[i]) : T(0), widen(x[i]), c, s);
    if (kKeep) kept[i] = d;
    return d;
  });
}

// delta_sums of a whole sample (kGrad) together with the first pass (grad_sums, kClean) of the next one, gn:
// the next sample's gradient, its partials into part_next. Same sums as the two passes run apart.
template <typename S, Dir kDir, bool kKeep>
RX_CLONES void delta_sums_with_next(const S* __restrict xa, const S* __restrict g, const S* __restrict x, int64_t n,
                                   compute_t<S> c, compute_t<S> s, compute_t<S>* __restrict part,
                                   compute_t<S>* __restrict kept, const S* __restrict gn,
                                   compute_t<S>* __restrict part_next) {
  using T = compute_t<S>;
  for (int64_t k = 0, P = math::sum_chunks(n); k < P; ++k) {
    const int64_t b = k * kSumChunk;
    chunk_sum2<T>(
        std::min(kSumChunk, n - b),
        [&](int64_t i) RX_INLINE_LAMBDA {
          const T d = delta_of<T, true, kDir>(widen(xa[b + i]), widen(g[b + i]), widen(x[b + i]), c, s);
          if (kKeep) kept[b + i] = d;
          return d;
        },
        [&](int64_t i) RX_INLINE_LAMBDA { return widen(gn[b + i]); }, part[k], part_next[k]);
  }
}

template <typename S, bool kGrad, Dir kDir>
RX_CLONES void delta_write(S* __restrict out, const S* xa, const S* __restrict g, const S* __restrict x, int64_t n,
                           compute_t<S> c, compute_t<S> s, compute_t<S> f, compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  cpu::update_row(out, xa, n, [&](S v, int64_t i) RX_INLINE_LAMBDA {
    const T b = widen(x[i]);
    const T d = delta_of<T, kGrad, kDir>(widen(v), kGrad ? widen(g[i]) : T(0), b, c, s);
    return narrow_round<S>(math::l2_out(b, d, f, lo, hi));
  });
}

// delta_sums / delta_write for a sample's Dir dir (the projection has none: kGrad false). With `kept`
// (the whole sample on one thread), d is stored for the write, which then reads x and d only.
template <typename S, bool kGrad>
void sample_delta_sums(const S* xa, const S* g, const S* x, int64_t n, int64_t c0, int64_t c1, compute_t<S> c,
                       compute_t<S> s, Dir dir, compute_t<S>* part, compute_t<S>* kept) {
  with_dir(kGrad ? dir : Dir::kClean, [&](auto d) {
    if (kept) delta_sums<S, kGrad, decltype(d)::value, true>(xa, g, x, n, c0, c1, c, s, part, kept);
    else delta_sums<S, kGrad, decltype(d)::value, false>(xa, g, x, n, c0, c1, c, s, part, nullptr);
  });
}

// sample_delta_sums of the step (whole sample) with the next sample's first pass: see delta_sums_with_next.
template <typename S>
void sample_delta_sums_with_next(const S* xa, const S* g, const S* x, int64_t n, compute_t<S> c, compute_t<S> s,
                                 Dir dir, compute_t<S>* part, compute_t<S>* kept, const S* gn,
                                 compute_t<S>* part_next) {
  with_dir(dir, [&](auto d) {
    delta_sums_with_next<S, decltype(d)::value, true>(xa, g, x, n, c, s, part, kept, gn, part_next);
  });
}

template <typename S, bool kGrad>
void sample_delta_write(S* out, const S* xa, const S* g, const S* x, int64_t n, compute_t<S> c, compute_t<S> s,
                        Dir dir, compute_t<S> f, compute_t<S> lo, compute_t<S> hi) {
  with_dir(kGrad ? dir : Dir::kClean,
           [&](auto d) { delta_write<S, kGrad, decltype(d)::value>(out, xa, g, x, n, c, s, f, lo, hi); });
}

// APGD's update after the step's two passes: d2 = v - x for the momentum point v of z, the step's result
// rounded to the storage type (l2_math.h l2_apgd_delta). With `kept` (kKept) the step's d is read from there
// and d2 stored over it; otherwise d is computed again. x_prev may be x_adv itself or, in place, out: every
// element is read before it is written.
template <typename S>
C10_ALWAYS_INLINE compute_t<S> momentum_delta(compute_t<S> a, compute_t<S> p, compute_t<S> d, compute_t<S> b,
                                              compute_t<S> f1, compute_t<S> m, compute_t<S> m1, compute_t<S> lo,
                                              compute_t<S> hi) {
  const compute_t<S> z = widen(narrow_round<S>(math::l2_out(b, d, f1, lo, hi)));
  return math::l2_apgd_delta(z, a, p, b, m, m1);
}

template <typename S, Dir kDir, bool kKept>
RX_CLONES void momentum_sums(const S* __restrict xa, const S* __restrict xp, const S* __restrict g,
                             const S* __restrict x, int64_t n, int64_t c0, int64_t c1, compute_t<S> c, compute_t<S> s,
                             compute_t<S> f1, compute_t<S> m, compute_t<S> m1, compute_t<S> lo, compute_t<S> hi,
                             compute_t<S>* __restrict part, compute_t<S>* __restrict kept) {
  using T = compute_t<S>;
  chunk_sums<T>(n, c0, c1, part, [&](int64_t i) RX_INLINE_LAMBDA {
    const T a = widen(xa[i]), b = widen(x[i]);
    const T d = kKept ? kept[i] : delta_of<T, true, kDir>(a, widen(g[i]), b, c, s);
    const T d2 = momentum_delta<S>(a, widen(xp[i]), d, b, f1, m, m1, lo, hi);
    if (kKept) kept[i] = d2;
    return d2;
  });
}

template <typename S, Dir kDir>
RX_CLONES void momentum_write(S* __restrict out, const S* xa, const S* xp, const S* __restrict g, const S* __restrict x,
                              int64_t n, compute_t<S> c, compute_t<S> s, compute_t<S> f1, compute_t<S> m,
                              compute_t<S> m1, compute_t<S> f2, compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  cpu::update_row(out, xa, n, [&](S v, int64_t i) RX_INLINE_LAMBDA {
    const T a = widen(v), b = widen(x[i]);
    const T d = delta_of<T, true, kDir>(a, widen(g[i]), b, c, s);
    return narrow_round<S>(math::l2_out(b, momentum_delta<S>(a, widen(xp[i]), d, b, f1, m, m1, lo, hi), f2,
                                        lo, hi));
  });
}

// The normal deviates of logical elements [begin, end) into z, from aligned Philox runs.
template <typename T>
RX_CLONES void gaussians(int64_t begin, int64_t end, uint32_t k0, uint32_t k1, T* __restrict z) {
  const auto words_run = [&](int64_t i, int64_t stop, int64_t run, const cpu::PhiloxWords& w) RX_INLINE_LAMBDA {
    T buf[cpu::kPhiloxBlocks * math::kBlock];  // element run + 64 b + 16 k + l, as w
    for (int b = 0; b < cpu::kPhiloxBlocks; ++b)
      for (int p = 0; p < 4; p += 2)
        for (int l = 0; l < math::kLanes; ++l)
          math::box_muller<T>(w[b][p][l], w[b][p + 1][l], buf[b * math::kBlock + p * math::kLanes + l],
                              buf[b * math::kBlock + (p + 1) * math::kLanes + l]);
    for (int64_t j = i; j < stop; ++j) z[j - begin] = buf[j - run];
  };
  cpu::for_philox_runs(begin, end, k0, k1, words_run);
}

// A chunk's deviates.
template <typename T>
struct ChunkGaussians {
  T z[kSumChunk];
};

// out = clip(x + v * k): the init's write (v = z) and the step's from its kept d (k = f).
template <typename S>
RX_CLONES void scaled_write(S* __restrict out, const S* __restrict x, const compute_t<S>* __restrict v, int64_t n,
                            compute_t<S> k, compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  for (int64_t i = 0; i < n; ++i) out[i] = narrow_round<S>(math::l2_out(widen(x[i]), v[i], k, lo, hi));
}

// The gradient's coefficient num / ||dir(g)|| of one sample (n elements at g), its scale s into `scale`
// and its Dir into `dir`: the partials of the first pass (g^2 unchecked) are in part[0, P); the rare
// passes for a NaN entry and for a rescaled gradient run here.
template <typename S>
compute_t<S> grad_coef(const S* g, int64_t n, compute_t<S>* part, compute_t<S> num, compute_t<S>& scale, Dir& dir) {
  using T = compute_t<S>;
  const int64_t P = math::sum_chunks(n);
  T sumsq = math::chunk_tree(part, P);
  dir = Dir::kClean;
  if (sumsq != sumsq) {  // a NaN entry (an infinite one alone sums to inf)
    dir = Dir::kNanToZero;
    grad_sums<S, Dir::kNanToZero>(g, n, 0, P, T(1), part);
    sumsq = math::chunk_tree(part, P);
  }
  scale = T(1);
  if (math::l2_needs_rescale(sumsq)) {
    scale = math::l2_rescale(grad_max_abs<S>(g, n));
    if (scale != T(1)) {
      dir = Dir::kScaled;
      grad_sums<S, Dir::kScaled>(g, n, 0, P, scale, part);
      sumsq = math::chunk_tree(part, P);
    }
  }
  return math::l2_coef(num, sumsq);
}

// Asks for rows [p, p + n) of each pointer into the L2 cache (the write pass that follows reads only
// cached rows, so memory would sit idle).
template <typename S, typename... P>
C10_ALWAYS_INLINE void prefetch_rows(int64_t n, P... ptrs) {
  constexpr int64_t kLine = 64 / sizeof(S);
  for (int64_t i = 0; i < n; i += kLine) (__builtin_prefetch(ptrs + i, 0, 2), ...);
}

// Where a sample's kept values start in `buf` (n + kKeptSlack values): 2 KiB from the sample's row `row`
// modulo 4 KiB, so that the stores into it never look like the row's loads to the core's 4 KiB
// store-to-load check (rows 12 KiB apart, e.g. 3x32x32 fp32, lost a quarter of the time to it).
template <typename T>
constexpr int64_t kKeptSlack = 4096 / sizeof(T);

template <typename T>
T* kept_at(std::vector<T>& buf, const void* row) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(buf.data());
  const uintptr_t want = reinterpret_cast<uintptr_t>(row) + 2048;
  return buf.data() + (((want - base) & 4095) & ~uintptr_t(63)) / sizeof(T);
}

// What an overlapped job's pass 1 of sample s reads beyond the gradient summed before it: x_adv, x and
// the next sample's gradient (APGD's pass 2 reads x_prev too, from the cache by then).
template <typename S>
void prefetch_overlapped(const S* xa, const S* x, const S* g, int64_t n, int64_t s, int64_t count) {
  if (s + 1 < count) prefetch_rows<S>(n, xa + s * n, x + s * n, g + (s + 1) * n);
  else prefetch_rows<S>(n, xa + s * n, x + s * n);
}

// Runs a row job: kPasses sums of squares (job.sums(pass, sample, c0, c1, part, kept) fills part[c0, c1)
// of the sample's partials, job.finish(pass, sample, part) reads them), then job.write(sample, begin,
// end, kept). `kept` is a buffer of the sample's n values when one thread runs the whole sample (else
// null): a job may keep what its last pass computed there for the write. A job with kOverlap (its pass 0
// is the gradient's sums) runs a thread's next sample's pass 0 inside this sample's pass 1
// (job.sums_with_next(sample, part, kept, next_part)): the same sums, their add chains overlapped.
template <class Job>
void run_rows(Job& job, const Rows& rows) {
  using T = typename Job::T;
  const int64_t N = rows.count, n = rows.numel, P = math::sum_chunks(n);
  std::vector<T> part(static_cast<size_t>(N * P));
  if (N >= 2 * at::get_num_threads() || N * n <= cpu::kGrain) {
    at::parallel_for(0, N, std::max<int64_t>(1, cpu::kGrain / std::max<int64_t>(1, n)), [&](int64_t b, int64_t e) {
      thread_local std::vector<T> kept_buf;  // reused across calls: no page faults per step
      if (static_cast<int64_t>(kept_buf.size()) < n + kKeptSlack<T>) kept_buf.resize(n + kKeptSlack<T>);
      for (int64_t s = b; s < e; ++s) {
        T* ps = part.data() + s * P;
        T* kept = kept_at(kept_buf, job.row(s));
        for (int p = 0; p < Job::kPasses; ++p) {
          if constexpr (Job::kOverlap) {
            if (p == 0 && s > b) {  // summed with the previous sample's pass 1
              job.finish(p, s, ps);
              continue;
            }
            if (p == 1 && s + 1 < e) {
              job.sums_with_next(s, ps, kept, ps + P);
              job.finish(p, s, ps);
              continue;
            }
          }
          job.sums(p, s, 0, P, ps, kept);
          job.finish(p, s, ps);
        }
        if constexpr (Job::kOverlap) {
          if (s + 1 < e) job.prefetch_next(s + 1);
        }
        job.write(s, 0, n, kept);
      }
    });
    return;
  }
  // Chunks of every sample, split over threads: f(sample, c0, c1).
  const auto for_chunks = [&](auto&& f) {
    at::parallel_for(0, N * P, std::max<int64_t>(1, cpu::kGrain / kSumChunk), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e;) {
        const int64_t s = i / P, c0 = i % P, c1 = std::min(P, c0 + (e - i));
        f(s, c0, c1);
        i += c1 - c0;
      }
    });
  };
  for (int p = 0; p < Job::kPasses; ++p) {
    for_chunks([&](int64_t s, int64_t c0, int64_t c1) { job.sums(p, s, c0, c1, part.data() + s * P, nullptr); });
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s) job.finish(p, s, part.data() + s * P);
    });
  }
  for_chunks([&](int64_t s, int64_t c0, int64_t c1) {
    job.write(s, c0 * kSumChunk, std::min(n, c1 * kSumChunk), nullptr);
  });
}

// Per-sample state shared by the jobs: the gradient's scale and coefficient, the projection factor.
template <typename S>
struct RowState {
  using T = compute_t<S>;
  std::vector<T> scale, coef, factor;
  std::vector<Dir> dir;
  explicit RowState(int64_t N) : scale(N, T(1)), coef(N, T(0)), factor(N, T(1)), dir(N, Dir::kClean) {}
  int64_t count() const { return static_cast<int64_t>(coef.size()); }
};

// step (kGrad) and project: [gradient sums,] d's sums, write.
template <typename S, bool kGrad>
struct DeltaJob : RowState<S> {
  using T = compute_t<S>;
  static constexpr int kPasses = kGrad ? 2 : 1;
  static constexpr bool kOverlap = kGrad;
  S* out;
  const S *xa, *g, *x;
  int64_t n;
  cpu::BudgetReader<T> alpha, eps;
  T lo, hi;
  DeltaJob(const Rows& r, S* out, const S* xa, const S* g, const S* x, const Budget& alpha, const Budget& eps,
           double lo, double hi)
      : RowState<S>(r.count), out(out), xa(xa), g(g), x(x), n(r.numel), alpha(alpha), eps(eps), lo(lo), hi(hi) {}
  const void* row(int64_t s) const { return x + s * n; }

  void sums(int p, int64_t s, int64_t c0, int64_t c1, T* part, T* kept) const {
    const int64_t o = s * n;
    if (kGrad && p == 0) {
      grad_sums<S, Dir::kClean>(g + o, n, c0, c1, T(1), part);
    } else {
      sample_delta_sums<S, kGrad>(xa + o, kGrad ? g + o : nullptr, x + o, n, c0, c1, this->coef[s], this->scale[s],
                                  this->dir[s], part, kept);
    }
  }
  void sums_with_next(int64_t s, T* part, T* kept, T* part_next) const {
    const int64_t o = s * n;
    sample_delta_sums_with_next<S>(xa + o, g + o, x + o, n, this->coef[s], this->scale[s], this->dir[s], part, kept,
                                   g + o + n, part_next);
  }
  // What sums_with_next(s) reads beyond its own sample's gradient (summed before).
  void prefetch_next(int64_t s) const { prefetch_overlapped<S>(xa, x, g, n, s, this->count()); }
  void finish(int p, int64_t s, T* part) {
    if (kGrad && p == 0) {
      this->coef[s] = grad_coef<S>(g + s * n, n, part, alpha[s], this->scale[s], this->dir[s]);
    } else {
      this->factor[s] = math::l2_factor(eps[s], math::chunk_tree(part, math::sum_chunks(n)));
    }
  }
  void write(int64_t s, int64_t b, int64_t e, const T* kept) const {
    const int64_t o = s * n + b;
    if (kept) {
      scaled_write<S>(out + o, x + o, kept + b, e - b, this->factor[s], lo, hi);
      return;
    }
    sample_delta_write<S, kGrad>(out + o, xa + o, kGrad ? g + o : nullptr, x + o, e - b, this->coef[s],
                                 this->scale[s], this->dir[s], this->factor[s], lo, hi);
  }
};

// APGD's update: the step's passes (gradient sums, d's sums: its factor f1), then the sums of the momentum
// point's d2 (its factor), the write. momentum == 1 never comes here (ball_ops.h runs the step).
template <typename S>
struct ApgdJob : RowState<S> {
  using T = compute_t<S>;
  static constexpr int kPasses = 3;
  static constexpr bool kOverlap = true;
  S* out;
  const S *xa, *xp, *g, *x;
  int64_t n;
  cpu::BudgetReader<T> alpha, eps;
  T m, m1, lo, hi;
  std::vector<T> step_factor;
  ApgdJob(const Rows& r, S* out, const S* xa, const S* xp, const S* g, const S* x, const Budget& alpha,
          const Budget& eps, double momentum, double lo, double hi)
      : RowState<S>(r.count), out(out), xa(xa), xp(xp), g(g), x(x), n(r.numel), alpha(alpha), eps(eps),
        m(static_cast<T>(momentum)), m1(static_cast<T>(1.0 - momentum)), lo(lo), hi(hi), step_factor(r.count, T(1)) {}
  const void* row(int64_t s) const { return x + s * n; }

  void sums(int p, int64_t s, int64_t c0, int64_t c1, T* part, T* kept) const {
    const int64_t o = s * n;
    if (p == 0) {
      grad_sums<S, Dir::kClean>(g + o, n, c0, c1, T(1), part);
    } else if (p == 1) {
      sample_delta_sums<S, true>(xa + o, g + o, x + o, n, c0, c1, this->coef[s], this->scale[s], this->dir[s], part,
                                 kept);
    } else {
      const T c = this->coef[s], sc = this->scale[s], f1 = step_factor[s];
      if (kept) {  // d is in kept (pass 1 stored it), so the gradient plays no part
        momentum_sums<S, Dir::kClean, true>(xa + o, xp + o, g + o, x + o, n, c0, c1, c, sc, f1, m, m1, lo, hi, part,
                                            kept);
        return;
      }
      with_dir(this->dir[s], [&](auto d) {
        momentum_sums<S, decltype(d)::value, false>(xa + o, xp + o, g + o, x + o, n, c0, c1, c, sc, f1, m, m1, lo,
                                                    hi, part, nullptr);
      });
    }
  }
  void sums_with_next(int64_t s, T* part, T* kept, T* part_next) const {
    const int64_t o = s * n;
    sample_delta_sums_with_next<S>(xa + o, g + o, x + o, n, this->coef[s], this->scale[s], this->dir[s], part, kept,
                                   g + o + n, part_next);
  }
  void prefetch_next(int64_t s) const { prefetch_overlapped<S>(xa, x, g, n, s, this->count()); }
  void finish(int p, int64_t s, T* part) {
    if (p == 0) {
      this->coef[s] = grad_coef<S>(g + s * n, n, part, alpha[s], this->scale[s], this->dir[s]);
      return;
    }
    (p == 1 ? step_factor : this->factor)[s] = math::l2_factor(eps[s], math::chunk_tree(part, math::sum_chunks(n)));
  }
  void write(int64_t s, int64_t b, int64_t e, const T* kept) const {
    const int64_t o = s * n + b;
    if (kept) {
      scaled_write<S>(out + o, x + o, kept + b, e - b, this->factor[s], lo, hi);
      return;
    }
    const T c = this->coef[s], sc = this->scale[s], f1 = step_factor[s], f2 = this->factor[s];
    with_dir(this->dir[s], [&](auto d) {
      momentum_write<S, decltype(d)::value>(out + o, xa + o, xp + o, g + o, x + o, e - b, c, sc, f1, m, m1, f2, lo, hi);
    });
  }
};

// FGM: gradient sums, then x + eps * dir(g) / ||dir(g)|| as a step from x_adv = x with no projection.
template <typename S>
struct FgmJob : RowState<S> {
  using T = compute_t<S>;
  static constexpr int kPasses = 1;
  static constexpr bool kOverlap = false;
  S* out;
  const S *x, *g;
  int64_t n;
  cpu::BudgetReader<T> eps;
  T lo, hi;
  FgmJob(const Rows& r, S* out, const S* x, const S* g, const Budget& eps, double lo, double hi)
      : RowState<S>(r.count), out(out), x(x), g(g), n(r.numel), eps(eps), lo(lo), hi(hi) {}
  const void* row(int64_t s) const { return x + s * n; }

  void sums(int, int64_t s, int64_t c0, int64_t c1, T* part, T*) const {
    grad_sums<S, Dir::kClean>(g + s * n, n, c0, c1, T(1), part);
  }
  void finish(int, int64_t s, T* part) {
    this->coef[s] = grad_coef<S>(g + s * n, n, part, eps[s], this->scale[s], this->dir[s]);
  }
  void write(int64_t s, int64_t b, int64_t e, const T*) const {
    const int64_t o = s * n + b;
    sample_delta_write<S, true>(out + o, x + o, g + o, x + o, e - b, this->coef[s], this->scale[s], this->dir[s], T(1),
                                lo, hi);
  }
};

template <typename S>
struct InitJob : RowState<S> {
  using T = compute_t<S>;
  static constexpr int kPasses = 1;
  static constexpr bool kOverlap = false;
  S* out;
  const S* x;
  int64_t n;
  cpu::BudgetReader<T> eps;
  T lo, hi;
  uint32_t k0, k1;
  InitJob(const Rows& r, S* out, const S* x, const Budget& eps, double lo, double hi, uint64_t key)
      : RowState<S>(r.count), out(out), x(x), n(r.numel), eps(eps), lo(lo), hi(hi),
        k0(static_cast<uint32_t>(key)), k1(static_cast<uint32_t>(key >> 32)) {}
  const void* row(int64_t s) const { return x + s * n; }

  // With `kept` the deviates of the whole sample stay there for the write (else it draws them again).
  void sums(int, int64_t s, int64_t c0, int64_t c1, T* part, T* kept) const {
    ChunkGaussians<T> z;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * kSumChunk, e = std::min(n, b + kSumChunk);
      T* zc = kept ? kept + b : z.z;
      gaussians<T>(s * n + b, s * n + e, k0, k1, zc);
      part[c] = chunk_sum<T>(e - b, [&](int64_t i) RX_INLINE_LAMBDA { return zc[i]; });
    }
  }
  void finish(int, int64_t s, T* part) {
    const T radius = math::l2_radius<T>(s, n, k0, k1, eps[s]);
    this->coef[s] = math::l2_coef(radius, math::chunk_tree(part, math::sum_chunks(n)));
  }
  void write(int64_t s, int64_t b, int64_t e, const T* kept) const {
    if (kept) {
      scaled_write<S>(out + s * n + b, x + s * n + b, kept + b, e - b, this->coef[s], lo, hi);
      return;
    }
    ChunkGaussians<T> z;
    for (int64_t i = b; i < e; i += kSumChunk) {
      const int64_t stop = std::min(e, i + kSumChunk);
      gaussians<T>(s * n + i, s * n + stop, k0, k1, z.z);
      scaled_write<S>(out + s * n + i, x + s * n + i, z.z, stop - i, this->coef[s], lo, hi);
    }
  }
};

template <typename S>
typename Word<S>::type* ptr(const at::Tensor& t) {
  return static_cast<typename Word<S>::type*>(t.data_ptr());
}

struct CpuKernels {
  static void step(const at::Tensor& out, const at::Tensor& xa, const at::Tensor& g, const at::Tensor& x,
                   const Budget& alpha, const Budget& eps, double lo, double hi, const Rows& r) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "l2_step", [&] {
      using W = typename Word<scalar_t>::type;
      DeltaJob<W, true> job(r, ptr<scalar_t>(out), ptr<scalar_t>(xa), ptr<scalar_t>(g), ptr<scalar_t>(x), alpha, eps,
                            lo, hi);
      run_rows(job, r);
    });
  }

  static void project(const at::Tensor& out, const at::Tensor& xa, const at::Tensor& x, const Budget& eps,
                      double lo, double hi, const Rows& r) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "l2_project", [&] {
      using W = typename Word<scalar_t>::type;
      DeltaJob<W, false> job(r, ptr<scalar_t>(out), ptr<scalar_t>(xa), nullptr, ptr<scalar_t>(x), Budget{}, eps, lo,
                             hi);
      run_rows(job, r);
    });
  }

  static void apgd_update(const at::Tensor& out, const at::Tensor& xa, const at::Tensor& xp, const at::Tensor& g,
                          const at::Tensor& x, const Budget& alpha, const Budget& eps, double momentum, double lo,
                          double hi, const Rows& r) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "l2_apgd_update", [&] {
      ApgdJob<typename Word<scalar_t>::type> job(r, ptr<scalar_t>(out), ptr<scalar_t>(xa), ptr<scalar_t>(xp),
                                                 ptr<scalar_t>(g), ptr<scalar_t>(x), alpha, eps, momentum, lo, hi);
      run_rows(job, r);
    });
  }

  static void single_step(const at::Tensor& out, const at::Tensor& x, const at::Tensor& g, const Budget& eps,
                          double lo, double hi, const Rows& r) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "fgm", [&] {
      FgmJob<typename Word<scalar_t>::type> job(r, ptr<scalar_t>(out), ptr<scalar_t>(x), ptr<scalar_t>(g), eps, lo, hi);
      run_rows(job, r);
    });
  }

  static void random_init(const at::Tensor& out, const at::Tensor& x, const Budget& eps, double lo, double hi,
                          const at::Tensor& seed, const Rows& r) {
    const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
    RX_DISPATCH_FLOATS(out.scalar_type(), "l2_random_init", [&] {
      InitJob<typename Word<scalar_t>::type> job(r, ptr<scalar_t>(out), ptr<scalar_t>(x), eps, lo, hi, key);
      run_rows(job, r);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(robust_ext, CPU, m) {
  register_l2_ops<CpuKernels>(m);
}

}  // namespace robust_ext
