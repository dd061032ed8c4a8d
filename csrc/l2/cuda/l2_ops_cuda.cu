// The L2 ops' CUDA kernels: a block per sample runs the sample's sums of squares (a 16-thread group per
// chunk, l2/l2_math.h's lanes and trees: the same bits as the CPU) and its write. With few samples of
// many elements the sums are split over many blocks (partials to a scratch buffer, then a block per
// sample for the trees, then an elementwise write). Current stream and device, 64-bit indices.
#include <algorithm>
#include <cstdint>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "l2/l2_math.h"
#include "l2/l2_ops.h"

namespace robust_ext {
namespace {

using cuda::DeviceBudget;
using cuda::device_budget;
using cuda::kThreads;

constexpr int kGroups = kThreads / math::kSumLanes;  // chunk groups per block

// part[c] for chunks c = c_first + group, + c_stride, ... below `count` of a sample of n elements,
// term(i) its element i's value. Every thread of the block calls it (the lane tree shuffles whole warps).
template <typename T, typename F>
__device__ void block_chunk_sums(int64_t n, int64_t count, int64_t c_first, int64_t c_stride, T* part, F term) {
  const int lane = threadIdx.x % math::kSumLanes, group = threadIdx.x / math::kSumLanes;
  for (int64_t base = c_first; base < count; base += c_stride) {
    const int64_t c = base + group;
    T acc = T(0);
    if (c < count) {
      const int64_t first = c * math::kSumChunk;
      const int64_t len = n - first < math::kSumChunk ? n - first : math::kSumChunk;
      for (int m = 0; m < math::kSumDepth; ++m) {
        const int64_t k = m * math::kSumLanes + lane;
        if (k < len) {
          const T v = term(first + k);
          acc = acc + v * v;
        }
      }
    }
    // lane_tree: lane j < h adds lane j + h, h = 8, 4, 2, 1
    for (int h = math::kSumLanes / 2; h >= 1; h /= 2) acc = acc + __shfl_down_sync(0xffffffffu, acc, h, math::kSumLanes);
    if (lane == 0 && c < count) part[c] = acc;
  }
}

// chunk_tree over part[0, count), level by level across the block; every thread gets the sum.
template <typename T>
__device__ T block_tree(T* part, int64_t count) {
  __syncthreads();
  for (int64_t s = 1; s < count; s *= 2) {
    for (int64_t i = 2 * s * threadIdx.x; i + s < count; i += 2 * s * blockDim.x) part[i] = part[i] + part[i + s];
    __syncthreads();
  }
  const T sum = count ? part[0] : T(0);
  __syncthreads();
  return sum;
}

// max over i < n of value(i) (>= 0), every thread gets it.
template <typename T, typename F>
__device__ T block_max(int64_t n, F value) {
  __shared__ double buf[kThreads];
  T* sm = reinterpret_cast<T*>(buf);
  T m = T(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const T v = value(i);
    m = v > m ? v : m;
  }
  sm[threadIdx.x] = m;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) sm[threadIdx.x] = sm[threadIdx.x + s] > sm[threadIdx.x] ? sm[threadIdx.x + s] : sm[threadIdx.x];
    __syncthreads();
  }
  const T r = sm[0];
  __syncthreads();
  return r;
}

enum Mode { kStep, kProject, kFgm, kInit, kApgd };
enum Pass { kGrad, kDelta, kGauss, kMomentum };

__host__ __device__ constexpr int passes(int mode) { return mode == kApgd ? 3 : (mode == kStep ? 2 : 1); }
__host__ __device__ constexpr int pass_of(int mode, int p) {
  return (mode == kStep || mode == kApgd) ? (p == 0 ? kGrad : (p == 1 ? kDelta : kMomentum))
                                          : (mode == kProject ? kDelta : (mode == kFgm ? kGrad : kGauss));
}

// One op over its samples: the terms each pass sums, the per-sample finish, the output.
template <typename S, int kMode>
struct Job {
  using T = compute_t<S>;
  S* out;
  const S *xa, *g, *x;  // fgm: xa = x; project: g = nullptr
  const S* xp;          // apgd: x_prev (may be xa, or in place out: read before written)
  int64_t n;
  DeviceBudget<T> alpha, eps;
  T m, m1;  // apgd: momentum, 1 - momentum
  T lo, hi;
  T *scale, *coef, *factor, *step_factor;  // per sample; apgd: the step's factor, then the momentum point's
  const int64_t* seed_ptr;   // the Philox key on the device, or seed_value
  uint64_t seed_value;

  __device__ uint64_t key() const { return seed_ptr ? static_cast<uint64_t>(*seed_ptr) : seed_value; }
  __device__ T gaussian(int64_t o) const {
    const uint64_t k = key();
    return math::gaussian_at<T>(o, static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32));
  }
  __device__ T delta(int64_t s, int64_t o) const {
    const T a = static_cast<T>(xa[o]), b = static_cast<T>(x[o]);
    return kMode == kProject ? a - b : math::l2_delta(a, static_cast<T>(g[o]), b, coef[s], scale[s]);
  }
  // apgd: d2 = v - x for the momentum point v of z, the step's result rounded to the storage type.
  __device__ T momentum_delta(int64_t s, int64_t o) const {
    const T a = static_cast<T>(xa[o]), b = static_cast<T>(x[o]);
    const T z = static_cast<T>(static_cast<S>(math::l2_out(b, delta(s, o), step_factor[s], lo, hi)));
    return math::l2_apgd_delta(z, a, static_cast<T>(xp[o]), b, m, m1);
  }

  __device__ T term(int pass, int64_t s, int64_t i) const {
    const int64_t o = s * n + i;
    if (pass == kGrad) return math::nan_to_zero(static_cast<T>(g[o]));
    if (pass == kDelta) return delta(s, o);
    if (pass == kMomentum) return momentum_delta(s, o);
    return gaussian(o);
  }

  // Block-wide: the sample's sum from its partials, then its coefficient or factor.
  __device__ void finish(int pass, int64_t s, T* part, int64_t count) const {
    T sum = block_tree(part, count);
    if (pass == kGrad) {
      T sc = T(1);
      if (math::l2_needs_rescale(sum)) {
        const S* gs = g + s * n;
        sc = math::l2_rescale(
            block_max<T>(n, [&](int64_t i) { return math::abs_of(math::nan_to_zero(static_cast<T>(gs[i]))); }));
        block_chunk_sums<T>(n, count, 0, kGroups, part, [&](int64_t i) { return math::l2_direction(static_cast<T>(gs[i]), sc); });
        sum = block_tree(part, count);
      }
      if (threadIdx.x == 0) {
        scale[s] = sc;
        coef[s] = math::l2_coef(kMode == kFgm ? eps[s] : alpha[s], sum);
      }
    } else if (threadIdx.x == 0) {
      if (pass == kDelta) {
        (kMode == kApgd ? step_factor : factor)[s] = math::l2_factor(eps[s], sum);
      } else if (pass == kMomentum) {
        factor[s] = math::l2_factor(eps[s], sum);
      } else {
        const uint64_t k = key();
        coef[s] = math::l2_coef(
            math::l2_radius<T>(s, n, static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32), eps[s]), sum);
      }
    }
    __syncthreads();
  }

  __device__ S value(int64_t s, int64_t i) const {
    const int64_t o = s * n + i;
    const T b = static_cast<T>(x[o]);
    if (kMode == kInit) return static_cast<S>(math::l2_out(b, gaussian(o), coef[s], lo, hi));
    if (kMode == kFgm) return static_cast<S>(math::l2_out(b, delta(s, o), T(1), lo, hi));
    if (kMode == kApgd) return static_cast<S>(math::l2_out(b, momentum_delta(s, o), factor[s], lo, hi));
    return static_cast<S>(math::l2_out(b, delta(s, o), factor[s], lo, hi));
  }
};

// A block per sample (blocks stride over samples), partials in the block's slice of scratch.
template <typename S, int kMode>
__global__ void rows_kernel(Job<S, kMode> job, int64_t samples, compute_t<S>* scratch) {
  using T = compute_t<S>;
  const int64_t count = math::sum_chunks(job.n);
  T* part = scratch + blockIdx.x * count;
  for (int64_t s = blockIdx.x; s < samples; s += gridDim.x) {
    for (int p = 0; p < passes(kMode); ++p) {
      const int pass = pass_of(kMode, p);
      block_chunk_sums<T>(job.n, count, 0, kGroups, part, [&](int64_t i) { return job.term(pass, s, i); });
      job.finish(pass, s, part, count);
    }
    for (int64_t i = threadIdx.x; i < job.n; i += blockDim.x) job.out[s * job.n + i] = job.value(s, i);
    __syncthreads();
  }
}

// The split path: partials of sample blockIdx.y over blocks along x, ...
template <typename S, int kMode>
__global__ void sums_kernel(Job<S, kMode> job, int pass, compute_t<S>* scratch) {
  const int64_t count = math::sum_chunks(job.n), s = blockIdx.y;
  block_chunk_sums<compute_t<S>>(job.n, count, static_cast<int64_t>(blockIdx.x) * kGroups,
                                 static_cast<int64_t>(gridDim.x) * kGroups, scratch + s * count,
                                 [&](int64_t i) { return job.term(pass, s, i); });
}

// ... then a block per sample for the trees ...
template <typename S, int kMode>
__global__ void finish_kernel(Job<S, kMode> job, int pass, compute_t<S>* scratch) {
  const int64_t count = math::sum_chunks(job.n), s = blockIdx.x;
  job.finish(pass, s, scratch + s * count, count);
}

// ... then the write, elementwise.
template <typename S, int kMode>
__global__ void write_kernel(Job<S, kMode> job, int64_t total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t s = i / job.n;
    job.out[i] = job.value(s, i - s * job.n);
  }
}

// Samples of at least this many chunks, fewer than 2 per SM: split.
constexpr int64_t kSplitChunks = 64;

template <typename S, int kMode>
void run(Job<S, kMode> job, const Rows& r, const at::Tensor& out) {
  using T = compute_t<S>;
  c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, out.get_device()));
  const auto opts = out.options().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor state = at::empty({4, r.count}, opts);
  job.scale = state.data_ptr<T>();
  job.coef = job.scale + r.count;
  job.factor = job.coef + r.count;
  job.step_factor = job.factor + r.count;
  const int64_t count = math::sum_chunks(r.numel);
  if (r.count < 2 * sms && count >= kSplitChunks) {
    const at::Tensor scratch = at::empty({r.count * count}, opts);
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((count + kGroups - 1) / kGroups, 4 * sms)),
                    static_cast<unsigned>(r.count));
    for (int p = 0; p < passes(kMode); ++p) {
      sums_kernel<S, kMode><<<grid, kThreads, 0, stream>>>(job, pass_of(kMode, p), scratch.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finish_kernel<S, kMode><<<static_cast<unsigned>(r.count), kThreads, 0, stream>>>(job, pass_of(kMode, p),
                                                                                      scratch.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t total = r.count * r.numel;
    write_kernel<S, kMode><<<cuda::grid_for(total, out.get_device()), kThreads, 0, stream>>>(job, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t blocks = std::min<int64_t>(r.count, 8 * static_cast<int64_t>(sms));
  const at::Tensor scratch = at::empty({std::max<int64_t>(1, blocks * count)}, opts);
  rows_kernel<S, kMode><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(job, r.count, scratch.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S, int kMode>
Job<S, kMode> make_job(const at::Tensor& out, const at::Tensor* xa, const at::Tensor* g, const at::Tensor& x,
                       const Budget& alpha, const Budget& eps, double lo, double hi, const Rows& r) {
  using T = compute_t<S>;
  Job<S, kMode> job{};
  job.out = out.data_ptr<S>();
  job.xa = xa ? xa->data_ptr<S>() : nullptr;
  job.g = g ? g->data_ptr<S>() : nullptr;
  job.x = x.data_ptr<S>();
  job.n = r.numel;
  job.alpha = device_budget<T>(alpha);
  job.eps = device_budget<T>(eps);
  job.lo = static_cast<T>(lo);
  job.hi = static_cast<T>(hi);
  return job;
}

struct CudaKernels {
  static void step(const at::Tensor& out, const at::Tensor& xa, const at::Tensor& g, const at::Tensor& x,
                   const Budget& alpha, const Budget& eps, double lo, double hi, const Rows& r) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "l2_step", [&] {
      run(make_job<scalar_t, kStep>(out, &xa, &g, x, alpha, eps, lo, hi, r), r, out);
    });
  }

  static void project(const at::Tensor& out, const at::Tensor& xa, const at::Tensor& x, const Budget& eps,
                      double lo, double hi, const Rows& r) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "l2_project", [&] {
      run(make_job<scalar_t, kProject>(out, &xa, nullptr, x, Budget{}, eps, lo, hi, r), r, out);
    });
  }

  static void apgd_update(const at::Tensor& out, const at::Tensor& xa, const at::Tensor& xp, const at::Tensor& g,
                          const at::Tensor& x, const Budget& alpha, const Budget& eps, double momentum, double lo,
                          double hi, const Rows& r) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "l2_apgd_update", [&] {
      using T = compute_t<scalar_t>;
      auto job = make_job<scalar_t, kApgd>(out, &xa, &g, x, alpha, eps, lo, hi, r);
      job.xp = xp.data_ptr<scalar_t>();
      job.m = static_cast<T>(momentum);
      job.m1 = static_cast<T>(1.0 - momentum);
      run(job, r, out);
    });
  }

  static void single_step(const at::Tensor& out, const at::Tensor& x, const at::Tensor& g, const Budget& eps,
                          double lo, double hi, const Rows& r) {
    RX_DISPATCH_FLOATS(out.scalar_type(), "fgm", [&] {
      run(make_job<scalar_t, kFgm>(out, &x, &g, x, Budget{}, eps, lo, hi, r), r, out);
    });
  }

  static void random_init(const at::Tensor& out, const at::Tensor& x, const Budget& eps, double lo, double hi,
                          const at::Tensor& seed, const Rows& r) {
    const bool on_device = seed.is_cuda();
    RX_DISPATCH_FLOATS(out.scalar_type(), "l2_random_init", [&] {
      auto job = make_job<scalar_t, kInit>(out, nullptr, nullptr, x, Budget{}, eps, lo, hi, r);
      job.seed_ptr = on_device ? seed.data_ptr<int64_t>() : nullptr;
      job.seed_value = on_device ? 0 : static_cast<uint64_t>(seed.item<int64_t>());
      run(job, r, out);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(robust_ext, CUDA, m) {
  register_l2_ops<CudaKernels>(m);
}

}  // namespace robust_ext
