// The L-inf ops' schema side (csrc/ball_ops.h has the bodies they share with L2): kernels walk any
// dense layout with samples outermost (elementwise math needs no order), budgets per sample or one run.
// A backend's `K` supplies step, project, apgd_update, single_step (FGSM) and random_init over `Dense`
// memory, the math from linf/linf_math.h.
#pragma once

#include <initializer_list>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "ball_ops.h"
#include "dense.h"

namespace robust_ext {

struct LinfLayout {
  template <typename Kernel, typename... Ts>
  static void run(const at::Tensor& out, Kernel&& kernel, const Ts&... inputs) {
    run_dense(out, kernel, inputs...);
  }
  static Dense shape(const at::Tensor& out, std::initializer_list<const Budget*> budgets) {
    return dense_of(out, budgets);
  }
};

template <class K>
void register_linf_ops(torch::Library& m) {
  register_ball_ops<K, LinfLayout>(
      m, {"linf_step", "linf_step_", "linf_project", "linf_project_", "linf_apgd_update", "linf_apgd_update_", "fgsm",
          "linf_random_init"});
}

}  // namespace robust_ext
