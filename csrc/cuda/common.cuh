// Device helpers shared by the kernels of csrc/cuda (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace dsl_cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// VEC consecutive elements as fp32; one 16-byte load when VEC elements are 16 bytes (the host
// picks VEC so that the address is then 16-byte aligned).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = to_float(t[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = to_float(p[k]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 u;
    T* t = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) t[k] = from_float<T>(v[k]);
    *reinterpret_cast<uint4*>(p) = u;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) p[k] = from_float<T>(v[k]);
  }
}

// Slot of block (r, j): row_slots[row_ptr[r] + popcount of the row's mask bits below j], -1 when
// the block is inactive or the index is inconsistent (a position or slot outside the pool: read
// as inactive rather than read out of bounds).
__device__ __forceinline__ int64_t slot_of(const PoolIndex& P, int64_t r, int64_t j) {
  const unsigned long long* m =
      reinterpret_cast<const unsigned long long*>(P.row_mask) + r * P.num_words;
  const int64_t w = j >> 6;
  const unsigned long long word = __ldg(m + w);
  const unsigned long long bit = 1ull << (j & 63);
  if (!(word & bit)) return -1;
  int64_t rank = __popcll(word & (bit - 1));
  for (int64_t u = 0; u < w; ++u) rank += __popcll(__ldg(m + u));
  const int64_t pos = static_cast<int64_t>(__ldg(P.row_ptr + r)) + rank;
  if (pos < 0 || pos >= P.num_slots) return -1;
  const int64_t s = __ldg(P.row_slots + pos);
  return (s >= 0 && s < P.num_slots) ? s : -1;
}

// Entries [lo, hi) of bag b with the offsets clamped into [0, num_indices] and hi >= lo: with
// validation off (bounds-check mode "off" or "device") the offsets are not checked, and a bad
// bag then reads nothing outside indices instead of reading out of bounds.
template <typename I>
__device__ __forceinline__ void bag_range(const I* off, int64_t b, int64_t num_indices,
                                          int64_t& lo, int64_t& hi) {
  lo = static_cast<int64_t>(off[b]);
  hi = static_cast<int64_t>(off[b + 1]);
  lo = lo < 0 ? 0 : (lo > num_indices ? num_indices : lo);
  hi = hi < lo ? lo : (hi > num_indices ? num_indices : hi);
}

// Whether row r is a row of the table (unchecked input may name others; they are skipped).
__device__ __forceinline__ bool row_ok(const PoolIndex& P, int64_t r) {
  return r >= 0 && r < P.num_rows;
}

__device__ __forceinline__ bool block_active(const PoolIndex& P, int64_t r, int64_t j) {
  const unsigned long long* m =
      reinterpret_cast<const unsigned long long*>(P.row_mask) + r * P.num_words;
  return (__ldg(m + (j >> 6)) >> (j & 63)) & 1ull;
}

// First reporter wins: code, then position and value.
__device__ __forceinline__ void report(int64_t* err, int64_t code, int64_t pos, int64_t value) {
  auto* e = reinterpret_cast<unsigned long long*>(err);
  if (atomicCAS(e, 0ull, static_cast<unsigned long long>(code)) == 0ull) {
    err[1] = pos;
    err[2] = value;
  }
}

// Threads per bag (a power of two <= 32, so a group never straddles a warp) for `chunks`
// vector chunks per output row.
inline int group_size(int64_t chunks) {
  int g = 1;
  while (g < 32 && g < chunks) g <<= 1;
  return g;
}

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t work_items, int64_t items_per_block) {
  int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > (int64_t(1) << 20)) blocks = int64_t(1) << 20;  // grid-stride loops do the rest
  return static_cast<unsigned>(blocks);
}

// Vector width for rows of `block_size` elements of `elem_bytes` at the given base pointers:
// 16 bytes when every chunk stays inside one block and all addresses are 16-byte aligned.
inline int pick_vec(int64_t block_size, int elem_bytes, const void* a, const void* b) {
  const int vec = 16 / elem_bytes;
  const bool aligned = (reinterpret_cast<uintptr_t>(a) % 16 == 0) &&
                       (b == nullptr || reinterpret_cast<uintptr_t>(b) % 16 == 0);
  return (block_size % vec == 0 && aligned) ? vec : 1;
}

#define DSL_CUDA_DISPATCH_DTYPE(DT, T, ...)    \
  switch (DT) {                                \
    case DType::kFloat32: {                    \
      using T = float;                         \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    case DType::kFloat16: {                    \
      using T = __half;                        \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    case DType::kBFloat16: {                   \
      using T = __nv_bfloat16;                 \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
  }

#define DSL_CUDA_DISPATCH_INDEX(IS64, I, ...) \
  if (IS64) {                                 \
    using I = int64_t;                        \
    __VA_ARGS__;                              \
  } else {                                    \
    using I = int32_t;                        \
    __VA_ARGS__;                              \
  }

}  // namespace dsl_cuda
