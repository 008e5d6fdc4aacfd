// Exact memo of SentencePiece ids per whitespace chunk, for fast batch tokenization.
//
// SentencePiece's BPE splits the normalized text into words before merging, and no piece crosses a
// word boundary; a space that follows a non-space always starts a new word. A "barrier" character
// (one that no multi-character piece contains, such as a newline in LLaMA's vocabulary) never
// merges with its neighbours either, so a word can also be cut just before a run of barriers.
// Cutting the raw text at those places gives chunks whose ids, concatenated, are the ids of the
// whole text (a chunk starting with a barrier is encoded as the inside of a word). Natural text repeats a small set of chunks, so each is tokenized once: a batch is
// scanned here, the chunks not seen before are handed back to Python for SentencePiece, and
// finish() assembles the ids. Only valid for models that leave spaces alone (identity
// normalization, no whitespace collapsing); the Python side checks that.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <algorithm>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

using ArrI32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using ArrI64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// U+2581, the character SentencePiece writes for a space; a literal one in the text counts as a space.
inline size_t space_len(const char* p, const char* end) {
  if (*p == ' ') return 1;
  if (end - p >= 3 && static_cast<unsigned char>(p[0]) == 0xE2 && static_cast<unsigned char>(p[1]) == 0x96 &&
      static_cast<unsigned char>(p[2]) == 0x81)
    return 3;
  return 0;
}

std::string_view utf8_of(const py::handle& obj) {
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj.ptr(), &size);
  if (data == nullptr) throw py::error_already_set();
  return std::string_view(data, static_cast<size_t>(size));
}

class ChunkCache {
 public:
  ChunkCache(bool dummy_prefix, int64_t max_entries, const std::string& barriers)
      : dummy_prefix_(dummy_prefix), max_entries_(max_entries) {
    if (max_entries < 1) throw py::value_error("max_entries must be >= 1");
    for (const char c : barriers) {
      if (static_cast<unsigned char>(c) >= 0x80 || c == ' ') throw py::value_error("barrier characters must be ASCII, not space");
      barrier_[static_cast<unsigned char>(c)] = true;
    }
  }

  // Scans a batch of texts; returns the distinct chunks (as keys) that are not cached yet. With a
  // dummy prefix the first chunk's key gets the space SentencePiece adds in front of the text.
  py::list scan(const py::list& texts) {
    if (pending_) throw py::value_error("scan() called twice without finish()");
    if (static_cast<int64_t>(index_.size()) >= max_entries_) clear();
    segments_.clear();
    doc_segments_.clear();
    miss_keys_.clear();
    miss_index_.clear();
    std::string first_key;
    for (const py::handle& item : texts) {
      if (!PyUnicode_Check(item.ptr())) throw py::type_error("texts must be a list of str");
      const std::string_view text = utf8_of(item);
      const char* p = text.data();
      const char* end = p + text.size();
      int64_t nseg = 0;
      const char* start = p;
      bool prev_space = true;  // no boundary before the first character
      bool prev_barrier = true;
      while (p < end) {
        const size_t sl = space_len(p, end);
        const bool barrier = barrier_[static_cast<unsigned char>(*p)];
        if (p > start && ((sl && !prev_space) || (barrier && !prev_barrier))) {
          add_segment(start, p, nseg == 0, first_key);
          ++nseg;
          start = p;
        }
        prev_space = sl != 0;
        prev_barrier = barrier;
        p += sl ? sl : 1;
      }
      if (end > start) {
        add_segment(start, end, nseg == 0, first_key);
        ++nseg;
      }
      doc_segments_.push_back(nseg);
    }
    pending_ = true;
    py::list out;
    for (const auto& k : miss_keys_) out.append(py::str(k.data(), k.size()));
    return out;
  }

  // key_ids holds SentencePiece's ids for the keys scan() returned, back to back, key i having
  // key_lengths[i] of them. Returns (flat int32 ids, int64 per-text counts), appending append_id
  // after every text when it is >= 0.
  py::tuple finish(const ArrI32& key_ids, const ArrI64& key_lengths, int64_t append_id) {
    if (!pending_) throw py::value_error("finish() called without scan()");
    pending_ = false;
    if (key_lengths.ndim() != 1 || static_cast<size_t>(key_lengths.shape(0)) != miss_keys_.size())
      throw py::value_error("finish() got " + std::to_string(key_lengths.size()) + " id counts for " +
                            std::to_string(miss_keys_.size()) + " chunks");
    const int32_t* kid = key_ids.data();
    const int64_t* klen = key_lengths.data();
    std::vector<int64_t> miss_offset(miss_keys_.size() + 1, 0);
    for (size_t i = 0; i < miss_keys_.size(); ++i) {
      if (klen[i] < 0) throw py::value_error("negative id count");
      miss_offset[i + 1] = miss_offset[i] + klen[i];
    }
    if (miss_offset.back() != key_ids.size())
      throw py::value_error("finish() got " + std::to_string(key_ids.size()) + " ids, the counts sum to " +
                            std::to_string(miss_offset.back()));
    // Cache the new chunks while there is room, so repeated chunks hit next time.
    for (size_t i = 0; i < miss_keys_.size() && static_cast<int64_t>(index_.size()) < max_entries_; ++i)
      insert(miss_keys_[i], kid + miss_offset[i], klen[i]);
    int64_t total = 0;
    for (const int64_t s : segments_) total += s >= 0 ? entries_[s].len : klen[-s - 1];
    total += append_id >= 0 ? static_cast<int64_t>(doc_segments_.size()) : 0;
    py::array_t<int32_t> flat(total);
    py::array_t<int64_t> counts(static_cast<int64_t>(doc_segments_.size()));
    int32_t* out = flat.mutable_data();
    int64_t* cnt = counts.mutable_data();
    size_t seg = 0;
    for (size_t d = 0; d < doc_segments_.size(); ++d) {
      int32_t* doc_start = out;
      for (int64_t k = 0; k < doc_segments_[d]; ++k, ++seg) {
        const int64_t s = segments_[seg];
        if (s >= 0) {
          const Entry& e = entries_[s];
          std::memcpy(out, values_.data() + e.offset, e.len * sizeof(int32_t));
          out += e.len;
        } else {
          std::memcpy(out, kid + miss_offset[-s - 1], klen[-s - 1] * sizeof(int32_t));
          out += klen[-s - 1];
        }
      }
      if (append_id >= 0) *out++ = static_cast<int32_t>(append_id);
      cnt[d] = out - doc_start;
    }
    return py::make_tuple(flat, counts);
  }

  int64_t size() const { return static_cast<int64_t>(index_.size()); }

  void clear() {
    index_.clear();
    entries_.clear();
    values_.clear();
    arena_.clear();
    arena_used_ = kBlock;
  }

 private:
  struct Entry {
    int64_t offset;
    int64_t len;
  };
  static constexpr size_t kBlock = 1 << 20;

  void add_segment(const char* a, const char* b, bool first, std::string& first_key) {
    std::string_view key(a, static_cast<size_t>(b - a));
    if (first && dummy_prefix_) {
      first_key.assign(1, ' ');
      first_key.append(key);
      key = first_key;
    }
    auto it = index_.find(key);
    if (it != index_.end()) {
      segments_.push_back(it->second);
      return;
    }
    auto m = miss_index_.find(std::string(key));
    if (m == miss_index_.end()) {
      m = miss_index_.emplace(std::string(key), static_cast<int64_t>(miss_keys_.size())).first;
      miss_keys_.emplace_back(key);
    }
    segments_.push_back(-(m->second + 1));
  }

  // Copies the key into stable storage (the index holds views) and records its ids.
  void insert(const std::string& key, const int32_t* ids, int64_t n) {
    const auto found = index_.find(std::string_view(key));
    if (found != index_.end()) return;
    if (arena_used_ + key.size() > kBlock || arena_.empty()) {
      arena_.emplace_back(new char[std::max(kBlock, key.size())]);
      arena_used_ = 0;
    }
    char* dst = arena_.back().get() + arena_used_;
    std::memcpy(dst, key.data(), key.size());
    arena_used_ += key.size();
    const int64_t id = static_cast<int64_t>(entries_.size());
    entries_.push_back({static_cast<int64_t>(values_.size()), n});
    values_.insert(values_.end(), ids, ids + n);
    index_.emplace(std::string_view(dst, key.size()), id);
  }

  bool dummy_prefix_;
  int64_t max_entries_;
  bool barrier_[256] = {};
  bool pending_ = false;
  std::unordered_map<std::string_view, int64_t> index_;
  std::vector<Entry> entries_;
  std::vector<int32_t> values_;
  std::vector<std::unique_ptr<char[]>> arena_;
  size_t arena_used_ = kBlock;
  // State of the batch between scan() and finish(): per segment an entry id (>= 0) or -(miss + 1).
  std::vector<int64_t> segments_;
  std::vector<int64_t> doc_segments_;
  std::vector<std::string> miss_keys_;
  std::unordered_map<std::string, int64_t> miss_index_;
};

}  // namespace

void register_chunk_cache(py::module_& m) {
  py::class_<ChunkCache>(m, "ChunkCache", "Exact per-whitespace-chunk memo of SentencePiece ids")
      .def(py::init<bool, int64_t, const std::string&>(), py::arg("dummy_prefix"), py::arg("max_entries") = 1 << 22,
           py::arg("barriers") = "")
      .def("scan", &ChunkCache::scan, py::arg("texts"))
      .def("finish", &ChunkCache::finish, py::arg("key_ids"), py::arg("key_lengths"), py::arg("append_id") = -1)
      .def("clear", &ChunkCache::clear)
      .def("__len__", &ChunkCache::size);
}
