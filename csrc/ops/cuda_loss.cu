// CUDA kernels of the fused softmax cross-entropy "unit gradient" and of its two phases for
// vocabulary-parallel logits (compiled only with MEGALLAMA_WITH_CUDA). One thread block per row of
// logits: pass 1 keeps an online (max, sum of exp) per thread over 16-byte packs, combined across
// the block with warp shuffles and shared memory; pass 2 overwrites the row with softmax - onehot.
// Rows are read twice and written once; the second read mostly hits L2. The vocabulary-parallel
// form splits the two passes into two kernels around the caller's all-reduce. fp32 (fp64)
// arithmetic.
#ifdef MEGALLAMA_WITH_CUDA

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>

#include "common.h"
#include "cuda_common.cuh"
#include "kernels.h"

namespace megallama_ops {
namespace {

__device__ inline float log_acc(float v) { return logf(v); }
__device__ inline double log_acc(double v) { return log(v); }

// Merges the partial (max, sum of exp(x - max)) (m2, s2) into (m, s). A part that has seen only
// -inf (or nothing) has m = -inf and s = 0 and must not turn the sum into exp(-inf + inf) = NaN.
template <typename A>
__device__ inline void merge(A& m, A& s, A m2, A s2) {
  const A mx = m > m2 ? m : m2;
  if (mx == -std::numeric_limits<A>::infinity()) return;
  s = s * exp_acc(m - mx) + s2 * exp_acc(m2 - mx);
  m = mx;
}

// (max, sum) over the block, returned to every thread. `shared` holds one pair per warp.
template <typename A>
__device__ void block_max_sum(A& m, A& s, A* shared_m, A* shared_s) {
  for (int o = 16; o > 0; o >>= 1) {
    merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    m = lane < warps ? shared_m[lane] : -std::numeric_limits<A>::infinity();
    s = lane < warps ? shared_s[lane] : A(0);
    for (int o = 16; o > 0; o >>= 1) {
      merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    }
    if (lane == 0) {
      shared_m[0] = m;
      shared_s[0] = s;
    }
  }
  __syncthreads();
  m = shared_m[0];
  s = shared_s[0];
}

// This thread's (max, sum of exp(x - max)) over its packs p = threadIdx.x + i * blockDim.x of the
// row, columns from `valid` on counted as -inf (a pack may straddle the end of the vocabulary).
template <int N, typename T, typename A>
__device__ inline void thread_max_sum(const T* lr, int64_t packs, int64_t valid, A& m, A& s) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  m = kNegInf;
  s = 0;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<T, N> v = load_pack<N>(lr + p * N);
    A x[N];
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] = p * N + k < valid ? to_acc(v.v[k]) : kNegInf;
    A pm = x[0];
#pragma unroll
    for (int k = 1; k < N; ++k) pm = pm > x[k] ? pm : x[k];
    if (pm > m) {  // rescale the sum once per pack, not once per element
      s *= exp_acc(m - pm);
      m = pm;
    }
    if (m == kNegInf) continue;  // only -inf so far: adds nothing
#pragma unroll
    for (int k = 0; k < N; ++k) s += exp_acc(x[k] - m);
  }
}

template <typename T, typename A, int N>
__global__ void cross_entropy_unit_grad_kernel(T* __restrict__ logits, int64_t row_stride,
                                               const int64_t* __restrict__ target,
                                               A* __restrict__ loss, int64_t classes,
                                               int64_t ignore_index) {
  __shared__ A shared_m[32], shared_s[32];
  const int64_t row = blockIdx.x, packs = classes / N, t = target[row];
  T* lr = logits + row * row_stride;
  if (t == ignore_index) {
    Pack<T, N> zero;
#pragma unroll
    for (int k = 0; k < N; ++k) zero.v[k] = static_cast<T>(A(0));
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) store_pack<N>(lr + p * N, zero);
    if (threadIdx.x == 0) loss[row] = A(0);
    return;
  }
  CUDA_KERNEL_ASSERT(t >= 0 && t < classes);
  // Read before pass 2 overwrites it (the block reduction's barriers order the two).
  const A target_logit = threadIdx.x == 0 ? to_acc(lr[t]) : A(0);
  A m, s;
  thread_max_sum<N>(lr, packs, classes, m, s);
  block_max_sum(m, s, shared_m, shared_s);
  if (threadIdx.x == 0) loss[row] = m + log_acc(s) - target_logit;
  const A inv_s = A(1) / s;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<T, N> v = load_pack<N>(lr + p * N);
    Pack<T, N> g;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A onehot = p * N + k == t ? A(1) : A(0);
      g.v[k] = static_cast<T>(exp_acc(to_acc(v.v[k]) - m) * inv_s - onehot);
    }
    store_pack<N>(lr + p * N, g);
  }
}

// Phase 1 of the vocabulary-parallel form: stats[row] = (max, sum of exp(l - max), l[t] or 0) over
// the `valid` leading columns; `packs` covers them, the last one possibly in part.
template <typename T, typename A, int N>
__global__ void cross_entropy_partials_kernel(const T* __restrict__ logits, int64_t row_stride,
                                              const int64_t* __restrict__ target,
                                              A* __restrict__ stats, int64_t packs, int64_t valid) {
  __shared__ A shared_m[32], shared_s[32];
  const int64_t row = blockIdx.x, t = target[row];
  CUDA_KERNEL_ASSERT(t >= -1 && t < valid);
  const T* lr = logits + row * row_stride;
  A m, s;
  thread_max_sum<N>(lr, packs, valid, m, s);
  block_max_sum(m, s, shared_m, shared_s);
  if (threadIdx.x == 0) {
    stats[3 * row] = m;
    stats[3 * row + 1] = s;
    stats[3 * row + 2] = t >= 0 ? to_acc(lr[t]) : A(0);
  }
}

// Phase 2, in place over the row's `packs` packs: exp(l - row_max) * row_scale - onehot(t) in the
// `valid` leading columns, 0 in the others. A zero scale (an ignored row, whose max may be -inf)
// skips the exp, so exp(-inf + inf) and non-finite logits there leave no NaN.
template <typename T, typename A, int N>
__global__ void cross_entropy_grad_from_stats_kernel(T* __restrict__ logits, int64_t row_stride,
                                                     const int64_t* __restrict__ target,
                                                     const A* __restrict__ row_max,
                                                     const A* __restrict__ row_scale, int64_t packs,
                                                     int64_t valid) {
  const int64_t row = blockIdx.x, t = target[row];
  CUDA_KERNEL_ASSERT(t >= -1 && t < valid);
  const A m = row_max[row], scale = row_scale[row];
  T* lr = logits + row * row_stride;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const int64_t c0 = p * N;
    const bool live = c0 < valid && scale != A(0);
    Pack<T, N> v;
    if (live) v = load_pack<N>(lr + c0);  // padding-only packs are not read
    Pack<T, N> g;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A e = live && c0 + k < valid ? exp_acc(to_acc(v.v[k]) - m) * scale : A(0);
      g.v[k] = static_cast<T>(e - (c0 + k == t ? A(1) : A(0)));
    }
    store_pack<N>(lr + c0, g);
  }
}

}  // namespace

void cross_entropy_unit_grad_cuda(at::Tensor& logits, const at::Tensor& target,
                                  int64_t ignore_index, at::Tensor& loss) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), classes = logits.size(1);
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "cross_entropy_unit_grad", [&] {
    using A = typename Acc<scalar_t>::type;
    constexpr int N = kPack<scalar_t>;
    const bool packed = rows_in_packs(logits, N, 16);
    const int threads = row_threads(packed ? classes / N : classes);
    auto launch = [&](auto kernel) {
      kernel<<<row_blocks(rows, "cross_entropy_unit_grad"), threads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), logits.stride(0), target.data_ptr<int64_t>(),
          loss.data_ptr<A>(), classes, ignore_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) {
      launch(cross_entropy_unit_grad_kernel<scalar_t, A, N>);
    } else {
      launch(cross_entropy_unit_grad_kernel<scalar_t, A, 1>);
    }
  });
}

void cross_entropy_partials_cuda(const at::Tensor& logits, const at::Tensor& target_local,
                                 int64_t valid_columns, at::Tensor& stats) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "cross_entropy_partials", [&] {
    using A = typename Acc<scalar_t>::type;
    constexpr int N = kPack<scalar_t>;
    // Whole packs per row: the pack holding the last valid column lies inside the row.
    const bool packed = rows_in_packs(logits, N, 16);
    const int64_t packs = packed ? (valid_columns + N - 1) / N : valid_columns;
    auto launch = [&](auto kernel) {
      kernel<<<row_blocks(rows, "cross_entropy_partials"), row_threads(packs), 0, stream>>>(
          logits.data_ptr<scalar_t>(), logits.stride(0), target_local.data_ptr<int64_t>(),
          stats.data_ptr<A>(), packs, valid_columns);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) {
      launch(cross_entropy_partials_kernel<scalar_t, A, N>);
    } else {
      launch(cross_entropy_partials_kernel<scalar_t, A, 1>);
    }
  });
}

void cross_entropy_grad_from_stats_cuda(at::Tensor& logits, const at::Tensor& target_local,
                                        int64_t valid_columns, const at::Tensor& row_max,
                                        const at::Tensor& row_scale) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), classes = logits.size(1);
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "cross_entropy_grad_from_stats", [&] {
    using A = typename Acc<scalar_t>::type;
    constexpr int N = kPack<scalar_t>;
    const bool packed = rows_in_packs(logits, N, 16);
    const int64_t packs = packed ? classes / N : classes;
    auto launch = [&](auto kernel) {
      kernel<<<row_blocks(rows, "cross_entropy_grad_from_stats"), row_threads(packs), 0, stream>>>(
          logits.data_ptr<scalar_t>(), logits.stride(0), target_local.data_ptr<int64_t>(),
          row_max.data_ptr<A>(), row_scale.data_ptr<A>(), packs, valid_columns);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) {
      launch(cross_entropy_grad_from_stats_kernel<scalar_t, A, N>);
    } else {
      launch(cross_entropy_grad_from_stats_kernel<scalar_t, A, 1>);
    }
  });
}

}  // namespace megallama_ops

#endif  // MEGALLAMA_WITH_CUDA
