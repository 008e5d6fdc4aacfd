// Python entry points of megallama._ops: argument checks, output allocation, and dispatch to the
// CPU kernels or (when built with MEGALLAMA_WITH_CUDA) the CUDA kernels.
#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <atomic>
#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace megallama_ops {
namespace {

enum class Backend { kCpu, kCuda };

Backend backend_of(const at::Tensor& t, const char* op) {
  if (t.device().is_cpu()) return Backend::kCpu;
  if (t.device().is_cuda()) {
#ifdef MEGALLAMA_WITH_CUDA
    return Backend::kCuda;
#else
    TORCH_CHECK(false, op, ": got a CUDA tensor but megallama._ops was built without CUDA kernels "
                "(use megallama.ops, which falls back to plain torch, or rebuild with a CUDA toolkit)");
#endif
  }
  TORCH_CHECK(false, op, ": unsupported device ", t.device(), " (CPU or CUDA tensors only)");
}

std::vector<int64_t> row_shape(const at::Tensor& t) {
  return std::vector<int64_t>(t.sizes().begin(), t.sizes().end() - 1);
}

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> shape = row_shape(t);
  shape.push_back(last);
  return shape;
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                const char* name_b) {
  check_same_device(a, b, op, name_a, name_b);
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", name_a, " has shape ", a.sizes(), " but ", name_b,
              " has shape ", b.sizes(), "; they must be equal");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " is ", a.scalar_type(),
              " but ", name_b, " is ", b.scalar_type(), "; they must have the same dtype");
}

void check_weight(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_same_device(x, weight, op, "x", "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must have shape [",
              x.size(-1), "] (the last dim of x, shape ", x.sizes(), "), got ", weight.sizes());
  check_float_dtype(weight, op, "weight");
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                double eps) {
  const char* op = "rms_norm_fwd";
  check_rows_tensor(x, op, "x");
  TORCH_CHECK(x.size(-1) > 0, op, ": the normalised (last) dimension of x is empty");
  check_weight(x, weight, op);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor rstd = at::empty(row_shape(x), x.options().dtype(acc_dtype(x.scalar_type())));
  if (backend_of(x, op) == Backend::kCpu) {
    rms_norm_fwd_cpu(x, weight, eps, y, rstd);
  } else {
#ifdef MEGALLAMA_WITH_CUDA
    rms_norm_fwd_cuda(x, weight, eps, y, rstd);
#endif
  }
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& rstd) {
  const char* op = "rms_norm_bwd";
  check_rows_tensor(x, op, "x");
  check_rows_tensor(grad_y, op, "grad_y");
  TORCH_CHECK(x.size(-1) > 0, op, ": the normalised (last) dimension of x is empty");
  check_same(grad_y, x, op, "grad_y", "x");
  check_weight(x, weight, op);
  check_same_device(x, rstd, op, "x", "rstd");
  TORCH_CHECK(rstd.sizes() == at::IntArrayRef(row_shape(x)), op, ": rstd must have shape ",
              at::IntArrayRef(row_shape(x)), " (x's shape without its last dim), got ",
              rstd.sizes());
  TORCH_CHECK(rstd.scalar_type() == acc_dtype(x.scalar_type()), op, ": rstd must be ",
              acc_dtype(x.scalar_type()), " for a ", x.scalar_type(), " input (as rms_norm_fwd "
              "returns it), got ", rstd.scalar_type());
  TORCH_CHECK(rstd.is_contiguous(), op, ": rstd must be contiguous");
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_w = at::empty({x.size(-1)}, rstd.options());
  if (backend_of(x, op) == Backend::kCpu) {
    rms_norm_bwd_cpu(grad_y, x, weight, rstd, grad_x, grad_w);
  } else {
#ifdef MEGALLAMA_WITH_CUDA
    rms_norm_bwd_cuda(grad_y, x, weight, rstd, grad_x, grad_w);
#endif
  }
  return {grad_x, grad_w.to(weight.scalar_type())};
}

// The packed tensor ab [..., 2f] holds a in its first f columns and b in its last f (the model's
// w13 output); the kernels read the two halves as strided views.
int64_t packed_half(const at::Tensor& ab, const char* op) {
  check_rows_tensor(ab, op, "ab");
  TORCH_CHECK(ab.size(-1) % 2 == 0, op, ": the last dim of the packed tensor ab holds [a, b] and "
              "must be even, got shape ", ab.sizes());
  return ab.size(-1) / 2;
}

at::Tensor swiglu_fwd(const at::Tensor& ab) {
  const char* op = "swiglu_fwd";
  const int64_t f = packed_half(ab, op);
  const at::Tensor a = ab.narrow(-1, 0, f), b = ab.narrow(-1, f, f);
  at::Tensor out = at::empty(a.sizes(), a.options());
  if (out.numel() == 0) return out;
  if (backend_of(ab, op) == Backend::kCpu) {
    swiglu_fwd_cpu(a, b, out);
  } else {
#ifdef MEGALLAMA_WITH_CUDA
    swiglu_fwd_cuda(a, b, out);
#endif
  }
  return out;
}

at::Tensor swiglu_bwd(const at::Tensor& grad_out, const at::Tensor& ab) {
  const char* op = "swiglu_bwd";
  const int64_t f = packed_half(ab, op);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(with_last(ab, f)), op, ": grad_out must have "
              "shape ", at::IntArrayRef(with_last(ab, f)), " (ab's with its last dim halved), got ",
              grad_out.sizes());
  check_rows_tensor(grad_out, op, "grad_out");
  const at::Tensor a = ab.narrow(-1, 0, f), b = ab.narrow(-1, f, f);
  check_same(grad_out, a, op, "grad_out", "a");
  at::Tensor grad_ab = at::empty(ab.sizes(), ab.options());
  if (grad_ab.numel() == 0) return grad_ab;
  at::Tensor grad_a = grad_ab.narrow(-1, 0, f), grad_b = grad_ab.narrow(-1, f, f);
  if (backend_of(ab, op) == Backend::kCpu) {
    swiglu_bwd_cpu(grad_out, a, b, grad_a, grad_b);
  } else {
#ifdef MEGALLAMA_WITH_CUDA
    swiglu_bwd_cuda(grad_out, a, b, grad_a, grad_b);
#endif
  }
  return grad_ab;
}

void rope_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor out,
                bool inverse) {
  const char* op = "rope_apply";
  TORCH_CHECK(x.defined() && x.dim() == 4, op, ": x must be 4-D [batch, seq, heads, head_dim], got ",
              x.defined() ? x.sizes() : at::IntArrayRef{});
  check_rows_tensor(x, op, "x");
  check_rows_tensor(out, op, "out");
  check_same(out, x, op, "out", "x");
  const int64_t s = x.size(1), d = x.size(3);
  TORCH_CHECK(d % 2 == 0, op, ": head_dim must be even for rotate-half pairs, got ", d);
  for (const auto* t : {&cos, &sin}) {
    const char* name = t == &cos ? "cos" : "sin";
    check_same_device(x, *t, op, "x", name);
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                t->scalar_type());
    TORCH_CHECK(t->dim() == 2 && t->size(0) == s && t->size(1) == d / 2, op, ": ", name,
                " must have shape [seq, head_dim/2] = [", s, ", ", d / 2, "], got ", t->sizes());
    TORCH_CHECK(t->size(1) <= 1 || t->stride(1) == 1, op, ": ", name,
                " must be contiguous in its last dimension");
  }
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, x);
  if (x.numel() == 0) return;
  if (backend_of(x, op) == Backend::kCpu) {
    rope_cpu(x, cos, sin, out, inverse);
  } else {
#ifdef MEGALLAMA_WITH_CUDA
    rope_cuda(x, cos, sin, out, inverse);
#endif
  }
}

// The two ops below also take float16 (a float16 model's logits and gradients).
void check_float16_or_wider(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": ", name, " must be float32, float64, bfloat16 or float16, got ", st);
}

void check_matrix(const at::Tensor& t, const char* op, const char* name, const char* shape) {
  TORCH_CHECK(t.defined() && t.dim() == 2, op, ": ", name, " must be 2-D ", shape, ", got shape ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  check_float16_or_wider(t, op, name);
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, " must be contiguous in its last "
              "dimension (stride 1), got shape ", t.sizes(), " with strides ", t.strides(),
              "; rows may be strided but not the elements of a row");
}

void check_target(const at::Tensor& logits, const at::Tensor& target, const char* op, const char* name) {
  TORCH_CHECK(target.defined() && target.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
              target.defined() ? target.scalar_type() : at::ScalarType::Undefined);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op, ": ", name, " must have shape [",
              logits.size(0), "] (one class per row of logits, shape ", logits.sizes(), "), got ",
              target.sizes());
  check_same_device(logits, target, op, "logits", name);
}

// In place: logits becomes the gradient of the per-row loss for a unit upstream gradient.
at::Tensor cross_entropy_unit_grad(at::Tensor logits, const at::Tensor& target, int64_t ignore_index) {
  const char* op = "cross_entropy_unit_grad";
  check_matrix(logits, op, "logits", "[tokens, classes]");
  TORCH_CHECK(logits.size(1) > 0, op, ": logits has no classes (its last dimension is empty)");
  check_target(logits, target, op, "target");
  at::assert_no_internal_overlap(logits);
  const at::Tensor tgt = target.contiguous();
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  if (logits.size(0) == 0) return loss;
  if (backend_of(logits, op) == Backend::kCpu) {
    cross_entropy_unit_grad_cpu(logits, tgt, ignore_index, loss);
  } else {
#ifdef MEGALLAMA_WITH_CUDA
    cross_entropy_unit_grad_cuda(logits, tgt, ignore_index, loss);
#endif
  }
  return loss;
}

// The checks shared by the two vocabulary-parallel phases below.
void check_local_logits(const at::Tensor& logits, const at::Tensor& target_local, int64_t valid_columns,
                        const char* op) {
  check_matrix(logits, op, "logits", "[tokens, local classes]");
  check_target(logits, target_local, op, "target_local");
  TORCH_CHECK(valid_columns >= 0 && valid_columns <= logits.size(1), op, ": valid_columns must lie in [0, ",
              logits.size(1), "] (logits has shape ", logits.sizes(), "), got ", valid_columns);
}

// Phase 1 of the cross-entropy over vocabulary-parallel logits: per row statistics of this rank's
// columns, which the caller all-reduces (max of maxes, sums rescaled to it, target logits added).
at::Tensor cross_entropy_partials(const at::Tensor& logits, const at::Tensor& target_local,
                                  int64_t valid_columns) {
  const char* op = "cross_entropy_partials";
  check_local_logits(logits, target_local, valid_columns, op);
  const at::Tensor tgt = target_local.contiguous();
  at::Tensor stats = at::empty({logits.size(0), 3}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  if (logits.size(0) == 0) return stats;
  if (backend_of(logits, op) == Backend::kCpu) {
    cross_entropy_partials_cpu(logits, tgt, valid_columns, stats);
  } else {
#ifdef MEGALLAMA_WITH_CUDA
    cross_entropy_partials_cuda(logits, tgt, valid_columns, stats);
#endif
  }
  return stats;
}

// Phase 2, in place: this rank's columns of the unit gradient from the all-reduced row statistics.
void cross_entropy_grad_from_stats(at::Tensor logits, const at::Tensor& target_local, int64_t valid_columns,
                                   const at::Tensor& row_max, const at::Tensor& row_scale) {
  const char* op = "cross_entropy_grad_from_stats";
  check_local_logits(logits, target_local, valid_columns, op);
  const auto acc = acc_dtype(logits.scalar_type());
  for (const auto* t : {&row_max, &row_scale}) {
    const char* name = t == &row_max ? "row_max" : "row_scale";
    TORCH_CHECK(t->defined() && t->dim() == 1 && t->size(0) == logits.size(0), op, ": ", name,
                " must have shape [", logits.size(0), "] (one value per row of logits), got ",
                t->defined() ? t->sizes() : at::IntArrayRef{});
    TORCH_CHECK(t->scalar_type() == acc, op, ": ", name, " must be ", acc, " for ", logits.scalar_type(),
                " logits, got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
    check_same_device(logits, *t, op, "logits", name);
    at::assert_no_overlap(logits, *t);
  }
  at::assert_no_internal_overlap(logits);
  const at::Tensor tgt = target_local.contiguous();
  if (logits.numel() == 0) return;
  if (backend_of(logits, op) == Backend::kCpu) {
    cross_entropy_grad_from_stats_cpu(logits, tgt, valid_columns, row_max, row_scale);
  } else {
#ifdef MEGALLAMA_WITH_CUDA
    cross_entropy_grad_from_stats_cuda(logits, tgt, valid_columns, row_max, row_scale);
#endif
  }
}

// addmm with an fp32 output from 16-bit matrices (CUDA; torch >= 2.8): the product is accumulated into
// an fp32 buffer by the GEMM itself. Through the dispatcher, so no cuBLAS header or symbol is needed.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define MEGALLAMA_HAS_FP32_OUTPUT_ADDMM 1
std::atomic<bool> fp32_output_addmm_usable{true};
#endif

// main_grad += grad_out^T @ x. Same dtypes: addmm_. 16-bit inputs into an fp32 main_grad: off the CPU
// (CUDA; meta for shape checks) the fp32-output addmm where torch has it, else a 16-bit product is added.
void wgrad_accumulate(at::Tensor main_grad, const at::Tensor& grad_out, const at::Tensor& x) {
  const char* op = "wgrad_accumulate";
  check_matrix(grad_out, op, "grad_out", "[tokens, out]");
  check_matrix(x, op, "x", "[tokens, in]");
  check_same_device(grad_out, x, op, "grad_out", "x");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out is ", grad_out.scalar_type(),
              " but x is ", x.scalar_type(), "; they must have the same dtype");
  TORCH_CHECK(grad_out.size(0) == x.size(0), op, ": grad_out (shape ", grad_out.sizes(), ") and x (shape ",
              x.sizes(), ") must have the same number of rows (tokens)");
  TORCH_CHECK(main_grad.defined(), op, ": main_grad is undefined");
  check_same_device(main_grad, x, op, "main_grad", "x");
  TORCH_CHECK(main_grad.dim() == 2 && main_grad.size(0) == grad_out.size(1) && main_grad.size(1) == x.size(1),
              op, ": main_grad must have shape [out, in] = [", grad_out.size(1), ", ", x.size(1), "], got ",
              main_grad.sizes());
  TORCH_CHECK(main_grad.scalar_type() == at::kFloat || main_grad.scalar_type() == x.scalar_type(), op,
              ": main_grad must be float32 or the inputs' dtype (", x.scalar_type(), "), got ",
              main_grad.scalar_type());
  TORCH_CHECK(main_grad.is_contiguous(), op, ": main_grad must be contiguous");
  at::assert_no_overlap(main_grad, grad_out);
  at::assert_no_overlap(main_grad, x);
  if (main_grad.scalar_type() == x.scalar_type()) {
    main_grad.addmm_(grad_out.t(), x);
    return;
  }
#ifdef MEGALLAMA_HAS_FP32_OUTPUT_ADDMM
  if (fp32_output_addmm_usable && !x.is_cpu() &&
      (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf)) {
    try {
      at::addmm_out(main_grad, main_grad, grad_out.t(), x, at::kFloat);
      return;
    } catch (const c10::Error& error) {
      // A torch whose checks refuse this mix (raised before any kernel runs, main_grad untouched):
      // training goes on unfused rather than stopping.
      fp32_output_addmm_usable = false;
      TORCH_WARN(op, ": torch's fp32-output addmm refused 16-bit inputs into a float32 main_grad (",
                 error.what_without_backtrace(), "); adding 16-bit products instead");
    }
  }
#endif
  main_grad.add_(at::mm(grad_out.t(), x));
}

bool has_fp32_wgrad_gemm() {
#ifdef MEGALLAMA_HAS_FP32_OUTPUT_ADDMM
  return fp32_output_addmm_usable;
#else
  return false;
#endif
}

bool has_cuda() {
#ifdef MEGALLAMA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace megallama_ops

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace megallama_ops;
  m.doc() = "megallama fused ops: RMSNorm, SwiGLU, rotary embedding, cross-entropy unit gradient "
            "(whole or vocabulary-parallel), "
            "weight-gradient accumulation (CPU, and CUDA when built)";
  m.def("rms_norm_fwd", &rms_norm_fwd, "(x [..., h], weight [h], eps) -> (y, rstd [...])",
        py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("rms_norm_bwd", &rms_norm_bwd,
        "(grad_y, x, weight, rstd) -> (grad_x, grad_weight in weight's dtype)", py::arg("grad_y"),
        py::arg("x"), py::arg("weight"), py::arg("rstd"));
  m.def("swiglu_fwd", &swiglu_fwd, "(ab [..., 2f]) -> silu(a) * b [..., f]", py::arg("ab"));
  m.def("swiglu_bwd", &swiglu_bwd, "(grad_out [..., f], ab [..., 2f]) -> grad_ab [..., 2f]",
        py::arg("grad_out"), py::arg("ab"));
  m.def("rope_apply", &rope_apply,
        "(x [b, s, h, d], cos [s, d/2], sin [s, d/2], out [b, s, h, d], inverse): writes into out "
        "the rotate-half rotation of x by +theta (or -theta when inverse)",
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("out"), py::arg("inverse"));
  m.def("cross_entropy_unit_grad", &cross_entropy_unit_grad,
        "(logits [T, V], target int64 [T], ignore_index) -> loss [T] (float32; float64 for float64 "
        "logits): overwrites logits with softmax(logits) - onehot(target), zero rows where ignored",
        py::arg("logits"), py::arg("target"), py::arg("ignore_index"));
  m.def("cross_entropy_partials", &cross_entropy_partials,
        "(logits [T, Vl], target_local int64 [T], valid_columns) -> stats [T, 3] (float32; float64 "
        "for float64 logits): per row max and sum of exp(l - max) over columns [0, valid_columns), "
        "and l[target_local] (0 where target_local is -1)",
        py::arg("logits"), py::arg("target_local"), py::arg("valid_columns"));
  m.def("cross_entropy_grad_from_stats", &cross_entropy_grad_from_stats,
        "(logits [T, Vl], target_local int64 [T], valid_columns, row_max [T], row_scale [T]): "
        "overwrites logits with exp(l - row_max) * row_scale - onehot(target_local), zero from "
        "valid_columns on",
        py::arg("logits"), py::arg("target_local"), py::arg("valid_columns"), py::arg("row_max"),
        py::arg("row_scale"));
  m.def("wgrad_accumulate", &wgrad_accumulate,
        "(main_grad [out, in], grad_out [T, out], x [T, in]): main_grad += grad_out^T @ x",
        py::arg("main_grad"), py::arg("grad_out"), py::arg("x"));
  m.def("has_fp32_wgrad_gemm", &has_fp32_wgrad_gemm,
        "whether wgrad_accumulate adds 16-bit CUDA products straight into an fp32 main_grad (fp32-output addmm)");
  m.def("has_cuda", &has_cuda, "whether this build has the CUDA kernels");
}
