// Shared by the CPU and CUDA kernels of megallama._ops: input checks and the row indexer that lets
// every kernel read rows of strided views (e.g. one half of a packed matmul output) without copies.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace megallama_ops {

constexpr int kMaxRowDims = 8;

// Maps a flat row number to the element offset of that row, for a tensor whose last dimension is
// contiguous and whose leading dimensions have arbitrary strides. Leading dimensions that are laid
// out one after the other are collapsed, so the usual case (ndim == 1) costs one multiply.
struct RowIndexer {
  int ndim;
  int64_t sizes[kMaxRowDims];
  int64_t strides[kMaxRowDims];

  C10_HOST_DEVICE int64_t offset(int64_t row) const {
    if (ndim == 1) return row * strides[0];
    int64_t off = 0;
    for (int i = ndim - 1; i >= 0; --i) {
      off += (row % sizes[i]) * strides[i];
      row /= sizes[i];
    }
    return off;
  }
};

// Rows are all dimensions but the last.
inline RowIndexer make_row_indexer(const at::Tensor& t) {
  RowIndexer ri;
  ri.ndim = 0;
  // Walk from the innermost leading dim outwards, merging a dim into the previous one when
  // stride[i] == stride[i+1] * size[i+1] (the two dims are one run of rows).
  int64_t merged_sizes[64];
  int64_t merged_strides[64];
  int n = 0;
  for (int64_t d = t.dim() - 2; d >= 0; --d) {
    const int64_t size = t.size(d), stride = t.stride(d);
    if (size == 1) continue;
    if (n > 0 && stride == merged_strides[n - 1] * merged_sizes[n - 1]) {
      merged_sizes[n - 1] *= size;
    } else {
      TORCH_CHECK(n < 64, "megallama._ops: too many dimensions");
      merged_sizes[n] = size;
      merged_strides[n] = stride;
      ++n;
    }
  }
  if (n == 0) {
    ri.ndim = 1;
    ri.sizes[0] = 1;
    ri.strides[0] = 0;
    return ri;
  }
  TORCH_CHECK(n <= kMaxRowDims, "megallama._ops: the leading dimensions of a tensor of shape ",
              t.sizes(), " with strides ", t.strides(), " cannot be collapsed to at most ",
              kMaxRowDims, " row dimensions; pass a contiguous tensor");
  ri.ndim = n;
  for (int i = 0; i < n; ++i) {  // outermost first
    ri.sizes[i] = merged_sizes[n - 1 - i];
    ri.strides[i] = merged_strides[n - 1 - i];
  }
  return ri;
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op, ": ", name,
              " must be float32, float64 or bfloat16, got ", st);
}

inline void check_rows_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least one dimension, got a scalar");
  check_float_dtype(t, op, name);
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must be contiguous in its last dimension (stride 1), got shape ", t.sizes(),
              " with strides ", t.strides(), "; rows may be strided but not the elements of a row");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ", name_b,
              " is on ", b.device());
}

// Accumulation type: fp32 for fp32/bf16 inputs, fp64 for fp64 (used by gradcheck).
inline at::ScalarType acc_dtype(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// The same as a C++ type, for the kernels (CPU and CUDA).
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// Calls f(T{}, W{}) for the supported (input, weight) dtype pairs.
template <typename F>
inline void dispatch_x_weight(const at::Tensor& x, const at::Tensor& weight, const char* op, F&& f) {
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

}  // namespace megallama_ops
