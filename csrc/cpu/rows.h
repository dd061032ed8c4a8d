// What the CPU kernels of the elementwise families share: per-sample budgets as a loop reads them, the
// split of a dense tensor over threads at sample boundaries, and the row loop's in-place form.
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>

#include "dense.h"

namespace robust_ext {
namespace cpu {

template <typename T>
struct BudgetReader {
  const T* per_sample;
  T value;
  explicit BudgetReader(const Budget& b)
      : per_sample(b.per_sample.defined() ? b.per_sample.data_ptr<T>() : nullptr),
        value(static_cast<T>(b.value)) {}
  T operator[](int64_t s) const { return per_sample ? per_sample[s] : value; }
};

// Elements per task: below this a second thread costs more than it saves.
constexpr int64_t kGrain = 32768;

// Splits [0, numel) over threads, then each thread's range at sample boundaries, so a row sees one
// alpha/eps: row(begin, end, sample). The split depends on the thread count; the result does not.
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

// out[i] = f(v_i, i) with v_i = xa[i]. In-place calls (out == x_adv) take their own loop: with a possible
// alias GCC only versions the loop and then runs the scalar version. Inputs may equal `out` exactly (never
// partly overlap it: checks.h), which keeps every element's reads before its write in vector code too.
// Inlined into each target_clones row of its caller, so it is vectorized for each ISA.
template <typename S, typename F>
C10_ALWAYS_INLINE void update_row(S* __restrict out, const S* xa, int64_t n, F f) {
  if (xa == out) {
    for (int64_t i = 0; i < n; ++i) out[i] = f(out[i], i);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = f(xa[i], i);
  }
}

}  // namespace cpu
}  // namespace robust_ext
