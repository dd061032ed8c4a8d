// The L-inf ops' CUDA kernels: the elementwise launch of cuda/launch.cuh, and the Philox random init.
// The math is linf/linf_math.h's.
#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "linf/linf_math.h"
#include "linf/linf_ops.h"

namespace robust_ext {
namespace {

using cuda::DeviceBudget;
using cuda::device_budget;
using cuda::grid_for;
using cuda::kThreads;
using cuda::launch;

// Each thread computes one Philox counter and writes its 4 words to the 4 elements that use them
// (coalesced: neighbouring threads write neighbouring elements).
template <typename S>
__global__ void random_init_kernel(S* __restrict__ out, const S* __restrict__ x, int64_t n, int64_t inner,
                                   const int64_t* seed_ptr, uint64_t seed_value, DeviceBudget<compute_t<S>> eps,
                                   compute_t<S> lo, compute_t<S> hi) {
  using T = compute_t<S>;
  const uint64_t key = seed_ptr ? static_cast<uint64_t>(*seed_ptr) : seed_value;
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  const int64_t counters = (n + math::kBlock - 1) / math::kBlock * math::kLanes;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < counters; c += stride) {
    const math::Philox4 r = math::philox4x32_10(static_cast<uint64_t>(c), k0, k1);
    const int64_t base = (c / math::kLanes) * math::kBlock + c % math::kLanes;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int64_t i = base + w * math::kLanes;
      if (i < n) out[i] = static_cast<S>(math::random_init<T>(static_cast<T>(x[i]), r.w[w], eps[i / inner], lo, hi));
    }
  }
}

struct CudaKernels {
  static void step(const at::Tensor& out, const at::Tensor& xa, const at::Tensor& g, const at::Tensor& x,
                   const Budget& alpha, const Budget& eps, double lo, double hi, const Dense& d) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "linf_step", [&] {
      using T = compute_t<scalar_t>;
      const auto a = device_budget<T>(alpha), e = device_budget<T>(eps);
      const T l = lo, h = hi;
      launch<scalar_t, 3>(out, {&xa, &g, &x}, d, [=] __device__(const T (&v)[3], int64_t s) {
        return math::linf_step<T>(v[0], v[1], v[2], a[s], e[s], l, h);
      });
    });
  }

  static void project(const at::Tensor& out, const at::Tensor& xa, const at::Tensor& x, const Budget& eps,
                      double lo, double hi, const Dense& d) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "linf_project", [&] {
      using T = compute_t<scalar_t>;
      const auto e = device_budget<T>(eps);
      const T l = lo, h = hi;
      launch<scalar_t, 2>(out, {&xa, &x}, d, [=] __device__(const T (&v)[2], int64_t s) {
        return math::linf_project<T>(v[0], v[1], e[s], l, h);
      });
    });
  }

  static void apgd_update(const at::Tensor& out, const at::Tensor& xa, const at::Tensor& xp, const at::Tensor& g,
                          const at::Tensor& x, const Budget& alpha, const Budget& eps, double momentum, double lo,
                          double hi, const Dense& d) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "linf_apgd_update", [&] {
      using T = compute_t<scalar_t>;
      const auto a = device_budget<T>(alpha), e = device_budget<T>(eps);
      const T m = static_cast<T>(momentum), m1 = static_cast<T>(1.0 - momentum), l = lo, h = hi;
      launch<scalar_t, 4>(out, {&xa, &xp, &g, &x}, d, [=] __device__(const T (&v)[4], int64_t s) {
        return math::linf_apgd_update<scalar_t, T>(v[0], v[1], v[2], v[3], a[s], e[s], m, m1, l, h);
      });
    });
  }

  static void single_step(const at::Tensor& out, const at::Tensor& x, const at::Tensor& g, const Budget& eps,
                          double lo, double hi, const Dense& d) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "fgsm", [&] {
      using T = compute_t<scalar_t>;
      const auto e = device_budget<T>(eps);
      const T l = lo, h = hi;
      launch<scalar_t, 2>(out, {&x, &g}, d, [=] __device__(const T (&v)[2], int64_t s) {
        return math::fgsm<T>(v[0], v[1], e[s], l, h);
      });
    });
  }

  static void random_init(const at::Tensor& out, const at::Tensor& x, const Budget& eps, double lo, double hi,
                          const at::Tensor& seed, const Dense& d) {
    c10::cuda::CUDAGuard guard(out.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const bool on_device = seed.is_cuda();
    const int64_t* seed_ptr = on_device ? seed.data_ptr<int64_t>() : nullptr;
    const uint64_t seed_value = on_device ? 0 : static_cast<uint64_t>(seed.item<int64_t>());
    const int64_t counters = (d.numel + math::kBlock - 1) / math::kBlock * math::kLanes;
    RX_DISPATCH_FLOATS(out.scalar_type(), "linf_random_init", [&] {
      using T = compute_t<scalar_t>;
      random_init_kernel<scalar_t><<<grid_for(counters, out.get_device()), kThreads, 0, stream>>>(
          out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), d.numel, d.inner, seed_ptr, seed_value,
          device_budget<T>(eps), static_cast<T>(lo), static_cast<T>(hi));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(robust_ext, CUDA, m) {
  register_linf_ops<CudaKernels>(m);
}

}  // namespace robust_ext
