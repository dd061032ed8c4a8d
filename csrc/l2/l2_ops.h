// The L2 ops' schema side (csrc/ball_ops.h has the bodies they share with L-inf): kernels get contiguous
// tensors, since every sample's norms sum its elements in logical order (other layouts cost a copy each
// way, and give the same bits). A backend's `K` supplies step, project, apgd_update, single_step (FGM) and
// random_init over `Rows`, the math and summation order from l2/l2_math.h.
#pragma once

#include <initializer_list>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "ball_ops.h"
#include "dense.h"

namespace robust_ext {

// Samples as the kernels see them: `count` runs of `numel` contiguous elements (a 0-d tensor is one
// sample of one element).
struct Rows {
  int64_t count;
  int64_t numel;
};

struct L2Layout {
  template <typename Kernel, typename... Ts>
  static void run(const at::Tensor& out, Kernel&& kernel, const Ts&... inputs) {
    run_contiguous(out, kernel, inputs...);
  }
  static Rows shape(const at::Tensor& out, std::initializer_list<const Budget*>) {
    if (out.dim() == 0) return Rows{1, 1};
    const int64_t n = out.size(0);
    return Rows{n, n == 0 ? 0 : out.numel() / n};
  }
};

template <class K>
void register_l2_ops(torch::Library& m) {
  register_ball_ops<K, L2Layout>(m, {"l2_step", "l2_step_", "l2_project", "l2_project_", "l2_apgd_update",
                                     "l2_apgd_update_", "fgm", "l2_random_init"});
}

}  // namespace robust_ext
