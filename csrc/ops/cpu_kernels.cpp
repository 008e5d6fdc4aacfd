// CPU kernels of megallama._ops: RMSNorm, SwiGLU and rotary embedding, forward and backward.
//
// Rows are spread over threads with at::parallel_for; the inner loops over a row are plain loops
// marked `omp simd` that the compiler vectorises (-O3 -march=native). bfloat16 is converted to and
// from fp32 with bit operations (vectorisable), and all arithmetic is done in fp32 (fp64 for fp64).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common.h"
#include "kernels.h"

namespace megallama_ops {
namespace {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

inline float load(const float* p, int64_t i) { return p[i]; }
inline double load(const double* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(double* p, int64_t i, double v) { p[i] = v; }
inline void store(c10::BFloat16* p, int64_t i, float v) {
  // Round to nearest even, NaN kept NaN (same result as c10::BFloat16's constructor).
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(v != v ? 0x7fc0u : rounded);
}

// expf that the compiler can vectorise (libm's expf is a call it will not vectorise without
// -ffast-math). Cephes' method: x = n*ln2 + r, a degree-7 polynomial for exp(r), 2^n built from
// exponent bits; relative error ~1e-7 over the clamped range.
inline float exp_vec(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

inline float sigmoid(float v) { return 1.0f / (1.0f + exp_vec(-v)); }
inline double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

template <typename F>
void dispatch_float(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", st);
  }
}

// Rows handled per task: enough elements that a task outweighs its scheduling cost.
inline int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)); }

template <typename T, typename W>
void rms_norm_fwd_kernel(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& y,
                         at::Tensor& rstd) {
  using A = typename Acc<T>::type;
  const int64_t h = x.size(-1), rows = x.numel() / h;
  const RowIndexer xi = make_row_indexer(x), yi = make_row_indexer(y);
  const T* xp = x.data_ptr<T>();
  const W* wp = weight.data_ptr<W>();
  T* yp = y.data_ptr<T>();
  A* rp = rstd.data_ptr<A>();
  const A inv_h = A(1) / A(h);
  at::parallel_for(0, rows, row_grain(h), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + xi.offset(r);
      T* yr = yp + yi.offset(r);
      A ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < h; ++j) {
        const A v = load(xr, j);
        ss += v * v;
      }
      const A rs = A(1) / std::sqrt(ss * inv_h + A(eps));
      rp[r] = rs;
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) store(yr, j, A(load(xr, j)) * rs * A(load(wp, j)));
    }
  });
}

// Rows per block of the grad_weight reduction. It depends only on the row count, never on the
// thread count, so grad_weight is bitwise the same whatever torch.get_num_threads() is.
inline int64_t rms_norm_block_rows(int64_t rows) {
  return std::max<int64_t>(8, (rows + 255) / 256);
}

template <typename T, typename W>
void rms_norm_bwd_kernel(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& grad_weight) {
  using A = typename Acc<T>::type;
  const int64_t h = x.size(-1), rows = x.numel() / h;
  const RowIndexer gi = make_row_indexer(grad_y), xi = make_row_indexer(x),
                   dxi = make_row_indexer(grad_x);
  const T* gp = grad_y.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const W* wp = weight.data_ptr<W>();
  const A* rp = rstd.data_ptr<A>();
  T* dxp = grad_x.data_ptr<T>();
  A* dwp = grad_weight.data_ptr<A>();
  const int64_t block_rows = rms_norm_block_rows(rows);
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  // One fp32 (fp64) partial grad_weight per block of rows, summed below in block order.
  at::Tensor partial = at::empty({blocks, h}, rstd.options());
  A* pp = partial.data_ptr<A>();
  const A inv_h = A(1) / A(h);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      A* part = pp + blk * h;
      std::fill(part, part + h, A(0));
      const int64_t r_end = std::min(rows, (blk + 1) * block_rows);
      for (int64_t r = blk * block_rows; r < r_end; ++r) {
        const T* gr = gp + gi.offset(r);
        const T* xr = xp + xi.offset(r);
        T* dxr = dxp + dxi.offset(r);
        const A rs = rp[r];
        A dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < h; ++j) dot += A(load(gr, j)) * A(load(wp, j)) * A(load(xr, j));
        // d/dx_j of x_j * rs * w_j summed against g: rs*w_j*g_j - x_j * rs^3 * dot / h
        const A coef = dot * rs * rs * rs * inv_h;
#pragma omp simd
        for (int64_t j = 0; j < h; ++j) {
          const A g = load(gr, j), xv = load(xr, j);
          store(dxr, j, rs * A(load(wp, j)) * g - coef * xv);
          part[j] += g * xv * rs;
        }
      }
    }
  });
  at::parallel_for(0, h, 1024, [&](int64_t j0, int64_t j1) {
    std::fill(dwp + j0, dwp + j1, A(0));
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const A* part = pp + blk * h;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) dwp[j] += part[j];
    }
  });
}

template <typename F>
void dispatch_x_weight(const at::Tensor& x, const at::Tensor& weight, const char* op, F&& f) {
  const auto xt = x.scalar_type(), wt = weight.scalar_type();
  if (xt == at::kFloat && wt == at::kFloat) {
    f(float{}, float{});
  } else if (xt == at::kDouble && wt == at::kDouble) {
    f(double{}, double{});
  } else if (xt == at::kBFloat16 && wt == at::kBFloat16) {
    f(c10::BFloat16{}, c10::BFloat16{});
  } else if (xt == at::kBFloat16 && wt == at::kFloat) {
    f(c10::BFloat16{}, float{});
  } else {
    TORCH_CHECK(false, op, ": weight dtype ", wt, " does not go with input dtype ", xt,
                " (weight must have the input's dtype, or be float32 for a bfloat16 input)");
  }
}

template <typename T>
void swiglu_fwd_kernel(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  using A = typename Acc<T>::type;
  const int64_t f = a.size(-1), rows = a.numel() / f;
  const RowIndexer ai = make_row_indexer(a), bi = make_row_indexer(b), oi = make_row_indexer(out);
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, row_grain(f), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* ar = ap + ai.offset(r);
      const T* br = bp + bi.offset(r);
      T* orow = op + oi.offset(r);
#pragma omp simd
      for (int64_t j = 0; j < f; ++j) {
        const A av = load(ar, j);
        store(orow, j, av * sigmoid(av) * A(load(br, j)));
      }
    }
  });
}

template <typename T>
void swiglu_bwd_kernel(const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b,
                       at::Tensor& grad_a, at::Tensor& grad_b) {
  using A = typename Acc<T>::type;
  const int64_t f = a.size(-1), rows = a.numel() / f;
  const RowIndexer gi = make_row_indexer(grad_out), ai = make_row_indexer(a),
                   bi = make_row_indexer(b), gai = make_row_indexer(grad_a),
                   gbi = make_row_indexer(grad_b);
  const T* gp = grad_out.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  T* gap = grad_a.data_ptr<T>();
  T* gbp = grad_b.data_ptr<T>();
  at::parallel_for(0, rows, row_grain(f), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gr = gp + gi.offset(r);
      const T* ar = ap + ai.offset(r);
      const T* br = bp + bi.offset(r);
      T* gar = gap + gai.offset(r);
      T* gbr = gbp + gbi.offset(r);
#pragma omp simd
      for (int64_t j = 0; j < f; ++j) {
        const A g = load(gr, j), av = load(ar, j), bv = load(br, j);
        const A s = sigmoid(av);
        // silu'(a) = s * (1 + a * (1 - s))
        store(gar, j, g * bv * s * (A(1) + av * (A(1) - s)));
        store(gbr, j, g * av * s);
      }
    }
  });
}

template <typename T>
void rope_kernel(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                 at::Tensor& out, bool inverse) {
  using A = typename Acc<T>::type;
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2);
  const int64_t cs = cos.stride(0), ss = sin.stride(0);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const A sign = inverse ? A(-1) : A(1);
  at::parallel_for(0, B * S, row_grain(H * D), [&](int64_t begin, int64_t end) {
    for (int64_t bs = begin; bs < end; ++bs) {
      const int64_t bi = bs / S, si = bs % S;
      const float* c = cp + si * cs;
      const float* s = sp + si * ss;
      for (int64_t hi = 0; hi < H; ++hi) {
        const T* xr = xp + bi * xs0 + si * xs1 + hi * xs2;
        T* orow = op + bi * os0 + si * os1 + hi * os2;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const A x1 = load(xr, j), x2 = load(xr, j + half);
          const A cj = c[j], sj = sign * A(s[j]);
          store(orow, j, x1 * cj - x2 * sj);
          store(orow, j + half, x2 * cj + x1 * sj);
        }
      }
    }
  });
}

}  // namespace

void rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& y,
                      at::Tensor& rstd) {
  dispatch_x_weight(x, weight, "rms_norm_fwd", [&](auto t, auto w) {
    rms_norm_fwd_kernel<decltype(t), decltype(w)>(x, weight, eps, y, rstd);
  });
}

void rms_norm_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& grad_weight) {
  dispatch_x_weight(x, weight, "rms_norm_bwd", [&](auto t, auto w) {
    rms_norm_bwd_kernel<decltype(t), decltype(w)>(grad_y, x, weight, rstd, grad_x, grad_weight);
  });
}

void swiglu_fwd_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  dispatch_float(a.scalar_type(), "swiglu_fwd",
                 [&](auto t) { swiglu_fwd_kernel<decltype(t)>(a, b, out); });
}

void swiglu_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b,
                    at::Tensor& grad_a, at::Tensor& grad_b) {
  dispatch_float(a.scalar_type(), "swiglu_bwd", [&](auto t) {
    swiglu_bwd_kernel<decltype(t)>(grad_out, a, b, grad_a, grad_b);
  });
}

void rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out,
              bool inverse) {
  dispatch_float(x.scalar_type(), "rope_apply",
                 [&](auto t) { rope_kernel<decltype(t)>(x, cos, sin, out, inverse); });
}

}  // namespace megallama_ops
