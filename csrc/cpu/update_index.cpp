// dsl_C::update_index_ on CPU: bring the CSR row index of a slot pool up to date IN PLACE after
// a mask update changed the blocks of `slots` (slot slots[i] held old_keys[i], now holds
// coord[slots[i]]; -1 = free). The result is exactly rebuild_index(coord)'s (tested bit for bit).
//
// Why: a full rebuild zeroes N*W mask words, sets C bits at random and writes C row_slots at
// random (15-22 ms at 1e6 rows, 8e5 slots, one thread, on the shared machine) and needs a
// second index (or drops the first) while it runs. A mask update moves ~10 % of the blocks; here
//   1. the mask bits of the k changed blocks are flipped (validated first, undone on a clash),
//   2. one sweep over the changed rows recomputes row_ptr and moves row_slots in place: a
//      changed row is re-merged (its surviving slots, in column order, with the slots whose new
//      block lies in it); the unchanged rows up to the next changed row keep their segments and
//      shift by one common amount (one memmove, one row_ptr add).
// In place: a unit (changed row + its unchanged rows) whose rows shift right by d_out > 0 would
// overwrite the next unit's old segment, so a run of such units is done last unit first; every
// other unit left to right. A changed row's old slots are copied to a small buffer first.
// Extra memory: one bit per slot and per row and the k moved-in (key, slot) pairs, all
// at::empty / at::zeros (allocation trackers see them).
// Everything is checked before anything is written, except that an index which is not the index
// of the old coord (a caller bug) is detected during the sweep; the error then says so and that
// rebuild_index repairs it.
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace dsl_cpu {
namespace {

constexpr const char* kOp = "dsl_C::update_index_";

inline bool test_bit(const uint64_t* bits, int64_t i) { return (bits[i >> 6] >> (i & 63)) & 1; }
inline void set_bit(uint64_t* bits, int64_t i) { bits[i >> 6] |= uint64_t(1) << (i & 63); }

void update_index_cpu(at::Tensor& row_ptr, at::Tensor& row_slots, at::Tensor& row_mask,
                      const at::Tensor& coord, const at::Tensor& slots,
                      const at::Tensor& old_keys, int64_t num_blocks) {
  TORCH_CHECK(num_blocks >= 1, kOp, ": num_blocks must be >= 1, got ", num_blocks);
  const int64_t W = dsl::mask_words(num_blocks), NB = num_blocks;
  TORCH_CHECK(row_mask.scalar_type() == at::kLong && row_mask.dim() == 2 &&
                  row_mask.size(1) == W && row_mask.is_contiguous(),
              kOp, ": row_mask must be a contiguous int64 [num_rows, ", W, "] tensor, got ",
              row_mask.scalar_type(), " of shape ", row_mask.sizes());
  const int64_t N = row_mask.size(0);
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && row_ptr.dim() == 1 &&
                  row_ptr.numel() == N + 1 && row_ptr.is_contiguous(),
              kOp, ": row_ptr must be a contiguous int32[", N + 1, "] tensor, got ",
              row_ptr.scalar_type(), " of shape ", row_ptr.sizes());
  TORCH_CHECK(coord.scalar_type() == at::kLong && coord.dim() == 1 && coord.is_contiguous(),
              kOp, ": coord must be a contiguous 1-D int64 tensor, got ", coord.scalar_type(),
              " of shape ", coord.sizes());
  const int64_t C = coord.numel();
  TORCH_CHECK(row_slots.scalar_type() == at::kInt && row_slots.dim() == 1 &&
                  row_slots.numel() == C && row_slots.is_contiguous(),
              kOp, ": row_slots must be a contiguous int32[", C, "] tensor, got ",
              row_slots.scalar_type(), " of shape ", row_slots.sizes());
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 &&
                  old_keys.scalar_type() == at::kLong && old_keys.dim() == 1 &&
                  slots.numel() == old_keys.numel(),
              kOp, ": slots and old_keys must be 1-D int64 tensors of the same length, got ",
              slots.scalar_type(), " ", slots.sizes(), " and ", old_keys.scalar_type(), " ",
              old_keys.sizes());
  const std::initializer_list<const at::Tensor*> others{&row_ptr, &row_slots, &coord, &slots,
                                                        &old_keys};
  for (const at::Tensor* t : others)
    dsl::check_device(kOp, "an argument", *t, row_mask.device());
  TORCH_CHECK(N <= std::numeric_limits<int64_t>::max() / NB, kOp, ": num_rows * num_blocks "
              "is too large");
  const int64_t total = N * NB;
  const at::Tensor sl = slots.contiguous(), ok = old_keys.contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  const int64_t* okp = ok.data_ptr<int64_t>();
  const int64_t* cp = coord.data_ptr<int64_t>();
  int32_t* rp = row_ptr.data_ptr<int32_t>();
  int32_t* rs = row_slots.data_ptr<int32_t>();
  uint64_t* mask = reinterpret_cast<uint64_t*>(row_mask.data_ptr<int64_t>());
  const int64_t K = sl.numel();
  if (K == 0) return;

  // ---- checks (nothing written yet) ----
  const KeySplit ks(NB);
  auto bit_of = [&](int64_t key) -> bool {
    const int64_t r = ks.row(key), j = key - r * NB;
    return (mask[r * W + (j >> 6)] >> (j & 63)) & 1;
  };
  const auto bopts = row_mask.options();
  at::Tensor changed_slot_t = at::zeros({(C + 63) / 64}, bopts);
  at::Tensor changed_row_t = at::zeros({(N + 63) / 64}, bopts);
  uint64_t* changed_slot = reinterpret_cast<uint64_t*>(changed_slot_t.data_ptr<int64_t>());
  uint64_t* changed_row = reinterpret_cast<uint64_t*>(changed_row_t.data_ptr<int64_t>());
  // The moved-in blocks as (key, slot) arrays, in key order after the checks: the mask update
  // and the sweep read them sequentially instead of coord at random.
  at::Tensor in_t = at::empty({2, K}, sl.options());
  int64_t* in_key = in_t.data_ptr<int64_t>();
  int64_t* in_slot = in_key + K;
  int64_t L = 0;
  int64_t delta = 0;  // active blocks after - before
  bool ascending = true;
  constexpr int64_t kAhead = 16;  // prefetch distance: the keys' mask words are cache misses
  auto word_of = [&](int64_t key) {
    const int64_t r = ks.row(key);
    return mask + r * W + ((key - r * NB) >> 6);
  };
  for (int64_t i = 0; i < K; ++i) {
    if (i + 2 * kAhead < K && sp[i + 2 * kAhead] >= 0 && sp[i + 2 * kAhead] < C)
      __builtin_prefetch(cp + sp[i + 2 * kAhead]);
    if (i + kAhead < K) {
      const int64_t o2 = okp[i + kAhead], s2 = sp[i + kAhead];
      if (o2 >= 0 && o2 < total) __builtin_prefetch(word_of(o2));
      const int64_t n2 = s2 >= 0 && s2 < C ? cp[s2] : -1;
      if (n2 >= 0 && n2 < total) __builtin_prefetch(word_of(n2));
    }
    const int64_t s = sp[i];
    TORCH_CHECK_INDEX(s >= 0 && s < C, kOp, ": slots[", i, "] = ", s,
                      " is not a slot of the pool [0, ", C, ")");
    TORCH_CHECK_VALUE(!test_bit(changed_slot, s), kOp, ": slots[", i, "] = ", s,
                      " appears twice");
    set_bit(changed_slot, s);
    const int64_t o = okp[i], n = cp[s];
    TORCH_CHECK_INDEX(o >= -1 && o < total, kOp, ": old_keys[", i, "] = ", o,
                      " is neither -1 (free) nor a block of the ", N, " x ", NB, " table");
    TORCH_CHECK_INDEX(n >= -1 && n < total, kOp, ": coord[slots[", i, "]] = coord[", s,
                      "] = ", n, " is neither -1 (free) nor a block of the ", N, " x ", NB,
                      " table");
    TORCH_CHECK_VALUE(o < 0 || bit_of(o), kOp, ": old_keys[", i, "] = ", o,
                      " is not active in row_mask: the index is not that of the old coord");
    delta += (n >= 0) - (o >= 0);
    if (n >= 0) {
      ascending &= L == 0 || in_key[L - 1] < n;
      in_key[L] = n;
      in_slot[L++] = s;
      set_bit(changed_row, ks.row(n));
    }
    if (o >= 0) set_bit(changed_row, ks.row(o));
  }
  const int64_t old_total = rp[N];
  TORCH_CHECK_VALUE(rp[0] == 0 && old_total >= 0 && old_total <= C &&
                        old_total + delta >= 0 && old_total + delta <= C,
                    kOp, ": row_ptr does not fit the pool (row_ptr[0] = ", rp[0],
                    ", row_ptr[N] = ", old_total, ", ", C, " slots)");
  bool rows_ok = true;
  for (int64_t r = 0; r < N; ++r) rows_ok &= rp[r + 1] >= rp[r] && rp[r + 1] - rp[r] <= NB;
  for (int64_t r = 0; r < N && !rows_ok; ++r)  // name the first bad row
    TORCH_CHECK_VALUE(rp[r + 1] >= rp[r] && rp[r + 1] - rp[r] <= NB, kOp,
                      ": row_ptr is not a row pointer of ", NB, "-block rows at row ", r);

  // ---- 1. the mask: clear the old blocks, then set the new ones (a clash undoes both) ----
  for (int64_t i = 0; i < K; ++i) {
    if (i + kAhead < K && okp[i + kAhead] >= 0) __builtin_prefetch(word_of(okp[i + kAhead]), 1);
    const int64_t o = okp[i];
    if (o < 0) continue;
    const int64_t r = ks.row(o), j = o - r * NB;
    mask[r * W + (j >> 6)] &= ~(uint64_t(1) << (j & 63));
  }
  for (int64_t g = 0; g < L; ++g) {
    if (g + kAhead < L) __builtin_prefetch(word_of(in_key[g + kAhead]), 1);
    const int64_t n = in_key[g];
    const int64_t r = ks.row(n), j = n - r * NB;
    uint64_t& word = mask[r * W + (j >> 6)];
    const uint64_t bit = uint64_t(1) << (j & 63);
    if (word & bit) {  // held by a slot that did not change, or by two changed slots
      for (int64_t u = 0; u < g; ++u) {
        const int64_t m = in_key[u];
        const int64_t ru = ks.row(m), ju = m - ru * NB;
        mask[ru * W + (ju >> 6)] &= ~(uint64_t(1) << (ju & 63));
      }
      for (int64_t u = 0; u < K; ++u) {
        const int64_t o = okp[u];
        if (o < 0) continue;
        const int64_t ru = ks.row(o), ju = o - ru * NB;
        mask[ru * W + (ju >> 6)] |= uint64_t(1) << (ju & 63);
      }
      TORCH_CHECK_VALUE(false, kOp, ": coord[", in_slot[g], "] = ", n, " names block (row ", r,
                        ", col ", j, ") that another slot already holds");
    }
    word |= bit;
  }

  // ---- 2. row_ptr and row_slots in one sweep over the changed rows ----
  if (!ascending) {  // e.g. several prune_regrow_ calls (per-table updates) concatenated
    std::sort(in_slot, in_slot + L, [&](int64_t a, int64_t b) { return cp[a] < cp[b]; });
    for (int64_t g = 0; g < L; ++g) in_key[g] = cp[in_slot[g]];
  }

  // A unit is a changed row c plus the unchanged rows up to the next changed row: the row is
  // re-merged, the rows after it keep their segments and shift by one common amount, so a unit
  // costs one memmove and a vectorisable row_ptr add, whatever its length.
  const int64_t NW = (N + 63) / 64;
  auto next_changed = [&](int64_t r) -> int64_t {  // first changed row >= r, or N
    if (r >= N) return N;
    int64_t w = r >> 6;
    uint64_t m = changed_row[w] & (~uint64_t(0) << (r & 63));
    while (m == 0) {
      if (++w >= NW) return N;
      m = changed_row[w];
    }
    return std::min<int64_t>(N, (w << 6) + __builtin_ctzll(m));
  };
  auto prev_changed = [&](int64_t r) -> int64_t {  // last changed row < r (one exists)
    int64_t w = (r - 1) >> 6;
    const int64_t bit = (r - 1) & 63;
    uint64_t m = changed_row[w] & (bit == 63 ? ~uint64_t(0) : ((uint64_t(2) << bit) - 1));
    while (m == 0) m = changed_row[--w];
    return (w << 6) + 63 - __builtin_clzll(m);
  };
  auto count_new = [&](int64_t r) -> int64_t {
    int64_t n = 0;
    for (int64_t w = 0; w < W; ++w) n += popcount64(mask[r * W + w]);
    return n;
  };
  auto fail = [&](int64_t r) {
    TORCH_CHECK_VALUE(false, kOp, ": row ", r, " of row_slots does not match the old coord "
                      "(the index was stale); call rebuild_index to repair it");
  };
  std::vector<int32_t> buf(static_cast<size_t>(NB));
  // Segments are a few entries long: an inline loop beats a library call for those.
  auto move = [](int32_t* dst, const int32_t* src, int64_t n) {
    if (n > 16) {
      std::memmove(dst, src, n * sizeof(int32_t));
    } else if (dst < src) {
      for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
    } else {
      for (int64_t i = n - 1; i >= 0; --i) dst[i] = src[i];
    }
  };
  // Unit of changed row c (next changed row cn): old row segment [os, oe), old stretch
  // [oe, send), row shift d_in, stretch shift d_out; moved-in blocks [g_lo, g_hi) of `in_*`.
  auto write_unit = [&](int64_t c, int64_t cn, int64_t os, int64_t oe, int64_t send,
                        int64_t d_in, int64_t d_out, int64_t g_lo, int64_t g_hi) {
    const int64_t oc = oe - os;
    for (int64_t i = 0; i < oc; ++i) buf[i] = rs[os + i];  // the row's old slots first
    if (d_out != 0) {
      if (send > oe) move(rs + oe + d_out, rs + oe, send - oe);
      for (int64_t r = c + 1; r < cn; ++r) rp[r] += static_cast<int32_t>(d_out);
    }
    int64_t b = 0, g = g_lo, out = os + d_in;
    for (int64_t w = 0; w < W; ++w) {
      uint64_t m = mask[c * W + w];
      while (m) {
        const int64_t key = c * NB + w * 64 + __builtin_ctzll(m);
        m &= m - 1;
        if (g < g_hi && in_key[g] == key) {
          rs[out++] = static_cast<int32_t>(in_slot[g++]);
          continue;
        }
        while (b < oc && buf[b] >= 0 && buf[b] < C && test_bit(changed_slot, buf[b])) ++b;
        if (b >= oc || buf[b] < 0 || buf[b] >= C) fail(c);
        rs[out++] = buf[b++];
      }
    }
    if (g != g_hi || out != oe + d_out) fail(c);
    rp[c] = static_cast<int32_t>(os + d_in);
  };

  // Units in order, except that a run of units whose stretch shifts right (d_out > 0) is done
  // last unit first: each would overwrite the next one's old segment.
  int64_t c = next_changed(0), d = 0, g = 0;
  // The changed rows are scattered over the mask and row_ptr: a cursor kAhead changed rows in
  // front of the sweep prefetches their lines (every changed row is reached once going forward).
  int64_t ahead = c;
  for (int64_t i = 0; i < kAhead && ahead < N; ++i) ahead = next_changed(ahead + 1);
  auto step_ahead = [&] {
    if (ahead >= N) return;
    __builtin_prefetch(mask + ahead * W);
    __builtin_prefetch(rp + ahead);
    ahead = next_changed(ahead + 1);
  };
  while (c < N) {
    // Extend the chain c .. v while the shift after a unit is > 0.
    int64_t v = c, dv_in = d, gv = g, cn;
    int64_t d_out;
    for (;;) {
      step_ahead();
      cn = next_changed(v + 1);
      d_out = dv_in + count_new(v) - (rp[v + 1] - rp[v]);  // v's stretch starts at rp[v + 1]
      if (d_out <= 0 || cn >= N) break;
      while (gv < L && in_key[gv] < (v + 1) * NB) ++gv;
      v = cn;
      dv_in = d_out;
    }
    int64_t g_hi = gv;
    while (g_hi < L && in_key[g_hi] < (v + 1) * NB) ++g_hi;
    const int64_t g_after = g_hi, d_after = d_out, c_after = cn;
    // Last unit of the chain first; `send` carries the old start of the unit written before.
    int64_t u = v, un = cn, send = rp[cn], du_out = d_out;
    for (;;) {
      const int64_t os = rp[u], oe = u + 1 == un ? send : rp[u + 1];
      const int64_t du_in = u == v ? dv_in : du_out - count_new(u) + (oe - os);
      int64_t g_lo = g_hi;
      while (g_lo > 0 && in_key[g_lo - 1] >= u * NB) --g_lo;
      write_unit(u, un, os, oe, send, du_in, du_out, g_lo, g_hi);
      if (u == c) break;
      send = os;
      un = u;
      u = prev_changed(u);
      du_out = du_in;
      g_hi = g_lo;
    }
    d = d_after;
    g = g_after;
    c = c_after;
  }
  const int64_t ns = old_total + d;
  rp[N] = static_cast<int32_t>(ns);
  for (int64_t p = ns; p < old_total; ++p) rs[p] = -1;  // fewer active blocks than before
}

}  // namespace
}  // namespace dsl_cpu

TORCH_LIBRARY_FRAGMENT(dsl_C, m) {
  m.def(
      "update_index_(Tensor(a!) row_ptr, Tensor(b!) row_slots, Tensor(c!) row_mask, "
      "Tensor coord, Tensor slots, Tensor old_keys, int num_blocks) -> ()");
}

TORCH_LIBRARY_IMPL(dsl_C, CPU, m) { m.impl("update_index_", &dsl_cpu::update_index_cpu); }
