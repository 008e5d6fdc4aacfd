// Device helpers shared by the CUDA kernel files of megallama._ops: accumulation types, 16-byte
// packs of elements, and the host-side launch shape choices.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace megallama_ops {

constexpr int kThreads = 256;  // a multiple of the warp size: the block reductions rely on it

__device__ inline float exp_acc(float v) { return expf(v); }
__device__ inline double exp_acc(double v) { return exp(v); }

template <typename A>
__device__ inline A to_acc(A v) {
  return v;
}
__device__ inline float to_acc(c10::BFloat16 v) { return static_cast<float>(v); }
__device__ inline float to_acc(c10::Half v) { return static_cast<float>(v); }

// N elements of T read or written as one access of sizeof(T) * N bytes.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ inline Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

// The 16 bytes of a pack as one vector word, so that storing it stays one 16-byte access.
template <typename T, int N>
__device__ inline uint4 bits_of(const Pack<T, N>& v) {
  static_assert(sizeof(Pack<T, N>) == sizeof(uint4), "a 16-byte pack");
  uint32_t w[4];
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = uint32_t(v.v[2 * i].x) | (uint32_t(v.v[2 * i + 1].x) << 16);
  } else if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(v.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const unsigned long long d = static_cast<unsigned long long>(__double_as_longlong(v.v[i]));
      w[2 * i] = static_cast<uint32_t>(d);
      w[2 * i + 1] = static_cast<uint32_t>(d >> 32);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// One 16-byte store instruction: written as C++, the rotary kernel's two stores of a pair are
// split into 4-byte ones by the compiler (seen in its PTX with CUDA 13.0).
template <int N, typename T>
__device__ inline void store_pack(T* p, const Pack<T, N>& v) {
  if constexpr (sizeof(Pack<T, N>) == sizeof(uint4)) {
    const uint4 w = bits_of(v);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(p)), "r"(w.x),
                 "r"(w.y), "r"(w.z), "r"(w.w)
                 : "memory");
  } else {
    *reinterpret_cast<Pack<T, N>*>(p) = v;
  }
}

// Elements of T in a 16-byte access.
template <typename T>
constexpr int kPack = 16 / static_cast<int>(sizeof(T));

// Whether every row of t (all dimensions but the last, through RowIndexer) starts at a multiple of
// `align` bytes and holds whole packs of n elements: then its rows can be read n at a time.
inline bool rows_in_packs(const at::Tensor& t, int64_t n, int64_t align) {
  if (reinterpret_cast<std::uintptr_t>(t.data_ptr()) % align != 0 || t.size(-1) % n != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % n != 0) return false;
  }
  return true;
}

inline unsigned int row_blocks(int64_t rows, const char* op) {
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), op, ": too many rows (", rows,
              ") for one launch");
  return static_cast<unsigned int>(rows);
}

// Threads for `packs` packs a row: up to kThreads, a whole number of warps.
inline int row_threads(int64_t packs) {
  return static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (packs + 31) / 32 * 32)));
}

}  // namespace megallama_ops
