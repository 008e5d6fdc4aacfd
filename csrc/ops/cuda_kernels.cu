// CUDA kernels of megallama._ops (compiled only with a CUDA toolkit and a CUDA torch; setup.py
// then defines MEGALLAMA_WITH_CUDA). All of them are bound by memory bandwidth, so each thread moves
// 16 bytes per access (a Pack) whenever the rows allow it: aligned starts, row strides and row
// lengths in whole packs (the usual case: contiguous rows, or one half of a packed matmul output
// whose width is a multiple of 8). Otherwise the same kernels run one element per access. Rows are
// indexed through a 2-D grid, so no element pays a 64-bit division. One block per row for the
// RMSNorm reductions; fp32 (fp64) accumulation.
#ifdef MEGALLAMA_WITH_CUDA

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common.h"
#include "cuda_common.cuh"
#include "kernels.h"

namespace megallama_ops {
namespace {

__device__ inline float sqrt_acc(float v) { return sqrtf(v); }
__device__ inline double sqrt_acc(double v) { return sqrt(v); }

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

// Grid of the elementwise kernels: x over a row's packs, y over rows (both grid-strided).
dim3 pack_grid(int64_t rows, int64_t packs, int threads) {
  return dim3(static_cast<unsigned int>(std::min<int64_t>((packs + threads - 1) / threads, 65535)),
              static_cast<unsigned int>(std::min<int64_t>(rows, 65535)));
}

template <typename T, typename W, typename A, int N>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, RowIndexer xi,
                                    const W* __restrict__ w, T* __restrict__ y, RowIndexer yi,
                                    A* __restrict__ rstd, int64_t h, A eps) {
  __shared__ A shared[32];
  const int64_t row = blockIdx.x, packs = h / N;
  const T* xr = x + xi.offset(row);
  T* yr = y + yi.offset(row);
  A ss = 0;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<T, N> xv = load_pack<N>(xr + p * N);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A v = to_acc(xv.v[k]);
      ss += v * v;
    }
  }
  ss = block_sum(ss, shared);
  const A rs = A(1) / sqrt_acc(ss / A(h) + eps);
  if (threadIdx.x == 0) rstd[row] = rs;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<T, N> xv = load_pack<N>(xr + p * N);
    const Pack<W, N> wv = load_pack<N>(w + p * N);
    Pack<T, N> yv;
#pragma unroll
    for (int k = 0; k < N; ++k) yv.v[k] = static_cast<T>(to_acc(xv.v[k]) * rs * to_acc(wv.v[k]));
    store_pack<N>(yr + p * N, yv);
  }
}

template <typename T, typename W, typename A, int N>
__global__ void rms_norm_bwd_dx_kernel(const T* __restrict__ g, RowIndexer gi,
                                       const T* __restrict__ x, RowIndexer xi,
                                       const W* __restrict__ w, const A* __restrict__ rstd,
                                       T* __restrict__ dx, RowIndexer dxi, int64_t h) {
  __shared__ A shared[32];
  const int64_t row = blockIdx.x, packs = h / N;
  const T* gr = g + gi.offset(row);
  const T* xr = x + xi.offset(row);
  T* dxr = dx + dxi.offset(row);
  const A rs = rstd[row];
  A dot = 0;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<T, N> gv = load_pack<N>(gr + p * N), xv = load_pack<N>(xr + p * N);
    const Pack<W, N> wv = load_pack<N>(w + p * N);
#pragma unroll
    for (int k = 0; k < N; ++k) dot += to_acc(gv.v[k]) * to_acc(wv.v[k]) * to_acc(xv.v[k]);
  }
  dot = block_sum(dot, shared);
  const A coef = dot * rs * rs * rs / A(h);
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<T, N> gv = load_pack<N>(gr + p * N), xv = load_pack<N>(xr + p * N);
    const Pack<W, N> wv = load_pack<N>(w + p * N);
    Pack<T, N> dv;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      dv.v[k] = static_cast<T>(rs * to_acc(wv.v[k]) * to_acc(gv.v[k]) - coef * to_acc(xv.v[k]));
    }
    store_pack<N>(dxr + p * N, dv);
  }
}

// partial[chunk, j] = sum over the chunk's rows of g[r, j] * x[r, j] * rstd[r]; threads of a block
// take consecutive packs of columns (coalesced). The chunks are summed afterwards in a fixed order.
template <typename T, typename A, int N>
__global__ void rms_norm_bwd_dw_kernel(const T* __restrict__ g, RowIndexer gi,
                                       const T* __restrict__ x, RowIndexer xi,
                                       const A* __restrict__ rstd, A* __restrict__ partial,
                                       int64_t rows, int64_t h, int64_t rows_per_chunk) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p >= h / N) return;
  const int64_t r0 = blockIdx.y * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  A acc[N];
#pragma unroll
  for (int k = 0; k < N; ++k) acc[k] = A(0);
  for (int64_t r = r0; r < r1; ++r) {
    const Pack<T, N> gv = load_pack<N>(g + gi.offset(r) + p * N);
    const Pack<T, N> xv = load_pack<N>(x + xi.offset(r) + p * N);
    const A rs = rstd[r];
#pragma unroll
    for (int k = 0; k < N; ++k) acc[k] += to_acc(gv.v[k]) * to_acc(xv.v[k]) * rs;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) partial[blockIdx.y * h + p * N + k] = acc[k];
}

template <typename T, typename A, int N>
__global__ void swiglu_fwd_kernel(const T* __restrict__ a, RowIndexer ai, const T* __restrict__ b,
                                  RowIndexer bi, T* __restrict__ out, RowIndexer oi, int64_t rows,
                                  int64_t packs) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const T* ar = a + ai.offset(r);
    const T* br = b + bi.offset(r);
    T* orow = out + oi.offset(r);
    for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
         p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const Pack<T, N> av = load_pack<N>(ar + p * N), bv = load_pack<N>(br + p * N);
      Pack<T, N> ov;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A x = to_acc(av.v[k]);
        const A s = A(1) / (A(1) + exp_acc(-x));
        ov.v[k] = static_cast<T>(x * s * to_acc(bv.v[k]));
      }
      store_pack<N>(orow + p * N, ov);
    }
  }
}

template <typename T, typename A, int N>
__global__ void swiglu_bwd_kernel(const T* __restrict__ g, RowIndexer gi, const T* __restrict__ a,
                                  RowIndexer ai, const T* __restrict__ b, RowIndexer bi,
                                  T* __restrict__ ga, RowIndexer gai, T* __restrict__ gb,
                                  RowIndexer gbi, int64_t rows, int64_t packs) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const T* gr = g + gi.offset(r);
    const T* ar = a + ai.offset(r);
    const T* br = b + bi.offset(r);
    T* gar = ga + gai.offset(r);
    T* gbr = gb + gbi.offset(r);
    for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
         p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const Pack<T, N> gv = load_pack<N>(gr + p * N), av = load_pack<N>(ar + p * N),
                       bv = load_pack<N>(br + p * N);
      Pack<T, N> gav, gbv;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A gk = to_acc(gv.v[k]), ak = to_acc(av.v[k]), bk = to_acc(bv.v[k]);
        const A s = A(1) / (A(1) + exp_acc(-ak));
        gav.v[k] = static_cast<T>(gk * bk * s * (A(1) + ak * (A(1) - s)));
        gbv.v[k] = static_cast<T>(gk * ak * s);
      }
      store_pack<N>(gar + p * N, gav);
      store_pack<N>(gbr + p * N, gbv);
    }
  }
}

struct RopeShape {
  int64_t B, S, H, half;
  int64_t xs0, xs1, xs2, os0, os1, os2, cs, ss;
};

// One row is one (batch, position, head) vector; threadIdx.y picks the row, threadIdx.x the pack
// of pairs (j, j + half).
template <typename T, typename A, int N>
__global__ void rope_kernel(const T* __restrict__ x, const float* __restrict__ cos,
                            const float* __restrict__ sin, T* __restrict__ out, RopeShape p,
                            A sign) {
  const int64_t rows = p.B * p.S * p.H, packs = p.half / N;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t hi = row % p.H, rest = row / p.H;
    const int64_t si = rest % p.S, bi = rest / p.S;
    const T* xr = x + bi * p.xs0 + si * p.xs1 + hi * p.xs2;
    T* orow = out + bi * p.os0 + si * p.os1 + hi * p.os2;
    const float* cr = cos + si * p.cs;
    const float* sr = sin + si * p.ss;
    for (int64_t q = threadIdx.x; q < packs; q += blockDim.x) {
      const int64_t j = q * N;
      const Pack<T, N> x1 = load_pack<N>(xr + j), x2 = load_pack<N>(xr + j + p.half);
      const Pack<float, N> cv = load_pack<N>(cr + j), sv = load_pack<N>(sr + j);
      Pack<T, N> o1, o2;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A a1 = to_acc(x1.v[k]), a2 = to_acc(x2.v[k]);
        const A c = cv.v[k], s = sign * A(sv.v[k]);
        o1.v[k] = static_cast<T>(a1 * c - a2 * s);
        o2.v[k] = static_cast<T>(a2 * c + a1 * s);
      }
      store_pack<N>(orow + j, o1);
      store_pack<N>(orow + j + p.half, o2);
    }
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
    constexpr int N = kPack<T>;
    const bool packed = rows_in_packs(x, N, 16) && rows_in_packs(y, N, 16) &&
                        rows_in_packs(weight, N, sizeof(W) * N);
    const unsigned int blocks = row_blocks(rows, "rms_norm_fwd");
    const int threads = row_threads(packed ? h / N : h);
    auto launch = [&](auto kernel) {
      kernel<<<blocks, threads, 0, stream>>>(x.data_ptr<T>(), make_row_indexer(x), weight.data_ptr<W>(),
                                             y.data_ptr<T>(), make_row_indexer(y), rstd.data_ptr<A>(), h,
                                             static_cast<A>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) {
      launch(rms_norm_fwd_kernel<T, W, A, N>);
    } else {
      launch(rms_norm_fwd_kernel<T, W, A, 1>);
    }
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
  // Enough chunks of rows to fill the GPU, few enough that summing the partials stays cheap.
  const int64_t rows_per_chunk = std::max<int64_t>(16, (rows + 1023) / 1024);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  at::Tensor partial = at::empty({chunks, h}, rstd.options());
  dispatch_x_weight(x, weight, "rms_norm_bwd", [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    using A = typename Acc<T>::type;
    constexpr int N = kPack<T>;
    const bool packed = rows_in_packs(grad_y, N, 16) && rows_in_packs(x, N, 16) &&
                        rows_in_packs(grad_x, N, 16) && rows_in_packs(weight, N, sizeof(W) * N);
    const int64_t packs = packed ? h / N : h;
    const int threads = row_threads(packs);
    const dim3 dw_grid(static_cast<unsigned int>((packs + threads - 1) / threads),
                       static_cast<unsigned int>(chunks));
    auto launch = [&](auto dx_kernel, auto dw_kernel) {
      dx_kernel<<<row_blocks(rows, "rms_norm_bwd"), threads, 0, stream>>>(
          grad_y.data_ptr<T>(), make_row_indexer(grad_y), x.data_ptr<T>(), make_row_indexer(x),
          weight.data_ptr<W>(), rstd.data_ptr<A>(), grad_x.data_ptr<T>(), make_row_indexer(grad_x), h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dw_kernel<<<dw_grid, threads, 0, stream>>>(grad_y.data_ptr<T>(), make_row_indexer(grad_y),
                                                  x.data_ptr<T>(), make_row_indexer(x), rstd.data_ptr<A>(),
                                                  partial.data_ptr<A>(), rows, h, rows_per_chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) {
      launch(rms_norm_bwd_dx_kernel<T, W, A, N>, rms_norm_bwd_dw_kernel<T, A, N>);
    } else {
      launch(rms_norm_bwd_dx_kernel<T, W, A, 1>, rms_norm_bwd_dw_kernel<T, A, 1>);
    }
  });
  grad_weight.copy_(partial.sum(0));
}

void swiglu_fwd_cuda(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t f = a.size(-1), rows = a.numel() / std::max<int64_t>(f, 1);
  if (a.numel() == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "swiglu_fwd", [&] {
    using A = typename Acc<scalar_t>::type;
    constexpr int N = kPack<scalar_t>;
    const bool packed = rows_in_packs(a, N, 16) && rows_in_packs(b, N, 16) && rows_in_packs(out, N, 16);
    const int64_t packs = packed ? f / N : f;
    const int threads = row_threads(packs);
    auto launch = [&](auto kernel) {
      kernel<<<pack_grid(rows, packs, threads), threads, 0, stream>>>(
          a.data_ptr<scalar_t>(), make_row_indexer(a), b.data_ptr<scalar_t>(), make_row_indexer(b),
          out.data_ptr<scalar_t>(), make_row_indexer(out), rows, packs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) {
      launch(swiglu_fwd_kernel<scalar_t, A, N>);
    } else {
      launch(swiglu_fwd_kernel<scalar_t, A, 1>);
    }
  });
}

void swiglu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b,
                     at::Tensor& grad_a, at::Tensor& grad_b) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t f = a.size(-1), rows = a.numel() / std::max<int64_t>(f, 1);
  if (a.numel() == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "swiglu_bwd", [&] {
    using A = typename Acc<scalar_t>::type;
    constexpr int N = kPack<scalar_t>;
    const bool packed = rows_in_packs(grad_out, N, 16) && rows_in_packs(a, N, 16) &&
                        rows_in_packs(b, N, 16) && rows_in_packs(grad_a, N, 16) &&
                        rows_in_packs(grad_b, N, 16);
    const int64_t packs = packed ? f / N : f;
    const int threads = row_threads(packs);
    auto launch = [&](auto kernel) {
      kernel<<<pack_grid(rows, packs, threads), threads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), make_row_indexer(grad_out), a.data_ptr<scalar_t>(),
          make_row_indexer(a), b.data_ptr<scalar_t>(), make_row_indexer(b),
          grad_a.data_ptr<scalar_t>(), make_row_indexer(grad_a), grad_b.data_ptr<scalar_t>(),
          make_row_indexer(grad_b), rows, packs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) {
      launch(swiglu_bwd_kernel<scalar_t, A, N>);
    } else {
      launch(swiglu_bwd_kernel<scalar_t, A, 1>);
    }
  });
}

void rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out,
               bool inverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  RopeShape p{x.size(0),    x.size(1),     x.size(2),     x.size(3) / 2,
              x.stride(0),  x.stride(1),   x.stride(2),   out.stride(0),
              out.stride(1), out.stride(2), cos.stride(0), sin.stride(0)};
  const int64_t rows = p.B * p.S * p.H;
  if (rows * p.half == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rope_apply", [&] {
    using A = typename Acc<scalar_t>::type;
    constexpr int N = kPack<scalar_t>;
    // Both halves of every row in whole packs (half % N: x's and out's rows are all aligned
    // when their strides are), and cos/sin rows readable N floats at a time.
    const bool packed = p.half % N == 0 && rows_in_packs(x, N, 16) && rows_in_packs(out, N, 16) &&
                        rows_in_packs(cos, N, sizeof(float) * N) && rows_in_packs(sin, N, sizeof(float) * N);
    const int64_t packs = packed ? p.half / N : p.half;
    const int tx = static_cast<int>(std::min<int64_t>(packs, kThreads));
    const dim3 threads(tx, std::max(1, kThreads / tx));
    const unsigned int blocks = static_cast<unsigned int>(
        std::min<int64_t>((rows + threads.y - 1) / threads.y, std::numeric_limits<int32_t>::max()));
    auto launch = [&](auto kernel) {
      kernel<<<blocks, threads, 0, stream>>>(x.data_ptr<scalar_t>(), cos.data_ptr<float>(),
                                             sin.data_ptr<float>(), out.data_ptr<scalar_t>(), p,
                                             inverse ? A(-1) : A(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) {
      launch(rope_kernel<scalar_t, A, N>);
    } else {
      launch(rope_kernel<scalar_t, A, 1>);
    }
  });
}

}  // namespace megallama_ops

#endif  // MEGALLAMA_WITH_CUDA
