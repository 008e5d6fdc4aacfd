// Kernel launchers of megallama._ops. binding.cpp checks the arguments and allocates the outputs;
// these only compute. Every tensor argument has been checked: float dtypes, last-dim stride 1,
// matching shapes; outputs may be strided views (rows located through RowIndexer).
#pragma once

#include <ATen/ATen.h>

namespace megallama_ops {

// y = x * rstd * weight; rstd (accumulation dtype, one per row) = 1 / sqrt(mean(x^2) + eps).
void rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& y,
                      at::Tensor& rstd);
// grad_weight: accumulation dtype, contiguous [h].
void rms_norm_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& grad_weight);
// out = silu(a) * b
void swiglu_fwd_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& out);
void swiglu_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b,
                    at::Tensor& grad_a, at::Tensor& grad_b);
// x, out: [b, s, h, d]; cos, sin: float32 [s, d/2]. Rotate-half pairs (i, i + d/2).
void rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out,
              bool inverse);
// logits [T, V] (also float16; row stride free) is overwritten with softmax - onehot(target), or
// zeros where target == ignore_index; loss [T] (accumulation dtype) gets logsumexp - l[target], or
// 0. target: contiguous int64 [T].
void cross_entropy_unit_grad_cpu(at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                                 at::Tensor& loss);
// The same for logits [T, Vl] split along the vocabulary (the caller all-reduces in between). Only
// columns [0, valid_columns) take part; target_local (contiguous int64 [T]) is a column among them,
// or -1. Partials: stats (accumulation dtype, contiguous [T, 3]) gets per row (max, sum of
// exp(l - max), l[target_local] or 0); max -inf and sum 0 when no column counts.
void cross_entropy_partials_cpu(const at::Tensor& logits, const at::Tensor& target_local,
                                int64_t valid_columns, at::Tensor& stats);
// In place: valid columns become exp(l - row_max) * row_scale - onehot(target_local), the others 0;
// a row_scale of 0 leaves only the -onehot. row_max, row_scale: accumulation dtype, contiguous [T].
void cross_entropy_grad_from_stats_cpu(at::Tensor& logits, const at::Tensor& target_local,
                                       int64_t valid_columns, const at::Tensor& row_max,
                                       const at::Tensor& row_scale);

#ifdef MEGALLAMA_WITH_CUDA
void rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& y,
                       at::Tensor& rstd);
void rms_norm_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& grad_weight);
void swiglu_fwd_cuda(const at::Tensor& a, const at::Tensor& b, at::Tensor& out);
void swiglu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b,
                     at::Tensor& grad_a, at::Tensor& grad_b);
void rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out,
               bool inverse);
void cross_entropy_unit_grad_cuda(at::Tensor& logits, const at::Tensor& target,
                                  int64_t ignore_index, at::Tensor& loss);
void cross_entropy_partials_cuda(const at::Tensor& logits, const at::Tensor& target_local,
                                 int64_t valid_columns, at::Tensor& stats);
void cross_entropy_grad_from_stats_cuda(at::Tensor& logits, const at::Tensor& target_local,
                                        int64_t valid_columns, const at::Tensor& row_max,
                                        const at::Tensor& row_scale);
#endif

}  // namespace megallama_ops
