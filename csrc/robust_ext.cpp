// Every robust_ext schema, defined once. Kernels register per dispatch key in cpu/ and cuda/; the fake
// (meta) kernels for torch.compile live in robust_ext/ops.py.
#include <Python.h>

#include <string>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/clones.h"

namespace robust_ext {
namespace {

std::string cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2)";
  return "baseline";
#else
  return "compiler default";
#endif
}

std::string build_info() {
  std::string s = "robust_ext._C built against torch " ROBUST_EXT_TORCH_VERSION;
#ifdef _OPENMP
  s += "; CPU threads: OpenMP";
#else
  s += "; CPU threads: none (built without -fopenmp)";
#endif
#if defined(RX_ISA_ONLY)
  s += "; CPU loops: " RX_ISA_ONLY;
#else
  s += "; CPU loops: run-time ISA dispatch, selected " + cpu_isa();
#endif
#ifdef ROBUST_EXT_WITH_CUDA
  s += "; CUDA kernels: compiled";
#else
  s += "; CUDA kernels: not compiled";
#endif
  return s;
}

}  // namespace

TORCH_LIBRARY(robust_ext, m) {
  m.def("linf_step(Tensor x_adv, Tensor grad, Tensor x, float alpha, float eps, float clip_min, "
        "float clip_max, Tensor? alpha_t=None, Tensor? eps_t=None) -> Tensor");
  m.def("linf_step_(Tensor(a!) x_adv, Tensor grad, Tensor x, float alpha, float eps, float clip_min, "
        "float clip_max, Tensor? alpha_t=None, Tensor? eps_t=None) -> ()");
  m.def("linf_project(Tensor x_adv, Tensor x, float eps, float clip_min, float clip_max, "
        "Tensor? eps_t=None) -> Tensor");
  m.def("linf_project_(Tensor(a!) x_adv, Tensor x, float eps, float clip_min, float clip_max, "
        "Tensor? eps_t=None) -> ()");
  m.def("fgsm(Tensor x, Tensor grad, float eps, float clip_min, float clip_max, Tensor? eps_t=None) -> Tensor");
  m.def("linf_random_init(Tensor x, float eps, float clip_min, float clip_max, Tensor seed, "
        "Tensor? eps_t=None) -> Tensor");
  // The L2 ball (l2/l2_math.h): the same arguments as the L-inf ops; fgm is FGSM's L2 counterpart.
  m.def("l2_step(Tensor x_adv, Tensor grad, Tensor x, float alpha, float eps, float clip_min, "
        "float clip_max, Tensor? alpha_t=None, Tensor? eps_t=None) -> Tensor");
  m.def("l2_step_(Tensor(a!) x_adv, Tensor grad, Tensor x, float alpha, float eps, float clip_min, "
        "float clip_max, Tensor? alpha_t=None, Tensor? eps_t=None) -> ()");
  m.def("l2_project(Tensor x_adv, Tensor x, float eps, float clip_min, float clip_max, "
        "Tensor? eps_t=None) -> Tensor");
  m.def("l2_project_(Tensor(a!) x_adv, Tensor x, float eps, float clip_min, float clip_max, "
        "Tensor? eps_t=None) -> ()");
  m.def("fgm(Tensor x, Tensor grad, float eps, float clip_min, float clip_max, Tensor? eps_t=None) -> Tensor");
  m.def("l2_random_init(Tensor x, float eps, float clip_min, float clip_max, Tensor seed, "
        "Tensor? eps_t=None) -> Tensor");
  // APGD's update (Croce & Hein 2020) in each ball: the step from x_adv, then the momentum point
  // x_adv + momentum (z - x_adv) + (1 - momentum)(x_adv - x_prev) projected and clipped (ball_ops.h).
  m.def("linf_apgd_update(Tensor x_adv, Tensor x_prev, Tensor grad, Tensor x, float alpha, float eps, "
        "float momentum, float clip_min, float clip_max, Tensor? alpha_t=None, Tensor? eps_t=None) -> Tensor");
  m.def("linf_apgd_update_(Tensor(a!) x_adv, Tensor x_prev, Tensor grad, Tensor x, float alpha, float eps, "
        "float momentum, float clip_min, float clip_max, Tensor? alpha_t=None, Tensor? eps_t=None) -> ()");
  m.def("l2_apgd_update(Tensor x_adv, Tensor x_prev, Tensor grad, Tensor x, float alpha, float eps, "
        "float momentum, float clip_min, float clip_max, Tensor? alpha_t=None, Tensor? eps_t=None) -> Tensor");
  m.def("l2_apgd_update_(Tensor(a!) x_adv, Tensor x_prev, Tensor grad, Tensor x, float alpha, float eps, "
        "float momentum, float clip_min, float clip_max, Tensor? alpha_t=None, Tensor? eps_t=None) -> ()");
  // max_pool2d(relu(x), kernel 2, stride 2) and its backward (CPU; other devices use ATen's ops):
  // `code` holds, per output, the window tap that takes the gradient (0-3) or 4 for none; the backward's
  // result has x's layout, which the caller passes (a pooled map can be both NCHW and channels_last).
  m.def("relu_max_pool2d(Tensor x) -> (Tensor, Tensor)");
  m.def("relu_max_pool2d_backward(Tensor grad_out, Tensor code, SymInt in_h, SymInt in_w, bool channels_last) "
        "-> Tensor");
  // Inference-mode BatchNorm + ReLU: relu(batch_norm(x, running stats)) (CPU; other devices use ATen's
  // ops). The backward gives the input gradient from the output (the mask is out <= 0); weight and bias
  // gradients, when wanted, come from robust_ext/batchnorm.py in ATen ops.
  m.def("batch_norm_relu(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, "
        "float eps) -> Tensor");
  m.def("batch_norm_relu_backward(Tensor grad_out, Tensor out, Tensor? weight, Tensor running_var, float eps) "
        "-> Tensor");
  m.def("build_info() -> str", &build_info);
}

}  // namespace robust_ext

// Importing robust_ext._C runs the registrations above; the module itself has no functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
