// Helpers shared by the CPU kernels (csrc/cpu/*.cpp).
//
// Threading: OpenMP with at::get_num_threads() threads (so torch.set_num_threads applies).
// Numerics: values and gradients of any float dtype are widened to fp32, accumulated in fp32
// and rounded once at the end. Every sum is formed in the order of the entries in `indices`,
// one product at a time (the build passes -ffp-contract=off so no FMA fuses them), which is
// the order of the reference backend's index_add_: fp32 results are bit-identical to it and
// independent of the number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstdint>
#include <vector>

#include "../checks.h"

#ifdef _OPENMP
#include <omp.h>
#endif

// The value dtypes of the pool (no double: the pool never holds it).
#define DSL_DISPATCH_VALUE_TYPES(TYPE, NAME, ...)          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                           \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace dsl_cpu {

inline float to_f(float x) { return x; }
inline float to_f(c10::Half x) { return static_cast<float>(x); }
inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }

inline int num_threads() { return std::max(1, at::get_num_threads()); }

// Bit count without the libgcc call __builtin_popcountll becomes when the build does not target
// POPCNT (the portable default): the index rebuild counts one word per row of the table.
inline int64_t popcount64(uint64_t x) {
  x = x - ((x >> 1) & 0x5555555555555555ull);
  x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
  x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0Full;
  return static_cast<int64_t>((x * 0x0101010101010101ull) >> 56);
}

// Global block key -> (row, column) for one num_blocks: a shift when it is a power of two (the
// usual layouts), else a division. A 64-bit division costs ~40 cycles; it dominated the loops
// of the mask update that split every candidate key.
struct KeySplit {
  int64_t nb;
  int shift = -1;
  explicit KeySplit(int64_t num_blocks) : nb(num_blocks) {
    if (nb > 0 && (nb & (nb - 1)) == 0) shift = __builtin_ctzll(static_cast<uint64_t>(nb));
  }
  inline int64_t row(int64_t key) const { return shift >= 0 ? key >> shift : key / nb; }
};

// Read-only view of the CSR row index. The slots of row r are row_slots[row_ptr[r] + k] for
// the k-th set bit of the row's mask words (in column order), so walking the set bits gives the
// slots without a popcount per block.
struct RowIndex {
  const int32_t* row_ptr;
  const int32_t* row_slots;
  const int64_t* row_mask;
  int64_t N, W, C, NB;

  RowIndex(const at::Tensor& rp, const at::Tensor& rs, const at::Tensor& rm, const dsl::PoolDims& p)
      : row_ptr(rp.data_ptr<int32_t>()),
        row_slots(rs.data_ptr<int32_t>()),
        row_mask(rm.data_ptr<int64_t>()),
        N(p.N), W(p.W), C(p.C), NB(p.NB) {}

  // Calls f(j, slot) for every active block j of row r, in column order. Returns false when
  // the index is corrupt (a position or slot outside the pool): the caller reports it.
  template <typename F>
  inline bool for_active(int64_t r, F&& f) const {
    int64_t pos = row_ptr[r];
    const uint64_t* m = reinterpret_cast<const uint64_t*>(row_mask) + r * W;
    for (int64_t w = 0; w < W; ++w) {
      uint64_t bits = m[w];
      while (bits) {
        const int64_t j = w * 64 + __builtin_ctzll(bits);
        bits &= bits - 1;
        if (pos < 0 || pos >= C || j >= NB) return false;
        const int64_t s = row_slots[pos++];
        if (s < 0 || s >= C) return false;
        f(j, s);
      }
    }
    return true;
  }

  // Software pipeline over the chain of dependent loads of an entry
  //   row -> (row_mask[row], row_ptr[row]) -> row_slots[row_ptr[row]] -> data[slot]
  // (each a likely cache miss for a large table): while entry q is processed, the first level
  // of entry q + 16, the second of q + 8 and the data row of the first active block of q + 4
  // are prefetched, so the misses overlap instead of queueing. row_at(k) gives the row of the
  // k-th entry of the loop (k < end); invalid rows are ignored (prefetches never fault but the
  // loads of row_ptr / row_slots must stay in bounds).
  template <typename RowAt>
  inline void prefetch(RowAt&& row_at, int64_t q, int64_t end, const char* data,
                       int64_t row_bytes) const {
    if (q + 16 < end) {
      const int64_t r = row_at(q + 16);
      if (r >= 0 && r < N) {
        __builtin_prefetch(row_mask + r * W);
        __builtin_prefetch(row_ptr + r);
      }
    }
    if (q + 8 < end) {
      const int64_t r = row_at(q + 8);
      if (r >= 0 && r < N) {
        const int64_t pos = row_ptr[r];
        if (pos >= 0 && pos < C) __builtin_prefetch(row_slots + pos);
      }
    }
    if (q + 4 < end) {
      const int64_t r = row_at(q + 4);
      if (r >= 0 && r < N) {
        const int64_t pos = row_ptr[r];
        if (pos >= 0 && pos < C) {
          const int64_t s = row_slots[pos];
          if (s >= 0 && s < C) __builtin_prefetch(data + s * row_bytes);
        }
      }
    }
  }

  // Slot of block (r, j) or -1 when inactive (-2 when the index is corrupt).
  inline int64_t slot(int64_t r, int64_t j) const {
    const uint64_t* m = reinterpret_cast<const uint64_t*>(row_mask) + r * W;
    const int64_t w = j >> 6;
    const uint64_t bit = uint64_t(1) << (j & 63);
    if (!(m[w] & bit)) return -1;
    int64_t rank = popcount64(m[w] & (bit - 1));
    for (int64_t u = 0; u < w; ++u) rank += popcount64(m[u]);
    const int64_t pos = row_ptr[r] + rank;
    if (pos < 0 || pos >= C) return -2;
    const int64_t s = row_slots[pos];
    return (s >= 0 && s < C) ? s : -2;
  }
};

inline void check_not_corrupt(const char* op, bool corrupt) {
  TORCH_CHECK(!corrupt, op,
              ": the row index (row_ptr / row_slots / row_mask) is inconsistent with the pool; "
              "rebuild it with rebuild_index(coord, ...)");
}

// Per-bag view of the entries: bag id of every entry and the scale of every entry in its bag's
// sum, exactly as the reference forms it: keep * psw, divided by the bag's count in mean mode.
struct EntryScales {
  std::vector<int64_t> bag_of;  // [L]
  std::vector<float> scale;     // [L], 0 for padding entries
};

template <typename I>
EntryScales entry_scales(const I* idx, const I* off, int64_t num_bags, const float* psw,
                         int64_t mode, int64_t padding_idx) {
  const int64_t L = static_cast<int64_t>(off[num_bags]);
  EntryScales e;
  e.bag_of.resize(L);
  e.scale.resize(L);
  const int nt = num_threads();
#pragma omp parallel for num_threads(nt) schedule(static) if (num_bags > 256)
  for (int64_t b = 0; b < num_bags; ++b) {
    const int64_t lo = off[b], hi = off[b + 1];
    int64_t count = 0;
    for (int64_t i = lo; i < hi; ++i) count += (static_cast<int64_t>(idx[i]) != padding_idx);
    const float cnt = static_cast<float>(count > 0 ? count : 1);
    for (int64_t i = lo; i < hi; ++i) {
      e.bag_of[i] = b;
      float s = (static_cast<int64_t>(idx[i]) != padding_idx) ? 1.0f : 0.0f;
      if (psw != nullptr) s = s * psw[i];
      if (mode == dsl::kModeMean) s = s / cnt;
      e.scale[i] = s;
    }
  }
  return e;
}

// Entries grouped so that all entries of a row fall in one group, in their original order
// within the group: groups can then be processed in parallel without two threads ever writing
// the same row (hence the same slots), and each slot still receives its contributions in entry
// order. The grouping is a counting sort by a hash of the row; padding entries are dropped.
struct RowGroups {
  std::vector<int64_t> start;  // [G + 1]
  std::vector<int64_t> entry;  // entries, grouped
};

template <typename I>
RowGroups group_by_row(const I* idx, int64_t L, int64_t padding_idx, int64_t groups) {
  RowGroups g;
  groups = std::max<int64_t>(1, groups);
  g.start.assign(groups + 1, 0);
  auto group_of = [groups](int64_t r) -> int64_t {
    // Fibonacci hashing spreads the Zipf-hot low row ids over the groups.
    return static_cast<int64_t>((static_cast<uint64_t>(r) * 0x9E3779B97F4A7C15ull) >> 20) %
           groups;
  };
  for (int64_t i = 0; i < L; ++i) {
    const int64_t r = static_cast<int64_t>(idx[i]);
    if (r != padding_idx) ++g.start[group_of(r) + 1];
  }
  for (int64_t k = 0; k < groups; ++k) g.start[k + 1] += g.start[k];
  g.entry.resize(g.start[groups]);
  std::vector<int64_t> fill(g.start.begin(), g.start.end() - 1);
  for (int64_t i = 0; i < L; ++i) {
    const int64_t r = static_cast<int64_t>(idx[i]);
    if (r != padding_idx) g.entry[fill[group_of(r)]++] = i;
  }
  return g;
}

// Float copy of the optional per-sample weights (batch-sized; the kernels read fp32).
inline at::Tensor psw_float(const c10::optional<at::Tensor>& psw) {
  if (!psw.has_value()) return at::Tensor();
  return psw->reshape({-1}).to(at::kFloat).contiguous();
}

}  // namespace dsl_cpu
