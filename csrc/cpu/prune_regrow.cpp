// dsl_C::prune_regrow_ on CPU: the in-place mask update of a slot pool (semantics, tie rules and
// return values of dsl_kernels/backends/reference/prune_regrow.py, the oracle).
//
// Why not torch: the reference selects with kthvalue + masks + nonzero over [C] tensors and a
// unique/scatter over the candidates -- a dozen full passes and temporaries. Here:
//   candidates  ranked in place when unique and ascending (the score accumulator's output is),
//               else merged by key (max score) first; the top k by the same radix select;
//   prune       one pass computes an order-preserving uint32 key per slot from its L2 norm
//               (NaN/Inf -> 0: pruned first; free slot -> max: never chosen), then a two-level
//               radix select (16 + 16 bits) finds the exact k-th key; ties go to the lower slot.
// Extra memory: 4 bytes per slot (the reference's fp32 [C]) or per candidate, whichever is
// larger (they are not alive together), plus the k-sized results.
// Everything is checked before anything is written.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"

namespace dsl_cpu {
namespace {

constexpr const char* kOp = "dsl_C::prune_regrow_";

// Order-preserving key of a non-negative magnitude: -inf (non-finite block) < every finite norm
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

template <typename T>
void slot_keys(const T* values, int64_t B, const int64_t* coord, const int64_t* slots,
               int64_t n, uint32_t* keys) {
  at::parallel_for(0, n, 4096, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t s = slots != nullptr ? slots[i] : i;
      const T* v = values + s * B;
      double sq = 0.0;  // an exact-enough norm: the order, not the rounding, is what matters
      for (int64_t c = 0; c < B; ++c) {
        const double x = static_cast<double>(to_f(v[c]));
        sq += x * x;
      }
      keys[i] = mag_key(static_cast<float>(std::sqrt(sq)), coord[s] < 0);
    }
  });
}

// Positions (ascending) of the k smallest keys, ties to the lower position.
std::vector<int64_t> smallest_k(const std::vector<uint32_t>& keys, int64_t k) {
  const int64_t n = static_cast<int64_t>(keys.size());
  std::vector<int64_t> out;
  if (k <= 0) return out;
  out.reserve(k);
  // Level 1: the high 16 bits; level 2: the low 16 bits inside the bucket holding the k-th key.
  std::vector<int64_t> hist(1 << 16);
  for (uint32_t x : keys) ++hist[x >> 16];
  int64_t below = 0, hi = 0;
  while (below + hist[hi] < k) below += hist[hi++];
  std::fill(hist.begin(), hist.end(), 0);
  for (uint32_t x : keys)
    if ((x >> 16) == static_cast<uint32_t>(hi)) ++hist[x & 0xFFFF];
  int64_t lo = 0;
  while (below + hist[lo] < k) below += hist[lo++];
  const uint32_t kth = (static_cast<uint32_t>(hi) << 16) | static_cast<uint32_t>(lo);
  int64_t ties = k - below;  // how many slots with key == kth are taken (the lowest ones)
  for (int64_t i = 0; i < n; ++i) {
    if (keys[i] < kth) {
      out.push_back(i);
    } else if (keys[i] == kth && ties > 0) {
      out.push_back(i);
      --ties;
    }
  }
  return out;
}

struct Cand {
  int64_t key;
  float score;
};

std::tuple<at::Tensor, at::Tensor> prune_regrow_cpu(at::Tensor& values, at::Tensor& coord,
                                                    const at::Tensor& row_mask,
                                                    const at::Tensor& cand_keys,
                                                    const at::Tensor& cand_scores, int64_t k,
                                                    int64_t num_blocks,
                                                    const c10::optional<at::Tensor>& prune_slots) {
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
  const int64_t N = row_mask.size(0), total = N * num_blocks;
  const at::Tensor ck = cand_keys.to(at::kLong).contiguous();
  const at::Tensor cs = cand_scores.to(at::kFloat).contiguous();
  const at::Tensor rm = row_mask.contiguous();
  const int64_t* kp = ck.data_ptr<int64_t>();
  const float* sp = cs.data_ptr<float>();
  const uint64_t* mask = reinterpret_cast<const uint64_t*>(rm.data_ptr<int64_t>());
  const int64_t M = ck.numel();
  for (int64_t i = 0; i < M; ++i)
    TORCH_CHECK_INDEX(kp[i] >= 0 && kp[i] < total, kOp, ": cand_keys[", i, "] = ", kp[i],
                      " is not a block of the ", N, " x ", num_blocks, " table");
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

  // 1. Growable candidates: finite score, inactive now. The usual input (the score
  // accumulator's) is unique and ascending and is ranked in place; anything else is merged by
  // key (max score) into a sorted copy first.
  auto growable = [&](int64_t key, float score) {
    const int64_t r = key / num_blocks, j = key - r * num_blocks;
    return std::isfinite(score) && !((mask[r * W + (j >> 6)] >> (j & 63)) & 1);
  };
  bool ascending = true;
  for (int64_t i = 1; i < M && ascending; ++i) ascending = kp[i - 1] < kp[i];
  std::vector<Cand> merged;
  if (!ascending) {
    merged.reserve(M);
    for (int64_t i = 0; i < M; ++i)
      if (growable(kp[i], sp[i])) merged.push_back({kp[i], sp[i]});
    std::stable_sort(merged.begin(), merged.end(),
                     [](const Cand& a, const Cand& b) { return a.key < b.key; });
    size_t u = 0;
    for (size_t i = 0; i < merged.size(); ++i) {
      if (u > 0 && merged[u - 1].key == merged[i].key) {
        merged[u - 1].score = std::max(merged[u - 1].score, merged[i].score);
      } else {
        merged[u++] = merged[i];
      }
    }
    merged.resize(u);
  }
  const int64_t U = ascending ? M : static_cast<int64_t>(merged.size());
  auto key_at = [&](int64_t i) { return ascending ? kp[i] : merged[i].key; };
  // Rank keys: the largest score gets the smallest key; a rejected candidate the largest one
  // (no finite score maps there), so it is never among the k (k <= the growable count).
  std::vector<uint32_t> rank(U);
  int64_t n_growable = 0;
  for (int64_t i = 0; i < U; ++i) {
    const float sc = ascending ? sp[i] : merged[i].score;
    const bool ok = ascending ? growable(kp[i], sc) : true;
    rank[i] = ok ? ~score_key(sc) : std::numeric_limits<uint32_t>::max();
    n_growable += ok;
  }
  // 2. How many move.
  const int64_t n_src = ps.defined() ? ps.numel() : C;
  const int64_t* src = ps.defined() ? ps.data_ptr<int64_t>() : nullptr;
  int64_t n_prunable = 0;
  for (int64_t i = 0; i < n_src; ++i) n_prunable += cp[src != nullptr ? src[i] : i] >= 0;
  k = std::max<int64_t>(0, std::min({k, n_prunable, n_growable}));
  // 3. The k best candidates (ties to the lower key), in ascending key order.
  std::vector<int64_t> grown = smallest_k(rank, k);
  for (auto& g : grown) g = key_at(g);
  std::vector<uint32_t>().swap(rank);
  std::vector<Cand>().swap(merged);
  // 4. The k weakest active blocks.
  std::vector<int64_t> slots;
  {
    std::vector<uint32_t> keys(n_src);
    DSL_DISPATCH_VALUE_TYPES(values.scalar_type(), kOp, [&] {
      slot_keys<scalar_t>(values.data_ptr<scalar_t>(), B, cp, src, n_src, keys.data());
    });
    slots = smallest_k(keys, k);
  }
  if (src != nullptr) {
    for (auto& s : slots) s = src[s];
    std::sort(slots.begin(), slots.end());
  }
  // 5. Hand the freed slots over: ascending slots <- ascending grown keys.
  const auto lopts = coord.options();
  at::Tensor out_slots = at::empty({k}, lopts), pruned = at::empty({k}, lopts);
  int64_t* os = out_slots.data_ptr<int64_t>();
  int64_t* op = pruned.data_ptr<int64_t>();
  const int64_t bytes = B * values.element_size();
  char* vp = static_cast<char*>(values.data_ptr());
  for (int64_t i = 0; i < k; ++i) {
    const int64_t s = slots[i];
    os[i] = s;
    op[i] = cp[s];
    cp[s] = grown[i];
    std::memset(vp + s * bytes, 0, bytes);  // +0.0 in fp32, fp16 and bf16 alike
  }
  return {out_slots, pruned};
}

}  // namespace
}  // namespace dsl_cpu

TORCH_LIBRARY_FRAGMENT(dsl_C, m) {
  m.def(
      "prune_regrow_(Tensor(a!) values, Tensor(b!) coord, Tensor row_mask, Tensor cand_keys, "
      "Tensor cand_scores, int k, int num_blocks, Tensor? prune_slots) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dsl_C, CPU, m) { m.impl("prune_regrow_", &dsl_cpu::prune_regrow_cpu); }
