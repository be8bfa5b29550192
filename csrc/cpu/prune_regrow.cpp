// dsl_C::prune_regrow_ on CPU: the in-place mask update of a slot pool (semantics, tie rules and
// return values of dsl_kernels/backends/reference/prune_regrow.py, the oracle).
//
// Why not torch: the reference selects with kthvalue + masks + nonzero over [C] tensors and a
// unique/scatter over the candidates -- a dozen full passes and temporaries. Here:
//   checks      one pass over the candidates: key range, the table layout (`tables`, the
//               check dsl_kernels/ops/prune_regrow.py makes in Python for other backends, with
//               the same message) and whether they are unique and ascending;
//   candidates  ranked in place when unique and ascending (the score accumulator's output is),
//               else merged by key (max score) first; the top k by a radix select;
//   prune       one pass computes an order-preserving uint32 key per slot from its fp32 squared
//               L2 norm (bit-identical to the reference's block_magnitudes)
//               (NaN/Inf -> 0: pruned first; free slot -> max: never chosen), then a two-level
//               radix select (16 + 16 bits) finds the exact k-th key; ties go to the lower slot.
//               keep_first: a row's first active block (its column is the lowest set bit of
//               the row's mask words) gets the "never chosen" key too and is not counted as
//               prunable -- looked up in a bitmap of the first blocks (1 bit per block of the
//               table) built by one sequential pass over the mask.
// Extra memory: 2 bytes per slot or per candidate (the keys' high halves; not alive together),
// with keep_first 1 bit per block of the table (N * num_blocks / 8 bytes), a 256 KB histogram,
// the k-th key's bucket and the k-sized results, which double as the selections' buffers. All
// of it is at::empty / at::zeros, so allocation trackers see it. The unsorted candidate path
// (random growth) adds 16 bytes per candidate.
// Everything is checked before anything is written.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include "common.h"

namespace dsl_cpu {
namespace {

constexpr const char* kOp = "dsl_C::prune_regrow_";

// Order-preserving key of a non-negative magnitude: -inf (non-finite block) < every finite one
// < +inf (free slot).
inline uint32_t mag_key(float m, bool free_slot) {
  if (free_slot) return std::numeric_limits<uint32_t>::max();
  if (!std::isfinite(m)) return 0;
  uint32_t bits;
  std::memcpy(&bits, &m, sizeof bits);
  return bits + 1;  // m >= +0: its bit pattern grows with m and stays below 0x7F800000
}

// Order-preserving key of a finite score (any sign; -0 and +0 tie, as in the reference).
inline uint32_t score_key(float x) {
  if (x == 0.0f) x = 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The k smallest of n 32-bit keys by a two-level radix select (16 + 16 bits), ties to the lower
// position. key(i) is computed twice at most: once for every i (only its high 16 bits are kept,
// 2 bytes per entry) and again for the entries of the one bucket that holds the k-th key.
// Scratch is at::empty / at::zeros so that allocation trackers (the torch profiler) see it.
class RadixSelect {
 public:
  template <typename KeyFn>
  RadixSelect(int64_t n, KeyFn&& key, bool parallel, const at::TensorOptions& o) : n_(n) {
    hi_t_ = at::empty({n}, o.dtype(at::kShort));
    hist_t_ = at::zeros({1 << 16}, o.dtype(at::kInt));
    hi_ = reinterpret_cast<uint16_t*>(hi_t_.data_ptr<int16_t>());
    hist_ = hist_t_.data_ptr<int32_t>();
    uint16_t* hi = hi_;
    if (parallel) {
      at::parallel_for(0, n, 4096, [&](int64_t a, int64_t b) {
        for (int64_t i = a; i < b; ++i) hi[i] = static_cast<uint16_t>(key(i) >> 16);
      });
      for (int64_t i = 0; i < n; ++i) ++hist_[hi[i]];
    } else {
      for (int64_t i = 0; i < n; ++i) {
        hi[i] = static_cast<uint16_t>(key(i) >> 16);
        ++hist_[hi[i]];
      }
    }
  }

  // Entries whose key has the high half 0xFFFF (the "never chosen" sentinel's bucket).
  int64_t top_bucket() const { return hist_[0xFFFF]; }

  // Writes the k positions (ascending) to out.
  template <typename KeyFn>
  void select(int64_t k, KeyFn&& key, int64_t* out) {
    if (k <= 0) return;
    int64_t below = 0, hb = 0;
    while (below + hist_[hb] < k) below += hist_[hb++];
    const int64_t m = hist_[hb];
    // The bucket's entries, ascending: (low 16 bits << 40) | position.
    at::Tensor bucket_t = at::empty({m}, hi_t_.options().dtype(at::kLong));
    uint64_t* bk = reinterpret_cast<uint64_t*>(bucket_t.data_ptr<int64_t>());
    int64_t c = 0;
    for (int64_t i = 0; i < n_; ++i)
      if (hi_[i] == hb) bk[c++] = (static_cast<uint64_t>(key(i) & 0xFFFFu) << 40) | i;
    std::fill(hist_, hist_ + (1 << 16), 0);
    for (int64_t u = 0; u < m; ++u) ++hist_[bk[u] >> 40];
    int64_t lo = 0;
    while (below + hist_[lo] < k) below += hist_[lo++];
    int64_t ties = k - below;  // entries with the k-th key that are taken: the lowest ones
    int64_t p = 0;
    c = 0;
    for (int64_t i = 0; i < n_ && p < k; ++i) {
      if (hi_[i] < hb) {
        out[p++] = i;
      } else if (hi_[i] == hb) {
        const int64_t low = static_cast<int64_t>(bk[c++] >> 40);
        if (low < lo || (low == lo && ties-- > 0)) out[p++] = i;
      }
    }
  }

 private:
  int64_t n_;
  at::Tensor hi_t_, hist_t_;
  uint16_t* hi_;
  int32_t* hist_;
};

// keep_first: a bitmap with one bit per block of the table (total / 8 bytes, at most the mask's
// size: 1 bit per block instead of the mask's 64 per row word), set for each row's first active
// block, i.e. the column of the lowest set bit of the row's mask words (the reference's
// first_block_flags). Built in one sequential pass over the mask; the slots then test their bit
// in it instead of reading their row's mask words (scattered over the whole mask: a cache miss
// per slot; the bitmap is 8x smaller at 8 blocks per row and stays in cache).
inline at::Tensor first_block_bitmap(const uint64_t* mask, int64_t N, int64_t W, int64_t nb,
                                     const at::TensorOptions& o) {
  at::Tensor t = at::zeros({(N * nb + 63) / 64}, o.dtype(at::kLong));
  uint64_t* bits = reinterpret_cast<uint64_t*>(t.data_ptr<int64_t>());
  for (int64_t r = 0; r < N; ++r) {
    const uint64_t* w = mask + r * W;
    for (int64_t u = 0; u < W; ++u) {
      if (w[u] != 0) {
        const int64_t j = u * 64 + __builtin_ctzll(w[u]);
        if (j < nb) {  // a stray bit past the row's blocks protects nothing (as in the reference)
          const int64_t key = r * nb + j;
          bits[key >> 6] |= uint64_t(1) << (key & 63);
        }
        break;
      }
    }
  }
  return t;
}

// Slots a prune may not take: a row's first active block, when keep_first (bits != nullptr).
// `key` is checked against the table's size before (the count pass raises on a larger one).
struct FirstBlocks {
  const uint64_t* bits = nullptr;
  inline bool protects(int64_t key) const {
    return bits != nullptr && key >= 0 && ((bits[key >> 6] >> (key & 63)) & 1);
  }
  // The slots' blocks are scattered over the bitmap: fetch the word of a slot some steps ahead.
  inline void prefetch(int64_t key) const {
    if (bits != nullptr && key >= 0) __builtin_prefetch(bits + (key >> 6));
  }
};

template <typename T>
inline uint32_t slot_key(const T* values, int64_t B, const int64_t* coord, int64_t s,
                         const FirstBlocks& fb) {
  // The reference's magnitude (block_magnitudes): the fp32 squared norm in column order, every
  // product and sum rounded on its own (the build passes -ffp-contract=off); same bits, same
  // ties. No sqrt: it would not change the order, only add ties.
  if (fb.protects(coord[s])) return std::numeric_limits<uint32_t>::max();
  const T* v = values + s * B;
  float sq = 0.0f;
  for (int64_t c = 0; c < B; ++c) {
    const float x = to_f(v[c]);
    sq += x * x;
  }
  return mag_key(sq, coord[s] < 0);
}

struct Cand {
  int64_t key;
  float score;
};

// Grown blocks must fit their table: `tables` int64[T, 4] = (row_start, num_rows, num_blocks,
// padding_row) per table, rows ascending (BlockSparseBase.table_layout()). The message is the
// Python check's (dsl_kernels/ops/prune_regrow.py), so every backend raises the same error.
struct TableCheck {
  const int64_t* tb = nullptr;
  int64_t T = 0;

  void check(int64_t i, int64_t key, const KeySplit& ks) const {
    if (T == 0) return;
    const int64_t row = ks.row(key), col = key - row * ks.nb;
    // searchsorted(row_start, row, right=True) - 1, clamped at 0
    int64_t lo = 0, hi = T;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (tb[mid * 4] <= row) lo = mid + 1; else hi = mid;
    }
    const int64_t t = std::max<int64_t>(0, lo - 1);
    const int64_t* e = tb + t * 4;
    const bool bad = row >= e[0] + e[1] || row < e[0] || col >= e[2] || row == e[3];
    TORCH_CHECK_VALUE(!bad, "cand_keys[", i, "] = ", key, " is block (row ", row, ", column ",
                      col, "), outside table ", t, " (rows [", e[0], ", ", e[0] + e[1], "), ",
                      e[2], " blocks per row, padding row ", e[3], ")");
  }
};

std::tuple<at::Tensor, at::Tensor> prune_regrow_cpu(at::Tensor& values, at::Tensor& coord,
                                                    const at::Tensor& row_mask,
                                                    const at::Tensor& cand_keys,
                                                    const at::Tensor& cand_scores, int64_t k,
                                                    int64_t num_blocks,
                                                    const c10::optional<at::Tensor>& prune_slots,
                                                    const c10::optional<at::Tensor>& tables,
                                                    bool keep_first) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous() && dsl::is_value_dtype(values.scalar_type()),
              kOp, ": values must be a contiguous fp32/fp16/bf16 [C, B] tensor, got ",
              values.scalar_type(), " of shape ", values.sizes());
  const int64_t C = values.size(0), B = values.size(1);
  TORCH_CHECK(coord.scalar_type() == at::kLong && coord.dim() == 1 && coord.numel() == C &&
                  coord.is_contiguous(),
              kOp, ": coord must be a contiguous int64[", C, "] tensor, got ",
              coord.scalar_type(), " of shape ", coord.sizes());
  TORCH_CHECK(num_blocks >= 1, kOp, ": num_blocks must be >= 1, got ", num_blocks);
  const int64_t W = dsl::mask_words(num_blocks);
  TORCH_CHECK(row_mask.scalar_type() == at::kLong && row_mask.dim() == 2 &&
                  row_mask.size(1) == W,
              kOp, ": row_mask must be int64 [num_rows, ", W, "], got ", row_mask.scalar_type(),
              " of shape ", row_mask.sizes());
  TORCH_CHECK(cand_keys.dim() == 1 && cand_scores.dim() == 1 &&
                  cand_keys.numel() == cand_scores.numel(),
              kOp, ": cand_keys and cand_scores must be 1-D of the same length");
  TORCH_CHECK(cand_keys.scalar_type() == at::kLong || cand_keys.scalar_type() == at::kInt, kOp,
              ": cand_keys must be int32 or int64, got ", cand_keys.scalar_type());
  TORCH_CHECK(cand_scores.is_floating_point(), kOp, ": cand_scores must be floating point, got ",
              cand_scores.scalar_type());
  TORCH_CHECK(k >= 0, kOp, ": k must be >= 0, got ", k);
  for (const auto* t : {&row_mask, &cand_keys, &cand_scores})
    dsl::check_device(kOp, "an argument", *t, values.device());
  TableCheck tcheck;
  at::Tensor tb;
  if (tables.has_value()) {
    TORCH_CHECK_VALUE(tables->scalar_type() == at::kLong && tables->dim() == 2 &&
                          tables->size(1) == 4,
                      "tables must be int64[T, 4], got ", tables->scalar_type(), " ",
                      tables->sizes());
    dsl::check_device(kOp, "tables", *tables, values.device());
    tb = tables->contiguous();
    tcheck.tb = tb.data_ptr<int64_t>();
    tcheck.T = tb.size(0);
    for (int64_t t = 1; t < tcheck.T; ++t)
      TORCH_CHECK_VALUE(tcheck.tb[t * 4] >= tcheck.tb[(t - 1) * 4], kOp,
                        ": tables must list the tables by ascending row_start");
  }
  const int64_t N = row_mask.size(0), total = N * num_blocks;
  // Copies only when the input is not already int64 / fp32 / contiguous (the scheduler's is).
  const at::Tensor ck = cand_keys.to(at::kLong).contiguous();
  const at::Tensor cs = cand_scores.to(at::kFloat).contiguous();
  const at::Tensor rm = row_mask.contiguous();
  const int64_t* kp = ck.data_ptr<int64_t>();
  const float* sp = cs.data_ptr<float>();
  const uint64_t* mask = reinterpret_cast<const uint64_t*>(rm.data_ptr<int64_t>());
  const int64_t M = ck.numel();
  const KeySplit ks(num_blocks);
  bool ascending = true, in_range = true;
  for (int64_t i = 0; i < M; ++i) {
    in_range &= kp[i] >= 0 && kp[i] < total;
    ascending &= i == 0 || kp[i - 1] < kp[i];
  }
  for (int64_t i = 0; i < M && !in_range; ++i)  // name the first bad one
    TORCH_CHECK_INDEX(kp[i] >= 0 && kp[i] < total, kOp, ": cand_keys[", i, "] = ", kp[i],
                      " is not a block of the ", N, " x ", num_blocks, " table");
  if (tcheck.T > 1 || (tcheck.T == 1 && !(tcheck.tb[0] == 0 && tcheck.tb[1] == N &&
                                          tcheck.tb[2] == num_blocks && tcheck.tb[3] < 0))) {
    for (int64_t i = 0; i < M; ++i) tcheck.check(i, kp[i], ks);
  }  // else one table covering the whole pool without a padding row: nothing to reject
  at::Tensor ps;
  if (prune_slots.has_value()) {
    TORCH_CHECK(prune_slots->dim() == 1 && (prune_slots->scalar_type() == at::kLong ||
                                            prune_slots->scalar_type() == at::kInt),
                kOp, ": prune_slots must be a 1-D integer tensor");
    ps = prune_slots->to(at::kLong).contiguous();
    const int64_t* pp = ps.data_ptr<int64_t>();
    for (int64_t i = 0; i < ps.numel(); ++i)
      TORCH_CHECK_INDEX(pp[i] >= 0 && pp[i] < C, kOp, ": prune_slots[", i, "] = ", pp[i],
                        " is not a slot of the pool [0, ", C, ")");
  }
  int64_t* cp = coord.data_ptr<int64_t>();
  const auto lopts = coord.options();

  // 1. Growable candidates: finite score, inactive now. The usual input (the score
  // accumulator's) is unique and ascending and is ranked in place; anything else is merged by
  // key (max score) into a sorted copy first.
  auto growable = [&](int64_t key, float score) {
    const int64_t r = ks.row(key), j = key - r * num_blocks;
    return std::isfinite(score) && !((mask[r * W + (j >> 6)] >> (j & 63)) & 1);
  };
  at::Tensor merged_t;
  Cand* merged = nullptr;
  int64_t U = M;
  if (!ascending) {
    merged_t = at::empty({M * static_cast<int64_t>(sizeof(Cand))}, lopts.dtype(at::kByte));
    merged = reinterpret_cast<Cand*>(merged_t.data_ptr<uint8_t>());
    int64_t n = 0;
    for (int64_t i = 0; i < M; ++i)
      if (growable(kp[i], sp[i])) merged[n++] = {kp[i], sp[i]};
    std::sort(merged, merged + n, [](const Cand& a, const Cand& b) { return a.key < b.key; });
    int64_t u = 0;  // duplicates: the max score (finite scores only, so order does not matter)
    for (int64_t i = 0; i < n; ++i) {
      if (u > 0 && merged[u - 1].key == merged[i].key) {
        merged[u - 1].score = std::max(merged[u - 1].score, merged[i].score);
      } else {
        merged[u++] = merged[i];
      }
    }
    U = u;
  }
  auto key_at = [&](int64_t i) { return merged == nullptr ? kp[i] : merged[i].key; };
  // Rank keys: the largest score gets the smallest key; a rejected candidate the largest one
  // (no finite score maps there), so it is never among the k (k <= the growable count).
  auto rank = [&](int64_t i) -> uint32_t {
    if (merged != nullptr) return ~score_key(merged[i].score);
    // The candidates' rows are scattered over the mask: fetch the word 16 candidates ahead.
    if (i + 16 < M) __builtin_prefetch(mask + ks.row(kp[i + 16]) * W);
    return growable(kp[i], sp[i]) ? ~score_key(sp[i]) : std::numeric_limits<uint32_t>::max();
  };
  // 2. How many move.
  const int64_t n_src = ps.defined() ? ps.numel() : C;
  const int64_t* src = ps.defined() ? ps.data_ptr<int64_t>() : nullptr;
  FirstBlocks fb;
  at::Tensor first_bits;
  if (keep_first) {
    first_bits = first_block_bitmap(mask, N, W, num_blocks, lopts);
    fb.bits = reinterpret_cast<const uint64_t*>(first_bits.data_ptr<int64_t>());
  }
  int64_t n_prunable = 0;
  if (!keep_first) {
    if (src == nullptr) {
      for (int64_t i = 0; i < n_src; ++i) n_prunable += cp[i] >= 0;
    } else {
      for (int64_t i = 0; i < n_src; ++i) n_prunable += cp[src[i]] >= 0;
    }
  } else {
    // Tests each slot's bit in the first-block bitmap: the active blocks that are not their
    // row's first, and the entries past the table (an error, raised below: nothing is written
    // yet).
    constexpr int64_t kBad = int64_t(1) << 40;  // a flag above any count (n_src < 2^40)
    const int64_t acc = at::parallel_reduce(
        0, n_src, 4096, int64_t(0),
        [&](int64_t a, int64_t b, int64_t acc) {
          for (int64_t i = a; i < b; ++i) {
            if (i + 16 < b) fb.prefetch(cp[src != nullptr ? src[i + 16] : i + 16]);
            const int64_t c = cp[src != nullptr ? src[i] : i];
            if (c >= total) {
              acc |= kBad;  // once per chunk: the sum of the chunks cannot overflow
            } else {
              acc += c >= 0 && !fb.protects(c);
            }
          }
          return acc;
        },
        std::plus<int64_t>());
    for (int64_t i = 0; i < n_src && acc >= kBad; ++i) {  // name the first bad one
      const int64_t c = cp[src != nullptr ? src[i] : i];
      TORCH_CHECK_INDEX(c < total, kOp, ": coord[", src != nullptr ? src[i] : i, "] = ", c,
                        " is not a block of the ", N, " x ", num_blocks,
                        " table (keep_first reads its row's mask)");
    }
    n_prunable = acc;
  }
  // The outputs double as the selections' buffers: `pruned` holds the grown keys until step 5.
  at::Tensor out_slots, pruned;
  {
    RadixSelect grow_sel(U, rank, false, lopts);
    const int64_t n_growable = U - grow_sel.top_bucket();
    k = std::max<int64_t>(0, std::min({k, n_prunable, n_growable}));
    out_slots = at::empty({k}, lopts);
    pruned = at::empty({k}, lopts);
    // 3. The k best candidates (ties to the lower key), in ascending key order.
    int64_t* op = pruned.data_ptr<int64_t>();
    grow_sel.select(k, rank, op);
    for (int64_t i = 0; i < k; ++i) op[i] = key_at(op[i]);
  }
  merged_t = at::Tensor();
  // 4. The k weakest active blocks.
  int64_t* os = out_slots.data_ptr<int64_t>();
  DSL_DISPATCH_VALUE_TYPES(values.scalar_type(), kOp, [&] {
    const scalar_t* vp = values.data_ptr<scalar_t>();
    auto key = [&](int64_t i) {
      if (keep_first && i + 16 < n_src) fb.prefetch(cp[src != nullptr ? src[i + 16] : i + 16]);
      return slot_key<scalar_t>(vp, B, cp, src != nullptr ? src[i] : i, fb);
    };
    RadixSelect prune_sel(n_src, key, true, lopts);
    prune_sel.select(k, key, os);
  });
  if (src != nullptr) {
    for (int64_t i = 0; i < k; ++i) os[i] = src[os[i]];
    if (!std::is_sorted(os, os + k)) std::sort(os, os + k);
  }
  // 5. Hand the freed slots over: ascending slots <- ascending grown keys.
  int64_t* op = pruned.data_ptr<int64_t>();
  const int64_t bytes = B * values.element_size();
  char* vp = static_cast<char*>(values.data_ptr());
  constexpr int64_t kAhead = 16;  // the slots are scattered: prefetch their lines ahead
  for (int64_t i = 0; i < k; ++i) {
    if (i + kAhead < k) {
      __builtin_prefetch(cp + os[i + kAhead], 1);
      __builtin_prefetch(vp + os[i + kAhead] * bytes, 1);
    }
    const int64_t s = os[i], grown = op[i];
    op[i] = cp[s];
    cp[s] = grown;
    std::memset(vp + s * bytes, 0, bytes);  // +0.0 in fp32, fp16 and bf16 alike
  }
  return {out_slots, pruned};
}

}  // namespace
}  // namespace dsl_cpu

TORCH_LIBRARY_FRAGMENT(dsl_C, m) {
  m.def(
      "prune_regrow_(Tensor(a!) values, Tensor(b!) coord, Tensor row_mask, Tensor cand_keys, "
      "Tensor cand_scores, int k, int num_blocks, Tensor? prune_slots, Tensor? tables=None, "
      "bool keep_first=False) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dsl_C, CPU, m) { m.impl("prune_regrow_", &dsl_cpu::prune_regrow_cpu); }
