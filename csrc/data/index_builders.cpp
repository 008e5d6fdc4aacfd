// Index builders for GPT sample windows and weighted blends of datasets.
//
// Same outputs as megatron-core's helpers_cpp (build_sample_idx_int32/int64,
// build_blending_indices, build_exhaustive_blending_indices) for the same inputs, but every bad
// argument raises a Python exception instead of asserting, and the GIL is released while building.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>


// Blending must round exactly like megatron-core's build (a separate multiply and subtract): with
// -march=native GCC would otherwise fuse w * x - count into one FMA and break ties differently.
#pragma GCC optimize("fp-contract=off")

namespace py = pybind11;

namespace {

using ArrI32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using ArrF64 = py::array_t<double, py::array::c_style | py::array::forcecast>;

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

// Sample i starts at global token i * seq_length of the documents laid end to end in
// document_idx order (consecutive windows share one token when add_extra_token is 1). Megatron
// records that start as (position in document_idx, offset in that document); with an extra token
// the start lies in [doc start, doc end), without one in (doc start, doc end]: a window that ends
// exactly at a document's end is recorded as that document's end, not the next one's start.
//
// One pass over document_idx. The document lengths are gathered in shuffled order, so each read
// is a likely cache miss: prefetching a few documents ahead is what makes this faster than the
// plain walk. Returns the position of the first invalid document_idx entry, or -1.
constexpr int64_t kPrefetchDistance = 16;

template <typename T, int EXTRA>
int64_t walk_documents(const int32_t* sizes, int64_t n_sizes, const int32_t* doc_idx, int64_t n_docs,
                       int64_t seq_length, int64_t num_samples, T* out, int64_t* total_tokens) {
  int64_t s = 1, boundary = seq_length, pos = 0;
  for (int64_t k = 0; k < n_docs; ++k) {
    if (k + kPrefetchDistance < n_docs) {
      const uint32_t ahead = static_cast<uint32_t>(doc_idx[k + kPrefetchDistance]);
      if (ahead < static_cast<uint64_t>(n_sizes)) __builtin_prefetch(sizes + ahead);
    }
    const int32_t d = doc_idx[k];
    if (d < 0 || d >= n_sizes || sizes[d] < 0) return k;
    const int64_t end = pos + sizes[d];
    while (s <= num_samples && (EXTRA ? boundary < end : boundary <= end)) {
      out[2 * s] = static_cast<T>(k);
      out[2 * s + 1] = static_cast<T>(boundary - pos);
      ++s;
      boundary += seq_length;
    }
    pos = end;
  }
  *total_tokens = pos;
  return -1;
}

template <typename T>
py::array_t<T> build_sample_idx(const ArrI32& sizes_, const ArrI32& document_idx_, int64_t seq_length,
                                int64_t num_epochs, int64_t tokens_per_epoch, bool drop_last_partial_sequence,
                                int add_extra_token_to_sequence) {
  if (sizes_.ndim() != 1 || document_idx_.ndim() != 1) fail("sizes and document_idx must be 1-D arrays");
  if (seq_length < 2) fail("seq_length must be at least 2, got " + std::to_string(seq_length));
  if (num_epochs < 1) fail("num_epochs must be at least 1, got " + std::to_string(num_epochs));
  if (tokens_per_epoch < 2) fail("tokens_per_epoch must be at least 2, got " + std::to_string(tokens_per_epoch));
  if (add_extra_token_to_sequence != 0 && add_extra_token_to_sequence != 1)
    fail("add_extra_token_to_sequence must be 0 or 1");
  const int64_t n_sizes = sizes_.shape(0);
  const int64_t n_docs = document_idx_.shape(0);
  if (n_docs == 0) fail("document_idx is empty");
  if (n_docs > static_cast<int64_t>(std::numeric_limits<T>::max()))
    fail("document_idx has " + std::to_string(n_docs) + " entries, too many for this index dtype; use the int64 variant");
  const int32_t* sizes = sizes_.data();
  const int32_t* doc_idx = document_idx_.data();
  const int extra = add_extra_token_to_sequence;
  const int64_t total_requested = num_epochs * tokens_per_epoch - extra;
  const int64_t num_samples = drop_last_partial_sequence ? total_requested / seq_length
                                                         : (total_requested + seq_length - 1) / seq_length;
  if (num_samples < 0) fail("too few tokens for a single sample");

  py::array_t<T> result({num_samples + 1, static_cast<int64_t>(2)});
  T* out = result.mutable_data();
  std::string error;
  {
    py::gil_scoped_release release;
    int64_t total = 0;
    const int64_t bad = extra ? walk_documents<T, 1>(sizes, n_sizes, doc_idx, n_docs, seq_length, num_samples, out, &total)
                              : walk_documents<T, 0>(sizes, n_sizes, doc_idx, n_docs, seq_length, num_samples, out, &total);
    if (bad >= 0) {
      error = "document_idx[" + std::to_string(bad) + "] = " + std::to_string(doc_idx[bad]) +
              " is not a valid document (sizes has " + std::to_string(n_sizes) + " entries, all >= 0)";
    } else {
      out[0] = 0;
      out[1] = 0;
      // Only the last, partial sample may start past the documents, and only when it is kept.
      const int64_t last_full = extra ? (total - 1) / seq_length : total / seq_length;
      if (num_samples > last_full) {
        if (drop_last_partial_sequence || num_samples > last_full + 1) {
          error = "document_idx holds " + std::to_string(total) + " tokens, too few for " +
                  std::to_string(num_samples) + " samples of " + std::to_string(seq_length) +
                  " (num_epochs * tokens_per_epoch = " + std::to_string(num_epochs * tokens_per_epoch) + ")";
        } else {
          out[2 * num_samples] = static_cast<T>(n_docs - 1);
          out[2 * num_samples + 1] = static_cast<T>(sizes[doc_idx[n_docs - 1]] - extra);
        }
      }
    }
  }
  if (!error.empty()) fail(error);
  return result;
}

void check_weights(const ArrF64& weights) {
  if (weights.ndim() != 1 || weights.shape(0) == 0) fail("weights must be a non-empty 1-D array");
  if (weights.shape(0) > std::numeric_limits<int16_t>::max()) fail("at most 32767 datasets can be blended");
  for (int64_t d = 0; d < weights.shape(0); ++d) {
    const double w = weights.data()[d];
    if (!(w >= 0.0) || !std::isfinite(w)) fail("weights must be finite and non-negative; weights[" + std::to_string(d) + "] = " + std::to_string(w));
  }
}

// Position i goes to the dataset whose sample count lags its share the most: argmax over d of
// weights[d] * max(i, 1) - count[d], the first one on ties.
template <typename Counts>
void blend_greedy(const double* w, int n, Counts& count, int64_t size, int16_t* dataset_index,
                  int64_t* sample_index) {
  for (int64_t i = 0; i < size; ++i) {
    const double x = i > 1 ? static_cast<double>(i) : 1.0;
    int best = 0;
    double best_err = w[0] * x - count[0];
    for (int d = 1; d < n; ++d) {
      const double err = w[d] * x - count[d];
      if (err > best_err) {
        best_err = err;
        best = d;
      }
    }
    dataset_index[i] = static_cast<int16_t>(best);
    sample_index[i] = static_cast<int64_t>(count[best]);
    count[best] += 1.0;
  }
}

// A compile-time number of datasets lets the compiler unroll the inner loop and keep the counts
// in registers; the common mixtures (up to a dozen sources) take this path.
template <int N>
void blend_fixed(const double* w, int64_t size, int16_t* dataset_index, int64_t* sample_index) {
  std::array<double, N> count{};
  blend_greedy(w, N, count, size, dataset_index, sample_index);
}

void blend_any(const double* w, int n, int64_t size, int16_t* dataset_index, int64_t* sample_index) {
  std::vector<double> count(n, 0.0);
  blend_greedy(w, n, count, size, dataset_index, sample_index);
}

py::tuple build_blending_indices(const ArrF64& weights, int64_t size) {
  check_weights(weights);
  if (size < 0) fail("size must be >= 0, got " + std::to_string(size));
  const int n = static_cast<int>(weights.shape(0));
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> sample_index(size);
  const double* w = weights.data();
  int16_t* di = dataset_index.mutable_data();
  int64_t* si = sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    switch (n) {
#define MEGALLAMA_BLEND_CASE(K) \
  case K:                       \
    blend_fixed<K>(w, size, di, si); \
    break;
      MEGALLAMA_BLEND_CASE(1) MEGALLAMA_BLEND_CASE(2) MEGALLAMA_BLEND_CASE(3) MEGALLAMA_BLEND_CASE(4)
      MEGALLAMA_BLEND_CASE(5) MEGALLAMA_BLEND_CASE(6) MEGALLAMA_BLEND_CASE(7) MEGALLAMA_BLEND_CASE(8)
#undef MEGALLAMA_BLEND_CASE
      default:
        blend_any(w, n, size, di, si);
    }
  }
  return py::make_tuple(dataset_index, sample_index);
}

// Every dataset contributes exactly sizes[d] samples; the greedy choice runs over the datasets not
// yet exhausted, with weights proportional to sizes.
py::tuple build_exhaustive_blending_indices(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& sizes_) {
  if (sizes_.ndim() != 1 || sizes_.shape(0) == 0) fail("sizes must be a non-empty 1-D array");
  const int n = static_cast<int>(sizes_.shape(0));
  if (n > std::numeric_limits<int16_t>::max()) fail("at most 32767 datasets can be blended");
  const int64_t* sizes = sizes_.data();
  int64_t total = 0;
  for (int d = 0; d < n; ++d) {
    if (sizes[d] < 0) fail("sizes must be >= 0; sizes[" + std::to_string(d) + "] = " + std::to_string(sizes[d]));
    total += sizes[d];
  }
  if (total == 0) fail("sizes sum to zero: nothing to blend");
  py::array_t<int16_t> dataset_index(total);
  py::array_t<int64_t> sample_index(total);
  int16_t* di = dataset_index.mutable_data();
  int64_t* si = sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<double> w(n);
    std::vector<int64_t> count(n, 0);
    std::vector<int> live;
    for (int d = 0; d < n; ++d) {
      w[d] = static_cast<double>(sizes[d]) / static_cast<double>(total);
      if (sizes[d] > 0) live.push_back(d);
    }
    for (int64_t i = 0; i < total; ++i) {
      const double x = i > 1 ? static_cast<double>(i) : 1.0;
      int best_pos = 0;
      double best_err = std::numeric_limits<double>::lowest();
      for (size_t p = 0; p < live.size(); ++p) {
        const int d = live[p];
        const double err = w[d] * x - static_cast<double>(count[d]);
        if (err > best_err) {
          best_err = err;
          best_pos = static_cast<int>(p);
        }
      }
      const int best = live[best_pos];
      di[i] = static_cast<int16_t>(best);
      si[i] = count[best]++;
      if (count[best] == sizes[best]) live.erase(live.begin() + best_pos);
    }
  }
  return py::make_tuple(dataset_index, sample_index);
}

}  // namespace

void register_chunk_cache(py::module_& m);  // chunk_cache.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "GPT sample index and blending index builders (Megatron-compatible outputs), tokenizer chunk cache";
  register_chunk_cache(m);
  m.def("build_sample_idx_int32", &build_sample_idx<int32_t>, py::arg("sizes"), py::arg("document_idx"),
        py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("drop_last_partial_sequence") = true, py::arg("add_extra_token_to_sequence") = 1);
  m.def("build_sample_idx_int64", &build_sample_idx<int64_t>, py::arg("sizes"), py::arg("document_idx"),
        py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("drop_last_partial_sequence") = true, py::arg("add_extra_token_to_sequence") = 1);
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "Returns (dataset_index int16[size], dataset_sample_index int64[size]).");
  m.def("build_exhaustive_blending_indices", &build_exhaustive_blending_indices, py::arg("sizes"),
        "Returns (dataset_index int16[sum(sizes)], dataset_sample_index int64[sum(sizes)]).");
}
