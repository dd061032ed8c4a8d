// What the CUDA kernels of the elementwise families share: per-sample budgets on the device, grid
// sizes, and the elementwise launch (grid-stride loops over dense memory, 16-byte vector loads and stores
// when every pointer allows them, 64-bit indices, the current stream and device).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "compute.h"
#include "dense.h"

namespace robust_ext {
namespace cuda {

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
inline DeviceBudget<T> device_budget(const Budget& b) {
  return {b.per_sample.defined() ? b.per_sample.data_ptr<T>() : nullptr, static_cast<T>(b.value)};
}

// Enough blocks for `work` threads, capped at 8 blocks (2048 threads) per SM: the loops stride over the
// rest. cudaDeviceGetAttribute is a cheap lookup, so there is no cache to share between host threads.
inline int grid_for(int64_t work, c10::DeviceIndex device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, cap)));
}

// out[i] = f({in_0[i], ..., in_{K-1}[i]}, sample(i)) for i in [0, n), N elements per thread step.
template <typename S, int N, int K, typename F>
__global__ void elementwise_kernel(S* out, const S* in0, const S* in1, const S* in2, const S* in3, int64_t n,
                                   int64_t inner, F f) {
  using T = compute_t<S>;
  const S* in[4] = {in0, in1, in2, in3};
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

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename S, int K, typename F>
void launch(const at::Tensor& out, std::array<const at::Tensor*, K> in, const Dense& d, F f) {
  c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  static_assert(K >= 1 && K <= 4, "launch takes 1 to 4 inputs");
  const S* p[4] = {nullptr, nullptr, nullptr, nullptr};
  bool vec = aligned16(out.data_ptr());
  for (int k = 0; k < K; ++k) {
    p[k] = in[k]->template data_ptr<S>();
    vec = vec && aligned16(p[k]);
  }
  constexpr int kVec = 16 / sizeof(S);
  if (vec) {
    elementwise_kernel<S, kVec, K><<<grid_for(d.numel / kVec + 1, out.get_device()), kThreads, 0, stream>>>(
        out.data_ptr<S>(), p[0], p[1], p[2], p[3], d.numel, d.inner, f);
  } else {
    elementwise_kernel<S, 1, K><<<grid_for(d.numel, out.get_device()), kThreads, 0, stream>>>(
        out.data_ptr<S>(), p[0], p[1], p[2], p[3], d.numel, d.inner, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace robust_ext
