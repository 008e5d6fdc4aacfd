// CUDA kernels of megallama._ops (compiled only with a CUDA toolkit and a CUDA torch; setup.py
// then defines MEGALLAMA_WITH_CUDA). Deliberately simple: one block per row for the RMSNorm
// reductions, grid-stride elementwise loops for SwiGLU and rotary; fp32 (fp64) accumulation.
#ifdef MEGALLAMA_WITH_CUDA

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "common.h"
#include "kernels.h"

namespace megallama_ops {
namespace {

constexpr int kThreads = 256;  // a multiple of the warp size: block_sum relies on it

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ inline float exp_acc(float v) { return expf(v); }
__device__ inline double exp_acc(double v) { return exp(v); }
__device__ inline float sqrt_acc(float v) { return sqrtf(v); }
__device__ inline double sqrt_acc(double v) { return sqrt(v); }

template <typename A>
__device__ inline A to_acc(A v) {
  return v;
}
__device__ inline float to_acc(c10::BFloat16 v) { return static_cast<float>(v); }

// Sum over the block, returned to every thread. `shared` holds one value per warp.
template <typename A>
__device__ A block_sum(A v, A* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    v = lane < warps ? shared[lane] : A(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  v = shared[0];
  __syncthreads();  // shared may be reused by the caller's next block_sum
  return v;
}

unsigned int row_blocks(int64_t rows, const char* op) {
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), op, ": too many rows (", rows,
              ") for one launch");
  return static_cast<unsigned int>(rows);
}

unsigned int elementwise_blocks(int64_t n) {
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 32)));
}

template <typename T, typename W, typename A>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, RowIndexer xi,
                                    const W* __restrict__ w, T* __restrict__ y, RowIndexer yi,
                                    A* __restrict__ rstd, int64_t h, A eps) {
  __shared__ A shared[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + xi.offset(row);
  T* yr = y + yi.offset(row);
  A ss = 0;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    const A v = to_acc(xr[j]);
    ss += v * v;
  }
  ss = block_sum(ss, shared);
  const A rs = A(1) / sqrt_acc(ss / A(h) + eps);
  if (threadIdx.x == 0) rstd[row] = rs;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    yr[j] = static_cast<T>(to_acc(xr[j]) * rs * to_acc(w[j]));
  }
}

template <typename T, typename W, typename A>
__global__ void rms_norm_bwd_dx_kernel(const T* __restrict__ g, RowIndexer gi,
                                       const T* __restrict__ x, RowIndexer xi,
                                       const W* __restrict__ w, const A* __restrict__ rstd,
                                       T* __restrict__ dx, RowIndexer dxi, int64_t h) {
  __shared__ A shared[32];
  const int64_t row = blockIdx.x;
  const T* gr = g + gi.offset(row);
  const T* xr = x + xi.offset(row);
  T* dxr = dx + dxi.offset(row);
  const A rs = rstd[row];
  A dot = 0;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    dot += to_acc(gr[j]) * to_acc(w[j]) * to_acc(xr[j]);
  }
  dot = block_sum(dot, shared);
  const A coef = dot * rs * rs * rs / A(h);
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    dxr[j] = static_cast<T>(rs * to_acc(w[j]) * to_acc(gr[j]) - coef * to_acc(xr[j]));
  }
}

// partial[chunk, j] = sum over the chunk's rows of g[r, j] * x[r, j] * rstd[r]; threads of a block
// take consecutive columns (coalesced). The chunks are summed afterwards in a fixed order.
template <typename T, typename A>
__global__ void rms_norm_bwd_dw_kernel(const T* __restrict__ g, RowIndexer gi,
                                       const T* __restrict__ x, RowIndexer xi,
                                       const A* __restrict__ rstd, A* __restrict__ partial,
                                       int64_t rows, int64_t h, int64_t rows_per_chunk) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= h) return;
  const int64_t r0 = blockIdx.y * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  A acc = 0;
  for (int64_t r = r0; r < r1; ++r) {
    acc += to_acc(g[gi.offset(r) + j]) * to_acc(x[xi.offset(r) + j]) * rstd[r];
  }
  partial[blockIdx.y * h + j] = acc;
}

template <typename T, typename A>
__global__ void swiglu_fwd_kernel(const T* __restrict__ a, RowIndexer ai, const T* __restrict__ b,
                                  RowIndexer bi, T* __restrict__ out, RowIndexer oi, int64_t rows,
                                  int64_t f) {
  const int64_t n = rows * f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / f, j = i - r * f;
    const A av = to_acc(a[ai.offset(r) + j]);
    const A s = A(1) / (A(1) + exp_acc(-av));
    out[oi.offset(r) + j] = static_cast<T>(av * s * to_acc(b[bi.offset(r) + j]));
  }
}

template <typename T, typename A>
__global__ void swiglu_bwd_kernel(const T* __restrict__ g, RowIndexer gi, const T* __restrict__ a,
                                  RowIndexer ai, const T* __restrict__ b, RowIndexer bi,
                                  T* __restrict__ ga, RowIndexer gai, T* __restrict__ gb,
                                  RowIndexer gbi, int64_t rows, int64_t f) {
  const int64_t n = rows * f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / f, j = i - r * f;
    const A gv = to_acc(g[gi.offset(r) + j]);
    const A av = to_acc(a[ai.offset(r) + j]);
    const A bv = to_acc(b[bi.offset(r) + j]);
    const A s = A(1) / (A(1) + exp_acc(-av));
    ga[gai.offset(r) + j] = static_cast<T>(gv * bv * s * (A(1) + av * (A(1) - s)));
    gb[gbi.offset(r) + j] = static_cast<T>(gv * av * s);
  }
}

struct RopeShape {
  int64_t B, S, H, half;
  int64_t xs0, xs1, xs2, os0, os1, os2, cs, ss;
};

template <typename T, typename A>
__global__ void rope_kernel(const T* __restrict__ x, const float* __restrict__ cos,
                            const float* __restrict__ sin, T* __restrict__ out, RopeShape p,
                            A sign) {
  const int64_t n = p.B * p.S * p.H * p.half;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rest = i / p.half;
    const int64_t j = i - rest * p.half;
    const int64_t hi = rest % p.H;
    rest /= p.H;
    const int64_t si = rest % p.S, bi = rest / p.S;
    const T* xr = x + bi * p.xs0 + si * p.xs1 + hi * p.xs2;
    T* orow = out + bi * p.os0 + si * p.os1 + hi * p.os2;
    const A x1 = to_acc(xr[j]), x2 = to_acc(xr[j + p.half]);
    const A c = cos[si * p.cs + j], s = sign * A(sin[si * p.ss + j]);
    orow[j] = static_cast<T>(x1 * c - x2 * s);
    orow[j + p.half] = static_cast<T>(x2 * c + x1 * s);
  }
}

}  // namespace

void rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& y,
                       at::Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t h = x.size(-1), rows = x.numel() / h;
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_x_weight(x, weight, "rms_norm_fwd", [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    using A = typename Acc<T>::type;
    rms_norm_fwd_kernel<T, W, A><<<row_blocks(rows, "rms_norm_fwd"), kThreads, 0, stream>>>(
        x.data_ptr<T>(), make_row_indexer(x), weight.data_ptr<W>(), y.data_ptr<T>(),
        make_row_indexer(y), rstd.data_ptr<A>(), h, static_cast<A>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void rms_norm_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& grad_weight) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t h = x.size(-1), rows = x.numel() / h;
  if (rows == 0) {
    grad_weight.zero_();
    return;
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows_per_chunk = std::max<int64_t>(32, (rows + 511) / 512);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  at::Tensor partial = at::empty({chunks, h}, rstd.options());
  dispatch_x_weight(x, weight, "rms_norm_bwd", [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    using A = typename Acc<T>::type;
    rms_norm_bwd_dx_kernel<T, W, A><<<row_blocks(rows, "rms_norm_bwd"), kThreads, 0, stream>>>(
        grad_y.data_ptr<T>(), make_row_indexer(grad_y), x.data_ptr<T>(), make_row_indexer(x),
        weight.data_ptr<W>(), rstd.data_ptr<A>(), grad_x.data_ptr<T>(), make_row_indexer(grad_x),
        h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned int>((h + kThreads - 1) / kThreads),
                    static_cast<unsigned int>(chunks));
    rms_norm_bwd_dw_kernel<T, A><<<grid, kThreads, 0, stream>>>(
        grad_y.data_ptr<T>(), make_row_indexer(grad_y), x.data_ptr<T>(), make_row_indexer(x),
        rstd.data_ptr<A>(), partial.data_ptr<A>(), rows, h, rows_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  grad_weight.copy_(partial.sum(0));
}

void swiglu_fwd_cuda(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t f = a.size(-1), rows = a.numel() / f;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "swiglu_fwd", [&] {
    using A = typename Acc<scalar_t>::type;
    swiglu_fwd_kernel<scalar_t, A><<<elementwise_blocks(rows * f), kThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), make_row_indexer(a), b.data_ptr<scalar_t>(), make_row_indexer(b),
        out.data_ptr<scalar_t>(), make_row_indexer(out), rows, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void swiglu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b,
                     at::Tensor& grad_a, at::Tensor& grad_b) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t f = a.size(-1), rows = a.numel() / f;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "swiglu_bwd", [&] {
    using A = typename Acc<scalar_t>::type;
    swiglu_bwd_kernel<scalar_t, A><<<elementwise_blocks(rows * f), kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), make_row_indexer(grad_out), a.data_ptr<scalar_t>(),
        make_row_indexer(a), b.data_ptr<scalar_t>(), make_row_indexer(b),
        grad_a.data_ptr<scalar_t>(), make_row_indexer(grad_a), grad_b.data_ptr<scalar_t>(),
        make_row_indexer(grad_b), rows, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out,
               bool inverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  RopeShape p{x.size(0),    x.size(1),     x.size(2),     x.size(3) / 2,
              x.stride(0),  x.stride(1),   x.stride(2),   out.stride(0),
              out.stride(1), out.stride(2), cos.stride(0), sin.stride(0)};
  const int64_t n = p.B * p.S * p.H * p.half;
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rope_apply", [&] {
    using A = typename Acc<scalar_t>::type;
    rope_kernel<scalar_t, A><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
        out.data_ptr<scalar_t>(), p, inverse ? A(-1) : A(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace megallama_ops

#endif  // MEGALLAMA_WITH_CUDA
