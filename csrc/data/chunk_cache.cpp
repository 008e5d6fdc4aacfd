// Exact memo of SentencePiece ids per whitespace chunk, for fast batch tokenization.
//
// SentencePiece's BPE splits the normalized text into words before merging, and no piece crosses a
// word boundary; a space that follows a non-space always starts a new word. A "barrier" character
// (one that no multi-character piece contains, such as a newline in LLaMA's vocabulary) never
// merges with its neighbours either, so a word can also be cut just before a run of barriers.
// Cutting the raw text at those places gives chunks whose ids, concatenated, are the ids of the
// whole text (a chunk starting with a barrier is encoded as the inside of a word).
//
// Natural text repeats a small set of chunks, so each is tokenized once: scan() splits a batch
// and hands back the chunks not seen before, Python runs SentencePiece on those, and finish()
// assembles every text's ids. Only valid for models that leave spaces alone (identity
// normalization, no whitespace collapsing); the Python side checks that.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
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

inline uint64_t mix(uint64_t x) {
  x ^= x >> 32;
  x *= 0xd6e8feb86659fd93ULL;
  x ^= x >> 32;
  return x;
}

// Eight bytes at a time; never 0 (0 marks an empty slot).
inline uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ n;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = mix(h ^ w) * 0x9E3779B97F4A7C15ULL;
    p += 8;
    n -= 8;
  }
  uint64_t w = 0;
  std::memcpy(&w, p, n);
  h = mix(h ^ w ^ (static_cast<uint64_t>(n) << 59));
  return h ? h : 1;
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
    clear();
  }

  // Splits a batch of texts; returns the distinct chunks (as keys) with no ids cached yet. With a
  // dummy prefix the first chunk's key gets the space SentencePiece adds in front of the text.
  py::list scan(const py::list& texts) {
    if (pending_) throw py::value_error("scan() called twice without finish()");
    if (static_cast<int64_t>(entries_.size()) >= max_entries_) clear();
    segments_.clear();
    doc_segments_.clear();
    misses_.clear();
    std::string first_key;
    for (const py::handle& item : texts) {
      if (!PyUnicode_Check(item.ptr())) throw py::type_error("texts must be a list of str");
      const std::string_view text = utf8_of(item);
      const char* p = text.data();
      const char* end = p + text.size();
      const char* start = p;
      int64_t nseg = 0;
      bool prev_space = true, prev_barrier = true;  // no cut before the first character
      while (p < end) {
        const size_t sl = space_len(p, end);
        const bool barrier = barrier_[static_cast<unsigned char>(*p)];
        if (p > start && ((sl && !prev_space) || (barrier && !prev_barrier))) {
          add_segment(start, p, nseg++ == 0, first_key);
          start = p;
        }
        prev_space = sl != 0;
        prev_barrier = barrier;
        p += sl ? sl : 1;
      }
      if (end > start) add_segment(start, end, nseg++ == 0, first_key);
      doc_segments_.push_back(nseg);
    }
    pending_ = true;
    py::list out;
    for (const int64_t e : misses_) {
      const Entry& en = entries_[e];
      PyObject* s = PyUnicode_DecodeUTF8(arena_.data() + en.key_offset, en.key_len, "strict");
      if (s == nullptr) throw py::error_already_set();
      out.append(py::reinterpret_steal<py::str>(s));
    }
    return out;
  }

  // key_ids holds SentencePiece's ids for the keys scan() returned, back to back, key i having
  // key_lengths[i] of them. Returns (flat int32 ids, int64 per-text counts), appending append_id
  // after every text when it is >= 0.
  py::tuple finish(const ArrI32& key_ids, const ArrI64& key_lengths, int64_t append_id) {
    if (!pending_) throw py::value_error("finish() called without scan()");
    pending_ = false;
    if (key_lengths.ndim() != 1 || static_cast<size_t>(key_lengths.shape(0)) != misses_.size()) {
      clear();  // the pending entries would never get their ids
      throw py::value_error("finish() got " + std::to_string(key_lengths.size()) + " id counts for " +
                            std::to_string(misses_.size()) + " chunks");
    }
    const int32_t* kid = key_ids.data();
    const int64_t* klen = key_lengths.data();
    int64_t offset = 0;
    for (size_t i = 0; i < misses_.size(); ++i) offset += klen[i] >= 0 ? klen[i] : 0;
    if (offset != key_ids.size()) {
      clear();
      throw py::value_error("finish() got " + std::to_string(key_ids.size()) + " ids, the counts sum to " +
                            std::to_string(offset));
    }
    offset = 0;
    for (size_t i = 0; i < misses_.size(); ++i) {
      Entry& e = entries_[misses_[i]];
      e.ids_offset = static_cast<int64_t>(values_.size());
      e.ids_len = klen[i];
      values_.insert(values_.end(), kid + offset, kid + offset + klen[i]);
      offset += klen[i];
    }
    int64_t total = append_id >= 0 ? static_cast<int64_t>(doc_segments_.size()) : 0;
    for (const int64_t s : segments_) total += entries_[s].ids_len;
    py::array_t<int32_t> flat(total);
    py::array_t<int64_t> counts(static_cast<int64_t>(doc_segments_.size()));
    int32_t* out = flat.mutable_data();
    int64_t* cnt = counts.mutable_data();
    size_t seg = 0;
    for (size_t d = 0; d < doc_segments_.size(); ++d) {
      int32_t* doc_start = out;
      for (int64_t k = 0; k < doc_segments_[d]; ++k, ++seg) {
        const Entry& e = entries_[segments_[seg]];
        std::memcpy(out, values_.data() + e.ids_offset, e.ids_len * sizeof(int32_t));
        out += e.ids_len;
      }
      if (append_id >= 0) *out++ = static_cast<int32_t>(append_id);
      cnt[d] = out - doc_start;
    }
    return py::make_tuple(flat, counts);
  }

  int64_t size() const { return static_cast<int64_t>(entries_.size()); }

  void clear() {
    entries_.clear();
    values_.clear();
    arena_.clear();
    slots_.assign(1 << 16, Slot{0, 0});
    mask_ = slots_.size() - 1;
  }

 private:
  struct Entry {
    int64_t key_offset, key_len;  // in arena_
    int64_t ids_offset, ids_len;  // in values_; ids_len < 0 until finish() gives the ids
  };
  struct Slot {
    uint64_t hash;  // 0: empty
    int64_t entry;
  };

  void add_segment(const char* a, const char* b, bool first, std::string& first_key) {
    std::string_view key(a, static_cast<size_t>(b - a));
    if (first && dummy_prefix_) {
      first_key.assign(1, ' ');
      first_key.append(key);
      key = first_key;
    }
    segments_.push_back(find_or_add(key));
  }

  // Open addressing with linear probing over (hash, entry); a new key becomes a pending entry.
  int64_t find_or_add(std::string_view key) {
    const uint64_t h = hash_bytes(key.data(), key.size());
    size_t i = h & mask_;
    while (slots_[i].hash != 0) {
      if (slots_[i].hash == h) {
        const Entry& e = entries_[slots_[i].entry];
        if (static_cast<size_t>(e.key_len) == key.size() && std::memcmp(arena_.data() + e.key_offset, key.data(), key.size()) == 0)
          return slots_[i].entry;
      }
      i = (i + 1) & mask_;
    }
    const int64_t id = static_cast<int64_t>(entries_.size());
    entries_.push_back({static_cast<int64_t>(arena_.size()), static_cast<int64_t>(key.size()), 0, -1});
    arena_.insert(arena_.end(), key.begin(), key.end());
    slots_[i] = {h, id};
    misses_.push_back(id);
    if (entries_.size() * 2 > slots_.size()) grow();
    return id;
  }

  void grow() {
    std::vector<Slot> old(slots_.size() * 2, Slot{0, 0});
    old.swap(slots_);
    mask_ = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.hash == 0) continue;
      size_t i = s.hash & mask_;
      while (slots_[i].hash != 0) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }

  bool dummy_prefix_;
  int64_t max_entries_;
  bool barrier_[256] = {};
  bool pending_ = false;
  std::vector<Entry> entries_;
  std::vector<int32_t> values_;
  std::vector<char> arena_;
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  // The batch between scan() and finish(): the entry of every chunk, chunks per text, new entries.
  std::vector<int64_t> segments_;
  std::vector<int64_t> doc_segments_;
  std::vector<int64_t> misses_;
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
