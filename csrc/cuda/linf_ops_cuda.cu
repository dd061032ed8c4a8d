// CUDA kernels: grid-stride loops over dense memory, 16-byte vector loads and stores when every
// pointer allows them, 64-bit indices, the current stream and device. The math is linf_math.h's.
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

#include "../linf_math.h"
#include "../linf_ops.h"

namespace robust_ext {
namespace {

constexpr int kThreads = 256;

template <typename S, int N>
struct alignas(sizeof(S) * N) Pack {
  S v[N];
};

template <typename T>
struct DeviceBudget {
  const T* per_sample;
  T value;
  __device__ __forceinline__ T operator[](int64_t s) const { return per_sample ? per_sample[s] : value; }
};

template <typename T>
DeviceBudget<T> device_budget(const Budget& b) {
  return {b.per_sample.defined() ? b.per_sample.data_ptr<T>() : nullptr, static_cast<T>(b.value)};
}

// Enough blocks for `work` threads, capped at 8 blocks (2048 threads) per SM: the loops stride over the
// rest. cudaDeviceGetAttribute is a cheap lookup, so there is no cache to share between host threads.
int grid_for(int64_t work, c10::DeviceIndex device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, cap)));
}

// out[i] = f({in_0[i], ..., in_{K-1}[i]}, sample(i)) for i in [0, n), N elements per thread step.
template <typename S, int N, int K, typename F>
__global__ void elementwise_kernel(S* out, const S* in0, const S* in1, const S* in2, int64_t n, int64_t inner,
                                   F f) {
  using T = compute_t<S>;
  const S* in[3] = {in0, in1, in2};
  const int64_t packs = n / N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const int64_t i0 = p * N;
    T v[K][N];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const Pack<S, N> pk = reinterpret_cast<const Pack<S, N>*>(in[k])[p];
#pragma unroll
      for (int j = 0; j < N; ++j) v[k][j] = static_cast<T>(pk.v[j]);
    }
    const int64_t s0 = i0 / inner, next = (s0 + 1) * inner;
    Pack<S, N> o;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int64_t s = (i0 + j < next) ? s0 : (i0 + j) / inner;
      T a[K];
#pragma unroll
      for (int k = 0; k < K; ++k) a[k] = v[k][j];
      o.v[j] = static_cast<S>(f(a, s));
    }
    reinterpret_cast<Pack<S, N>*>(out)[p] = o;
  }
  // The n % N elements after the last whole pack.
  const int64_t i = packs * N + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    T a[K];
#pragma unroll
    for (int k = 0; k < K; ++k) a[k] = static_cast<T>(in[k][i]);
    out[i] = static_cast<S>(f(a, i / inner));
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename S, int K, typename F>
void launch(const at::Tensor& out, std::array<const at::Tensor*, K> in, const Dense& d, F f) {
  c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const S* p[3] = {nullptr, nullptr, nullptr};
  bool vec = aligned16(out.data_ptr());
  for (int k = 0; k < K; ++k) {
    p[k] = in[k]->template data_ptr<S>();
    vec = vec && aligned16(p[k]);
  }
  constexpr int kVec = 16 / sizeof(S);
  if (vec) {
    elementwise_kernel<S, kVec, K><<<grid_for(d.numel / kVec + 1, out.get_device()), kThreads, 0, stream>>>(
        out.data_ptr<S>(), p[0], p[1], p[2], d.numel, d.inner, f);
  } else {
    elementwise_kernel<S, 1, K><<<grid_for(d.numel, out.get_device()), kThreads, 0, stream>>>(
        out.data_ptr<S>(), p[0], p[1], p[2], d.numel, d.inner, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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

  static void fgsm(const at::Tensor& out, const at::Tensor& x, const at::Tensor& g, const Budget& eps,
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
