// CPU kernels of megallama._ops: RMSNorm, SwiGLU and rotary embedding, forward and backward, the
// fused cross-entropy unit gradient and its two phases for vocabulary-parallel logits.
//
// Rows are spread over threads with at::parallel_for; the inner loops over a row are plain loops
// marked `omp simd` that the compiler vectorises (-O3 -march=native). bfloat16 is converted to and
// from fp32 with bit operations (vectorisable), and all arithmetic is done in fp32 (fp64 for fp64).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace megallama_ops {
namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline double load(const double* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float load(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }

inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(double* p, int64_t i, double v) { p[i] = v; }
inline void store(c10::BFloat16* p, int64_t i, float v) {
  // Round to nearest even, NaN kept NaN (same result as c10::BFloat16's constructor).
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(v != v ? 0x7fc0u : rounded);
}
inline void store(c10::Half* p, int64_t i, float v) { p[i] = c10::Half(v); }

// expf that the compiler can vectorise (libm's expf is a call it will not vectorise without
// -ffast-math, nor a float->int conversion without -fno-trapping-math). Cephes' method:
// x = n*ln2 + r, a degree-7 polynomial for exp(r), 2^n built from exponent bits; relative error
// ~1e-7 over the clamped range.
inline float exp_vec(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // Adding 1.5 * 2^23 rounds x*log2(e) to the nearest integer n, left in the low mantissa bits.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  int32_t n_bits;
  std::memcpy(&n_bits, &shifted, sizeof(n_bits));
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (n_bits - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// exp for the softmax: below exp_vec's clamp the true value is under float's smallest normal, and
// a masked logit (-inf) must give exactly 0, not exp(-87).
inline float exp_or_zero(float x) { return x < -87.0f ? 0.0f : exp_vec(x); }
inline double exp_or_zero(double x) { return std::exp(x); }

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

// The cross-entropy kernels also take float16 (a float16 model's logits).
template <typename F>
void dispatch_float16_or_wider(at::ScalarType st, const char* op, F&& f) {
  if (st == at::kHalf) {
    f(c10::Half{});
  } else {
    dispatch_float(st, op, std::forward<F>(f));
  }
}

// Rows handled per task: enough elements that a task outweighs its scheduling cost.
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1));
}

// Per-row loops take __restrict pointers as plain arguments (not lambda captures, which the
// vectoriser cannot prove loop-invariant against the stores).
template <typename T, typename W, typename A>
inline A rms_norm_fwd_row(const T* __restrict x, const W* __restrict w, T* __restrict y, int64_t h,
                          A inv_h, A eps) {
  A ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < h; ++j) {
    const A v = load(x, j);
    ss += v * v;
  }
  const A rs = A(1) / std::sqrt(ss * inv_h + eps);
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) store(y, j, A(load(x, j)) * rs * A(load(w, j)));
  return rs;
}

template <typename T, typename W, typename A>
inline void rms_norm_bwd_row(const T* __restrict g, const T* __restrict x, const W* __restrict w,
                             A rs, T* __restrict dx, A* __restrict dw_partial, int64_t h,
                             A inv_h) {
  A dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < h; ++j) dot += A(load(g, j)) * A(load(w, j)) * A(load(x, j));
  // d/dx_j of sum_k g_k x_k rs w_k = rs w_j g_j - x_j rs^3 dot / h
  const A coef = dot * rs * rs * rs * inv_h;
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) {
    const A gj = load(g, j), xj = load(x, j);
    store(dx, j, rs * A(load(w, j)) * gj - coef * xj);
    dw_partial[j] += gj * xj * rs;
  }
}

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
      rp[r] = rms_norm_fwd_row<T, W, A>(xp + xi.offset(r), wp, yp + yi.offset(r), h, inv_h, A(eps));
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
        rms_norm_bwd_row<T, W, A>(gp + gi.offset(r), xp + xi.offset(r), wp, rp[r],
                                  dxp + dxi.offset(r), part, h, inv_h);
      }
    }
  });
  at::parallel_for(0, h, 1024, [&](int64_t j0, int64_t j1) {
    A* __restrict dw = dwp;
    std::fill(dw + j0, dw + j1, A(0));
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const A* __restrict part = pp + blk * h;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) dw[j] += part[j];
    }
  });
}

template <typename T>
inline void swiglu_fwd_row(const T* __restrict a, const T* __restrict b, T* __restrict out,
                           int64_t f) {
  using A = typename Acc<T>::type;
#pragma omp simd
  for (int64_t j = 0; j < f; ++j) {
    const A av = load(a, j);
    store(out, j, av * sigmoid(av) * A(load(b, j)));
  }
}

template <typename T>
inline void swiglu_bwd_row(const T* __restrict g, const T* __restrict a, const T* __restrict b,
                           T* __restrict ga, T* __restrict gb, int64_t f) {
  using A = typename Acc<T>::type;
#pragma omp simd
  for (int64_t j = 0; j < f; ++j) {
    const A gj = load(g, j), av = load(a, j), bv = load(b, j);
    const A s = sigmoid(av);
    // silu'(a) = s * (1 + a * (1 - s))
    store(ga, j, gj * bv * s * (A(1) + av * (A(1) - s)));
    store(gb, j, gj * av * s);
  }
}

template <typename T>
void swiglu_fwd_kernel(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const int64_t f = a.size(-1), rows = a.numel() / f;
  const RowIndexer ai = make_row_indexer(a), bi = make_row_indexer(b), oi = make_row_indexer(out);
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, row_grain(f), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      swiglu_fwd_row<T>(ap + ai.offset(r), bp + bi.offset(r), op + oi.offset(r), f);
    }
  });
}

template <typename T>
void swiglu_bwd_kernel(const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b,
                       at::Tensor& grad_a, at::Tensor& grad_b) {
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
      swiglu_bwd_row<T>(gp + gi.offset(r), ap + ai.offset(r), bp + bi.offset(r),
                        gap + gai.offset(r), gbp + gbi.offset(r), f);
    }
  });
}

// Rotate-half: out[j] = x[j] c - x[j+half] s, out[j+half] = x[j+half] c + x[j] s (s negated for
// the inverse rotation).
template <typename T>
inline void rope_row(const T* __restrict x, const float* __restrict c, const float* __restrict s,
                     T* __restrict out, int64_t half, typename Acc<T>::type sign) {
  using A = typename Acc<T>::type;
#pragma omp simd
  for (int64_t j = 0; j < half; ++j) {
    const A x1 = load(x, j), x2 = load(x, j + half);
    const A cj = c[j], sj = sign * A(s[j]);
    store(out, j, x1 * cj - x2 * sj);
    store(out, j + half, x2 * cj + x1 * sj);
  }
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
      for (int64_t hi = 0; hi < H; ++hi) {
        rope_row<T>(xp + bi * xs0 + si * xs1 + hi * xs2, cp + si * cs, sp + si * ss,
                    op + bi * os0 + si * os1 + hi * os2, half, sign);
      }
    }
  });
}

// Max of l[0, v) (-inf when v == 0): exact whatever order the vectoriser takes.
template <typename T, typename A>
inline A row_max(const T* __restrict l, int64_t v) {
  A m = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < v; ++j) m = std::max(m, A(load(l, j)));
  return m;
}

// The sum over the row of exp(l - m), each term also stored in the scratch e: the same loop summing
// alone ran 6x slower in float here (GCC's vectorisation of it).
template <typename T, typename A>
inline A row_exp_sum(const T* __restrict l, A* __restrict e, int64_t v, A m) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < v; ++j) {
    e[j] = exp_or_zero(A(load(l, j)) - m);
    s += e[j];
  }
  return s;
}

// One row of the cross-entropy unit gradient: returns the loss and overwrites l with softmax(l) -
// onehot(t). exp(l - max) is computed once, into the fp32 (fp64) scratch e, which the row (V=32000:
// 128 KB) shares with l in L2.
template <typename T, typename A>
inline A cross_entropy_row(T* __restrict l, A* __restrict e, int64_t v, int64_t t) {
  const A target_logit = load(l, t);
  const A m = row_max<T, A>(l, v);
  const A s = row_exp_sum<T, A>(l, e, v, m);
  const A inv_s = A(1) / s;
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) store(l, j, e[j] * inv_s);
  store(l, t, e[t] * inv_s - A(1));
  return m + std::log(s) - target_logit;
}

// (max, sum of exp(l - max), l[t] or 0 when t == -1) over the v valid columns of one row.
template <typename T, typename A>
inline void cross_entropy_partials_row(const T* __restrict l, A* __restrict e, A* __restrict out,
                                       int64_t v, int64_t t) {
  const A m = row_max<T, A>(l, v);
  // -inf: nothing counts (exp(-inf + inf) would be NaN)
  const A s = m != -std::numeric_limits<A>::infinity() ? row_exp_sum<T, A>(l, e, v, m) : A(0);
  out[0] = m;
  out[1] = s;
  out[2] = t >= 0 ? A(load(l, t)) : A(0);
}

// Overwrites the n columns of l with exp(l - m) * scale - onehot(t) over the v valid ones, 0
// beyond. A zero scale (an ignored row, where m may be -inf) gives the bare -onehot without
// evaluating exp, so non-finite logits there cannot leave NaN behind.
template <typename T, typename A>
inline void cross_entropy_grad_row(T* __restrict l, int64_t n, int64_t v, int64_t t, A m, A scale) {
  const A target_p = t >= 0 && scale != A(0) ? exp_or_zero(A(load(l, t)) - m) * scale : A(0);
  if (scale == A(0)) {
    std::fill(l, l + v, T(0));
  } else {
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) store(l, j, exp_or_zero(A(load(l, j)) - m) * scale);
  }
  std::fill(l + v, l + n, T(0));
  if (t >= 0) store(l, t, target_p - A(1));
}

template <typename T>
void cross_entropy_unit_grad_kernel(at::Tensor& logits, const at::Tensor& target,
                                    int64_t ignore_index, at::Tensor& loss) {
  using A = typename Acc<T>::type;
  const int64_t rows = logits.size(0), v = logits.size(1), stride = logits.stride(0);
  const int64_t* tp = target.data_ptr<int64_t>();
  // All targets are checked before any row is overwritten: an error leaves the logits as they were.
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(tp[r] == ignore_index || (tp[r] >= 0 && tp[r] < v), "cross_entropy_unit_grad: target[",
                r, "] = ", tp[r], " is outside [0, ", v, ") and is not ignore_index (", ignore_index, ")");
  }
  T* lp = logits.data_ptr<T>();
  A* loss_p = loss.data_ptr<A>();
  at::parallel_for(0, rows, row_grain(v), [&](int64_t begin, int64_t end) {
    std::vector<A> scratch(v);
    for (int64_t r = begin; r < end; ++r) {
      T* row = lp + r * stride;
      if (tp[r] == ignore_index) {
        std::fill(row, row + v, T(0));
        loss_p[r] = A(0);
      } else {
        loss_p[r] = cross_entropy_row<T, A>(row, scratch.data(), v, tp[r]);
      }
    }
  });
}

// Shared by the two vocabulary-parallel kernels: checked before anything is written, so that an
// error leaves the logits as they were.
inline void check_local_targets(const int64_t* tp, int64_t rows, int64_t valid, const char* op) {
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(tp[r] >= -1 && tp[r] < valid, op, ": target_local[", r, "] = ", tp[r],
                " is outside [-1, ", valid, ") (-1: not this rank's, or ignored)");
  }
}

template <typename T>
void cross_entropy_partials_kernel(const at::Tensor& logits, const at::Tensor& target,
                                   int64_t valid, at::Tensor& stats) {
  using A = typename Acc<T>::type;
  const int64_t rows = logits.size(0), stride = logits.stride(0);
  const int64_t* tp = target.data_ptr<int64_t>();
  check_local_targets(tp, rows, valid, "cross_entropy_partials");
  const T* lp = logits.data_ptr<T>();
  A* sp = stats.data_ptr<A>();
  at::parallel_for(0, rows, row_grain(valid), [&](int64_t begin, int64_t end) {
    std::vector<A> scratch(valid);
    for (int64_t r = begin; r < end; ++r) {
      cross_entropy_partials_row<T, A>(lp + r * stride, scratch.data(), sp + 3 * r, valid, tp[r]);
    }
  });
}

template <typename T>
void cross_entropy_grad_from_stats_kernel(at::Tensor& logits, const at::Tensor& target,
                                          int64_t valid, const at::Tensor& row_max,
                                          const at::Tensor& row_scale) {
  using A = typename Acc<T>::type;
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  const int64_t* tp = target.data_ptr<int64_t>();
  check_local_targets(tp, rows, valid, "cross_entropy_grad_from_stats");
  T* lp = logits.data_ptr<T>();
  const A* mp = row_max.data_ptr<A>();
  const A* scp = row_scale.data_ptr<A>();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      cross_entropy_grad_row<T, A>(lp + r * stride, n, valid, tp[r], mp[r], scp[r]);
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

void cross_entropy_unit_grad_cpu(at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                                 at::Tensor& loss) {
  dispatch_float16_or_wider(logits.scalar_type(), "cross_entropy_unit_grad", [&](auto t) {
    cross_entropy_unit_grad_kernel<decltype(t)>(logits, target, ignore_index, loss);
  });
}

void cross_entropy_partials_cpu(const at::Tensor& logits, const at::Tensor& target_local,
                                int64_t valid_columns, at::Tensor& stats) {
  dispatch_float16_or_wider(logits.scalar_type(), "cross_entropy_partials", [&](auto t) {
    cross_entropy_partials_kernel<decltype(t)>(logits, target_local, valid_columns, stats);
  });
}

void cross_entropy_grad_from_stats_cpu(at::Tensor& logits, const at::Tensor& target_local,
                                       int64_t valid_columns, const at::Tensor& row_max,
                                       const at::Tensor& row_scale) {
  dispatch_float16_or_wider(logits.scalar_type(), "cross_entropy_grad_from_stats", [&](auto t) {
    cross_entropy_grad_from_stats_kernel<decltype(t)>(logits, target_local, valid_columns, row_max,
                                                      row_scale);
  });
}

}  // namespace megallama_ops
