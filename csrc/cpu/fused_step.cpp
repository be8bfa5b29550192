// The CPU fused training step in two ops, with no per-step Python bookkeeping:
//
//   dsl_C::fused_lookup  forward of sum/mean embedding bags that also emits the step's plan:
//                        one (slot, bag * NB + col [, scale]) item per active, non-frozen block
//                        an entry reads, in entry order;
//   dsl_C::fused_apply   backward + optimizer from that plan: a stable radix sort of the items
//                        by slot, then per touched slot the gradient summed in entry order and
//                        the optimizer update applied at once (no [C, B] gradient).
//
// Why this shape: a lookup walks a chain of dependent loads per entry (row -> mask word and
// row_ptr -> row_slots -> values), each a likely cache miss on a large table. Walking the chain
// entry by entry leaves the CPU waiting on one miss at a time; here a chunk of entries goes
// through each level in its own loop (independent iterations, so the misses of many entries
// overlap), and the backward reuses the resolved slots instead of walking the index again.
// Only the stored blocks are touched, so the step costs ~density of a dense table's step.
//
// Numerics match the reference (csrc/cpu/common.h): fp32 sums in entry order, the same
// per-entry scale (psw, then / count in mean mode), the optimizer of fused_update.h; results
// are bit-identical to the other CPU path and independent of the thread count (items are
// concatenated in bag order whatever thread produced them; each slot is owned by one thread).
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <type_traits>

#include "common.h"
#include "fused_checks.h"
#include "fused_update.h"
#include "staged_lookup.h"

namespace dsl_cpu {
namespace {

constexpr const char* kApplyOp = "dsl_C::fused_apply";
constexpr int64_t kBagsPerChunk = 128;  // work unit of the forward (~2,500 entries at pooling 20)
// Prefetch distance (entries / items / slots) of the gather loops: far enough ahead to cover a
// miss to DRAM at a few ns per iteration (16 left the lookup ~30 % slower on the 2-core box;
// 32-96 measured alike).
constexpr int64_t kAhead = 48;

// Calls f(std::integral_constant<int64_t, 8>) when B == 8 (the common block size: the inner
// loops become one 256-bit operation each) and f(std::integral_constant<int64_t, 0>) otherwise,
// where the callee reads the runtime B. Same operations in the same order either way.
template <typename F>
inline void with_block_size(int64_t B, F&& f) {
  if (B == 8)
    f(std::integral_constant<int64_t, 8>{});
  else
    f(std::integral_constant<int64_t, 0>{});
}

struct Item {
  int32_t slot;
  int32_t gofs;  // bag * NB + col: the block's offset in grad_out / out, in units of B
};

struct Chunk {
  std::vector<Item> items;   // every active block read, entry order
  std::vector<float> scale;  // per item; empty when every scale is 1
  std::vector<Item> plan;    // the non-frozen items (aliases `items` when nothing is frozen)
  std::vector<float> plan_scale;
};

template <typename T, typename I>
void lookup_chunk(const T* values, const RowIndex& ix, int64_t B, const I* idx, const I* off,
                  int64_t b0, int64_t b1, const float* psw, int64_t mode, int64_t pad,
                  const bool* frozen, T* out, Chunk& ck, std::vector<float>& acc,
                  std::vector<int64_t>& hdr, std::atomic<bool>& corrupt) {
  const int64_t NB = ix.NB, W = ix.W, D = NB * B, lo = off[b0], hi = off[b1];
  const bool scaled = psw != nullptr || mode == dsl::kModeMean;
  // Level 1: the first mask word of every entry, then (a second pass) row_ptr where that word
  // is not zero: a row without active blocks costs one miss, not two. Each pass's loads are
  // independent and prefetched kAhead entries ahead; in one pass the row_ptr prefetch had to
  // wait for the mask word it depends on.
  hdr.resize(2 * (hi - lo));
  const uint64_t* mask = reinterpret_cast<const uint64_t*>(ix.row_mask);
  for (int64_t i = lo; i < hi; ++i) {
    if (i + kAhead < hi && idx[i + kAhead] != pad)
      __builtin_prefetch(mask + int64_t(idx[i + kAhead]) * W);
    const int64_t r = idx[i];
    hdr[2 * (i - lo) + 1] = r == pad ? 0 : static_cast<int64_t>(mask[r * W]);
  }
  for (int64_t i = lo; i < hi; ++i) {
    int64_t* h = hdr.data() + 2 * (i - lo);
    if (i + kAhead < hi && idx[i + kAhead] != pad && (W > 1 || h[2 * kAhead + 1] != 0))
      __builtin_prefetch(ix.row_ptr + idx[i + kAhead]);
    const int64_t r = idx[i];
    h[0] = (r == pad || (W == 1 && h[1] == 0)) ? 0 : ix.row_ptr[r];
  }
  // Level 2: the slots of the active blocks -> items (entry order, columns ascending).
  ck.items.clear();
  ck.scale.clear();
  ck.items.reserve(hi - lo);  // ~one active block per entry at density 0.1; grows past that
  if (scaled) ck.scale.reserve(hi - lo);
  for (int64_t b = b0; b < b1; ++b) {
    float inv = 1.0f;
    if (mode == dsl::kModeMean) {
      int64_t n = 0;
      for (int64_t i = off[b]; i < off[b + 1]; ++i) n += (static_cast<int64_t>(idx[i]) != pad);
      inv = static_cast<float>(n > 0 ? n : 1);
    }
    for (int64_t i = off[b]; i < off[b + 1]; ++i) {
      const int64_t* h = hdr.data() + 2 * (i - lo);
      if (i + kAhead < hi) {
        const int64_t pn = h[2 * kAhead];
        if (h[2 * kAhead + 1] != 0 && pn >= 0 && pn < ix.C) __builtin_prefetch(ix.row_slots + pn);
      }
      const int64_t r = idx[i];
      if (r == pad) continue;
      float s = 1.0f;
      if (psw != nullptr) s = s * psw[i];
      if (mode == dsl::kModeMean) s = s / inv;
      int64_t pos = h[0];
      for (int64_t w = 0; w < W; ++w) {
        uint64_t bits = w == 0 ? static_cast<uint64_t>(h[1]) : mask[r * W + w];
        while (bits) {
          const int64_t j = w * 64 + __builtin_ctzll(bits);
          bits &= bits - 1;
          const int64_t slot = (pos >= 0 && pos < ix.C) ? ix.row_slots[pos] : -1;
          ++pos;
          if (slot < 0 || slot >= ix.C || j >= NB) {
            corrupt.store(true, std::memory_order_relaxed);
            continue;
          }
          ck.items.push_back({static_cast<int32_t>(slot), static_cast<int32_t>(b * NB + j)});
          if (scaled) ck.scale.push_back(s);
        }
      }
    }
  }
  // Level 3: the values, accumulated in item (= entry) order into fp32 bag rows.
  float* a;
  if constexpr (std::is_same<T, float>::value) {
    a = out + b0 * D;  // fp32 pools accumulate in place
  } else {
    acc.resize((b1 - b0) * D);
    a = acc.data();
  }
  std::memset(a, 0, sizeof(float) * (b1 - b0) * D);
  const int64_t n = static_cast<int64_t>(ck.items.size()), base = b0 * NB;
  with_block_size(B, [&](auto kb) {
    const int64_t Bk = decltype(kb)::value ? decltype(kb)::value : B;
    for (int64_t t = 0; t < n; ++t) {
      if (t + kAhead < n) __builtin_prefetch(values + int64_t(ck.items[t + kAhead].slot) * Bk);
      const T* v = values + int64_t(ck.items[t].slot) * Bk;
      float* o = a + (ck.items[t].gofs - base) * Bk;
      if (scaled) {
        const float s = ck.scale[t];
        for (int64_t c = 0; c < Bk; ++c) o[c] += to_f(v[c]) * s;
      } else {
        for (int64_t c = 0; c < Bk; ++c) o[c] += to_f(v[c]);
      }
    }
  });
  if constexpr (!std::is_same<T, float>::value)
    for (int64_t d = 0; d < (b1 - b0) * D; ++d) out[b0 * D + d] = static_cast<T>(a[d]);
  // Frozen (stale-skipped) slots are read but get no update: drop them from the plan here,
  // before the backward sorts anything.
  ck.plan.clear();
  ck.plan_scale.clear();
  if (frozen != nullptr) {
    for (int64_t t = 0; t < n; ++t) {
      if (frozen[ck.items[t].slot]) continue;
      ck.plan.push_back(ck.items[t]);
      if (scaled) ck.plan_scale.push_back(ck.scale[t]);
    }
  }
}

// Chunks of kBagsPerChunk bags, handed out dynamically (Zipf makes their cost uneven).
template <typename T, typename I>
void lookup_chunks(const T* values, const RowIndex& ix, int64_t B, const I* idx, const I* off,
                   int64_t num_bags, const float* psw, int64_t mode, int64_t pad,
                   const bool* frozen, T* out, std::vector<Chunk>& chunks,
                   std::atomic<bool>& corrupt) {
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  const int nt = num_threads();
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> acc;
    std::vector<int64_t> hdr;
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t b0 = c * kBagsPerChunk, b1 = std::min(num_bags, b0 + kBagsPerChunk);
      lookup_chunk<T, I>(values, ix, B, idx, off, b0, b1, psw, mode, pad, frozen, out,
                         chunks[c], acc, hdr, corrupt);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> staged_lookup(
    const char* op, const at::Tensor& values, const at::Tensor& row_ptr,
    const at::Tensor& row_slots, const at::Tensor& row_mask, const at::Tensor& indices,
    const at::Tensor& offsets, const c10::optional<at::Tensor>& per_sample_weights,
    const c10::optional<at::Tensor>& frozen, int64_t num_blocks, int64_t mode,
    int64_t padding_idx, bool emit_plan) {
  const dsl::PoolDims p =
      dsl::check_pool(op, &values, row_ptr, row_slots, row_mask, num_blocks);
  const int64_t num_bags = dsl::check_bags(op, indices, offsets, per_sample_weights, mode,
                                           padding_idx, p.N, values.device());
  TORCH_CHECK(mode == dsl::kModeSum || mode == dsl::kModeMean, op,
              ": mode must be 0 (sum) or 1 (mean); max pooling uses lookup + fused_update_rows");
  // (lookup.cpp checks this before it takes the staged path: the old kernel has no such limit)
  TORCH_CHECK(num_bags <= std::numeric_limits<int32_t>::max() / p.NB, op,
              ": num_bags * num_blocks must fit in int32, got ", num_bags, " x ", p.NB);
  dsl::check_frozen(op, frozen, p.C, values.device());
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  dsl::check_bag_values_cpu(op, idx, off, p.N);
  const at::Tensor vals = values.contiguous(), rp = row_ptr.contiguous(),
                   rs = row_slots.contiguous(), rm = row_mask.contiguous();
  const at::Tensor w = psw_float(per_sample_weights);
  const at::Tensor fz = frozen.has_value() ? frozen->contiguous() : at::Tensor();
  const int64_t D = p.NB * p.B;
  const bool scaled = w.defined() || mode == dsl::kModeMean;

  at::Tensor out = at::empty({num_bags, D}, values.options());
  const int64_t nchunks = (num_bags + kBagsPerChunk - 1) / kBagsPerChunk;
  std::vector<Chunk> chunks(nchunks);
  const RowIndex ix(rp, rs, rm, p);
  std::atomic<bool> corrupt{false};
  DSL_DISPATCH_VALUE_TYPES(values.scalar_type(), "staged_lookup", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "staged_lookup", [&] {
      lookup_chunks<scalar_t, index_t>(
          vals.data_ptr<scalar_t>(), ix, p.B, idx.data_ptr<index_t>(), off.data_ptr<index_t>(),
          num_bags, w.defined() ? w.data_ptr<float>() : nullptr, mode, padding_idx,
          fz.defined() ? fz.data_ptr<bool>() : nullptr, out.data_ptr<scalar_t>(), chunks,
          corrupt);
    });
  });
  check_not_corrupt(op, corrupt.load());
  if (!emit_plan) return {out, at::Tensor(), at::Tensor()};

  // Concatenate the chunks' plans in bag order.
  const bool fzd = fz.defined();
  std::vector<int64_t> start(nchunks + 1, 0);
  for (int64_t c = 0; c < nchunks; ++c)
    start[c + 1] = start[c] + int64_t((fzd ? chunks[c].plan : chunks[c].items).size());
  const int64_t P = start[nchunks];
  const auto iopts = values.options().dtype(at::kInt);
  at::Tensor plan = at::empty({P, 2}, iopts);
  at::Tensor plan_scale = at::empty({scaled ? P : 0}, values.options().dtype(at::kFloat));
  Item* dst = reinterpret_cast<Item*>(plan.data_ptr<int32_t>());
  float* dsc = scaled ? plan_scale.data_ptr<float>() : nullptr;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const auto& it = fzd ? chunks[c].plan : chunks[c].items;
      const auto& sc = fzd ? chunks[c].plan_scale : chunks[c].scale;
      if (!it.empty()) std::memcpy(dst + start[c], it.data(), it.size() * sizeof(Item));
      if (dsc != nullptr && !sc.empty())
        std::memcpy(dsc + start[c], sc.data(), sc.size() * sizeof(float));
    }
  });
  return {out, plan, plan_scale};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_lookup_cpu(
    const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& row_slots,
    const at::Tensor& row_mask, const at::Tensor& indices, const at::Tensor& offsets,
    const c10::optional<at::Tensor>& per_sample_weights, const c10::optional<at::Tensor>& frozen,
    int64_t num_blocks, int64_t mode, int64_t padding_idx) {
  return staged_lookup("dsl_C::fused_lookup", values, row_ptr, row_slots, row_mask, indices,
                       offsets, per_sample_weights, frozen, num_blocks, mode, padding_idx, true);
}

// ----------------------------------------------------------------------------- backward

// Stable LSD radix sort of the items (and their scales) by slot (keys < C): 11-bit digits, so a
// pool of up to 4M slots takes two passes. Per-thread histograms over contiguous ranges keep it
// stable; the records themselves move, so the update then reads them sequentially.
void sort_by_slot(std::vector<Item>& items, std::vector<float>& scale, int64_t C) {
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  const int64_t P = static_cast<int64_t>(items.size());
  const bool scaled = !scale.empty();
  int passes = 0;
  while ((int64_t(1) << (kBits * passes)) < C) ++passes;
  std::vector<Item> tmp(P);
  std::vector<float> tmp_scale(scaled ? P : 0);
  const int nt = P >= (1 << 15) ? num_threads() : 1;
  std::vector<int64_t> hist(int64_t(nt) * kBuckets);
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = kBits * pass;
    std::fill(hist.begin(), hist.end(), 0);
    const Item* src = items.data();
    const float* ssrc = scale.data();
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
      const int t = omp_get_thread_num();
#else
      const int t = 0;
#endif
      const int64_t e0 = P * t / nt, e1 = P * (t + 1) / nt;
      int64_t* h = hist.data() + int64_t(t) * kBuckets;
      for (int64_t e = e0; e < e1; ++e) ++h[(src[e].slot >> shift) & (kBuckets - 1)];
#pragma omp barrier
#pragma omp single
      {
        int64_t sum = 0;  // digit-major, thread-minor: stable
        for (int d = 0; d < kBuckets; ++d)
          for (int u = 0; u < nt; ++u) {
            int64_t& x = hist[int64_t(u) * kBuckets + d];
            const int64_t c = x;
            x = sum;
            sum += c;
          }
      }
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t to = h[(src[e].slot >> shift) & (kBuckets - 1)]++;
        tmp[to] = src[e];
        if (scaled) tmp_scale[to] = ssrc[e];
      }
    }
    items.swap(tmp);
    scale.swap(tmp_scale);
  }
}

template <typename T>
int64_t apply_kernel(const T* go, T* val, float* s1, float* s2, const Item* plan,
                     const float* plan_scale, int64_t P, int64_t C, int64_t B,
                     const dsl_fused::Hyper& h) {
  std::vector<Item> items(plan, plan + P);
  std::vector<float> scale;
  if (plan_scale != nullptr) scale.assign(plan_scale, plan_scale + P);
  sort_by_slot(items, scale, C);
  const float* sc = scale.empty() ? nullptr : scale.data();
  std::vector<int64_t> seg;  // starts of the runs of equal slots, + P
  seg.reserve(P / 2 + 1);
  for (int64_t e = 0; e < P; ++e)
    if (e == 0 || items[e].slot != items[e - 1].slot) seg.push_back(e);
  seg.push_back(P);
  const int64_t S = static_cast<int64_t>(seg.size()) - 1;
  const int64_t s1_stride = h.optimizer == dsl_fused::kRowwiseAdagrad ? 1 : B;
  auto round = [](float x) { return to_f(static_cast<T>(x)); };
  std::atomic<int64_t> skipped{0};
  const int nt = num_threads();
  with_block_size(B, [&](auto kb) {
    const int64_t Bk = decltype(kb)::value ? decltype(kb)::value : B;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> buf(6 * Bk);
    float *g = buf.data(), *p = g + Bk, *n1 = p + Bk, *n2 = n1 + Bk, *np = n2 + Bk;
    int64_t my_skipped = 0;
#pragma omp for schedule(dynamic, 256)
    for (int64_t u = 0; u < S; ++u) {
      if (u + kAhead < S) {  // the slot's values and state are scattered over the pool
        const Item& ahead = items[seg[u + kAhead]];
        const int64_t ps = ahead.slot;
        __builtin_prefetch(val + ps * Bk, 1);
        if (s1) __builtin_prefetch(s1 + ps * s1_stride, 1);
        if (s2) __builtin_prefetch(s2 + ps * Bk, 1);
        __builtin_prefetch(go + int64_t(ahead.gofs) * Bk);  // its first gradient block
      }
      const int64_t slot = items[seg[u]].slot;
      for (int64_t k = 0; k < Bk; ++k) g[k] = 0.0f;
      for (int64_t e = seg[u]; e < seg[u + 1]; ++e) {
        const T* gr = go + int64_t(items[e].gofs) * Bk;
        if (sc != nullptr) {
          const float sv = sc[e];
          for (int64_t k = 0; k < Bk; ++k) g[k] = g[k] + to_f(gr[k]) * sv;
        } else {
          for (int64_t k = 0; k < Bk; ++k) g[k] = g[k] + to_f(gr[k]);
        }
      }
      T* v = val + slot * Bk;
      for (int64_t k = 0; k < Bk; ++k) p[k] = to_f(v[k]);
      float* a = s1 ? s1 + slot * s1_stride : nullptr;
      float* b = s2 ? s2 + slot * Bk : nullptr;
      if (dsl_fused::update_block(h, Bk, g, p, a, b, n1, n2, np, round)) {
        for (int64_t k = 0; k < Bk; ++k) v[k] = static_cast<T>(p[k]);
      } else {
        ++my_skipped;
      }
    }
    skipped += my_skipped;
  }
  });
  return skipped.load();
}

at::Tensor fused_apply_cpu(const at::Tensor& grad_out, at::Tensor& values, at::Tensor& state1,
                           at::Tensor& state2, const at::Tensor& plan,
                           const at::Tensor& plan_scale, int64_t optimizer, double lr,
                           double beta1, double beta2, double eps, double weight_decay,
                           double step_size, int64_t nan_policy) {
  const auto dev = values.device();
  check_fused_pool(kApplyOp, grad_out, values, state1, state2, optimizer);
  TORCH_CHECK(plan.scalar_type() == at::kInt && plan.dim() == 2 && plan.size(1) == 2 &&
                  plan.is_contiguous() && plan.device() == dev,
              kApplyOp, ": plan must be a contiguous int32 [P, 2] tensor on ", dev,
              " (what fused_lookup returned), got ", plan.scalar_type(), " of shape ",
              plan.sizes());
  const int64_t P = plan.size(0), C = values.size(0), B = values.size(1);
  TORCH_CHECK(plan_scale.numel() == 0 ||
                  (plan_scale.scalar_type() == at::kFloat && plan_scale.dim() == 1 &&
                   plan_scale.numel() == P && plan_scale.is_contiguous() &&
                   plan_scale.device() == dev),
              kApplyOp, ": plan_scale must be empty or a contiguous fp32 [", P, "] tensor, got ",
              plan_scale.scalar_type(), " of shape ", plan_scale.sizes());
  TORCH_CHECK(grad_out.size(1) % B == 0, kApplyOp,
              ": grad_out's width must be a multiple of block_size");
  const Item* items = reinterpret_cast<const Item*>(plan.data_ptr<int32_t>());
  // A plan is batch-sized: checking it costs nothing next to the update, and a bad one must not
  // write outside the pool.
  const int64_t G = grad_out.numel() / B;
  bool bad = false;
  for (int64_t e = 0; e < P; ++e)
    bad |= (items[e].slot < 0) | (items[e].slot >= C) | (items[e].gofs < 0) |
           (int64_t(items[e].gofs) >= G);
  if (bad) {
    for (int64_t e = 0; e < P; ++e) {
      TORCH_CHECK_INDEX(items[e].slot >= 0 && items[e].slot < C, kApplyOp, ": plan[", e,
                        ", 0] = ", items[e].slot, " is not a slot of the pool [0, ", C, ")");
      TORCH_CHECK_INDEX(items[e].gofs >= 0 && int64_t(items[e].gofs) < G, kApplyOp, ": plan[",
                        e, ", 1] = ", items[e].gofs, " is not a block of grad_out [0, ", G, ")");
    }
  }
  const dsl_fused::Hyper h = make_hyper(optimizer, lr, beta1, beta2, eps, weight_decay,
                                        step_size, nan_policy);
  const at::Tensor go = grad_out.contiguous();
  const float* sc = plan_scale.numel() ? plan_scale.data_ptr<float>() : nullptr;
  float* s1 = state1.numel() ? state1.data_ptr<float>() : nullptr;
  float* s2 = state2.numel() ? state2.data_ptr<float>() : nullptr;
  int64_t skipped = 0;
  DSL_DISPATCH_VALUE_TYPES(values.scalar_type(), kApplyOp, [&] {
    skipped = apply_kernel<scalar_t>(go.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), s1,
                                     s2, items, sc, P, C, B, h);
  });
  return at::full({1}, skipped, values.options().dtype(at::kLong));
}

}  // namespace
}  // namespace dsl_cpu

TORCH_LIBRARY_FRAGMENT(dsl_C, m) {
  m.def(
      "fused_lookup(Tensor values, Tensor row_ptr, Tensor row_slots, Tensor row_mask, "
      "Tensor indices, Tensor offsets, Tensor? per_sample_weights, Tensor? frozen, "
      "int num_blocks, int mode, int padding_idx) -> (Tensor, Tensor, Tensor)");
  m.def(
      "fused_apply(Tensor grad_out, Tensor(a!) values, Tensor(b!) state1, Tensor(c!) state2, "
      "Tensor plan, Tensor plan_scale, int optimizer, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, float step_size, int nan_policy) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsl_C, CPU, m) {
  m.impl("fused_lookup", &dsl_cpu::fused_lookup_cpu);
  m.impl("fused_apply", &dsl_cpu::fused_apply_cpu);
}
