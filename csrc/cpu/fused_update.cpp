// dsl_C::fused_update_rows on CPU: the backward of the lookup fused with an optimizer step.
//
// Input is the touched-rows plan built by dsl_kernels/backends/touched_rows.py (or its C++
// twin fused_plan below): the entries of the batch grouped by row (stable sort, so input order inside a row). Every unique row is
// one independent work item: its active blocks are walked in column order, each block's
// gradient is summed over the row's entries in input order (fp32, deterministic, independent of
// the thread count) and the optimizer update is applied right away, so no [C, B] gradient is
// ever formed. Rows are distinct, hence so are their slots: threads never write the same slot.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks.h"
#include "fused_checks.h"
#include "fused_update.h"

namespace {

inline float to_float(float x) { return x; }
inline float to_float(double x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

void check_plan_tensor(const at::Tensor& t, const char* name, at::ScalarType dt,
                       const c10::Device& dev) {
  TORCH_CHECK(t.scalar_type() == dt, "fused_update_rows: ", name, " must be ", dt, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fused_update_rows: ", name, " must be contiguous");
  TORCH_CHECK(t.device() == dev, "fused_update_rows: ", name, " is on ", t.device(),
              " but values are on ", dev);
}

template <typename scalar_t>
int64_t run_cpu(const at::Tensor& grad_out, at::Tensor& values, at::Tensor& state1,
                at::Tensor& state2, const at::Tensor& row_ptr, const at::Tensor& row_slots,
                const at::Tensor& row_mask, const at::Tensor& perm, const at::Tensor& run_start,
                const at::Tensor& run_rows, const at::Tensor& bag, const at::Tensor& scale,
                const at::Tensor& max_idx, const c10::optional<at::Tensor>& frozen,
                int64_t num_blocks, int64_t mode, const dsl_fused::Hyper& h) {
  const int64_t C = values.size(0), B = values.size(1), D = grad_out.size(1);
  const int64_t W = row_mask.size(1), R = run_rows.numel();
  const scalar_t* go = grad_out.data_ptr<scalar_t>();
  scalar_t* val = values.data_ptr<scalar_t>();
  float* s1 = state1.numel() ? state1.data_ptr<float>() : nullptr;
  float* s2 = state2.numel() ? state2.data_ptr<float>() : nullptr;
  const int64_t s1_stride = h.optimizer == dsl_fused::kRowwiseAdagrad ? 1 : B;
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int32_t* rs = row_slots.data_ptr<int32_t>();
  const uint64_t* rm = reinterpret_cast<const uint64_t*>(row_mask.data_ptr<int64_t>());
  const int64_t* pm = perm.data_ptr<int64_t>();
  const int64_t* st = run_start.data_ptr<int64_t>();
  const int64_t* rows = run_rows.data_ptr<int64_t>();
  const int64_t* bg = bag.data_ptr<int64_t>();
  const float* sc = mode == 2 ? nullptr : scale.data_ptr<float>();
  const int64_t* mx = mode == 2 ? max_idx.data_ptr<int64_t>() : nullptr;
  const bool* fz = frozen.has_value() ? frozen->data_ptr<bool>() : nullptr;
  auto round = [](float x) { return to_float(static_cast<scalar_t>(x)); };

  std::atomic<int64_t> skipped{0}, corrupt{0};
  // Grain: a few hundred rows per task keeps the scheduling cost small next to the work.
  // Two phases per batch of runs: (1) resolve the batch's (run, block, slot) work items --
  // independent loads the CPU overlaps; (2) sum and update them, prefetching the values and
  // state of the item kPrefetch ahead: touched slots are scattered over a pool far larger than
  // the caches, so the update is bound by DRAM latency unless misses overlap.
  constexpr int64_t kRunsPerBatch = 64, kPrefetch = 6;
  struct Item {
    int64_t run, col0, slot;
  };
  at::parallel_for(0, R, 256, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(6 * B);
    float *g = buf.data(), *p = g + B, *n1 = p + B, *n2 = n1 + B, *np = n2 + B;
    std::vector<Item> items;
    items.reserve(kRunsPerBatch * 4);
    int64_t my_skipped = 0, my_corrupt = 0;
    for (int64_t rb = r0; rb < r1; rb += kRunsPerBatch) {
      items.clear();
      for (int64_t r = rb; r < std::min(r1, rb + kRunsPerBatch); ++r) {
        const int64_t row = rows[r];
        const uint64_t* m = rm + row * W;
        int64_t pos = rp[row];
        for (int64_t w = 0; w < W; ++w) {
          uint64_t bits = m[w];
          while (bits) {
            const int64_t j = w * 64 + __builtin_ctzll(bits);
            bits &= bits - 1;
            const int64_t slot = (pos >= 0 && pos < C) ? rs[pos] : -1;
            ++pos;
            if (slot < 0 || slot >= C || j >= num_blocks) {
              ++my_corrupt;
              continue;
            }
            if (fz != nullptr && fz[slot]) continue;  // stale-skipped: not touched at all
            items.push_back({r, j * B, slot});
          }
        }
      }
      const int64_t n = static_cast<int64_t>(items.size());
      for (int64_t t = 0; t < n; ++t) {
        if (t + kPrefetch < n) {
          const int64_t ps = items[t + kPrefetch].slot;
          __builtin_prefetch(val + ps * B, 1);
          if (s1) __builtin_prefetch(s1 + ps * s1_stride, 1);
          if (s2) __builtin_prefetch(s2 + ps * B, 1);
        }
        const Item& it = items[t];
        const int64_t e0 = st[it.run], e1 = st[it.run + 1], col0 = it.col0, slot = it.slot;
        for (int64_t k = 0; k < B; ++k) g[k] = 0.0f;
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t i = pm[e];
          const scalar_t* grow = go + bg[i] * D + col0;
          if (sc != nullptr) {
            const float sv = sc[i];
            for (int64_t k = 0; k < B; ++k) g[k] = g[k] + to_float(grow[k]) * sv;
          } else {  // max: only the columns this entry won
            const int64_t* mrow = mx + bg[i] * D + col0;
            for (int64_t k = 0; k < B; ++k)
              if (mrow[k] == i) g[k] = g[k] + to_float(grow[k]);
          }
        }
        scalar_t* v = val + slot * B;
        for (int64_t k = 0; k < B; ++k) p[k] = to_float(v[k]);
        float* a = s1 ? s1 + slot * s1_stride : nullptr;
        float* b = s2 ? s2 + slot * B : nullptr;
        if (dsl_fused::update_block(h, B, g, p, a, b, n1, n2, np, round)) {
          for (int64_t k = 0; k < B; ++k) v[k] = static_cast<scalar_t>(p[k]);
        } else {
          ++my_skipped;
        }
      }
    }
    skipped += my_skipped;
    corrupt += my_corrupt;
  });
  TORCH_CHECK(corrupt.load() == 0,
              "fused_update_rows: the row index (row_ptr / row_slots / row_mask) is inconsistent "
              "with the pool; rebuild it with rebuild_index(coord, ...)");
  return skipped.load();
}

at::Tensor fused_update_rows_cpu(const at::Tensor& grad_out, at::Tensor& values,
                                 at::Tensor& state1, at::Tensor& state2, const at::Tensor& row_ptr,
                                 const at::Tensor& row_slots, const at::Tensor& row_mask,
                                 const at::Tensor& perm, const at::Tensor& run_start,
                                 const at::Tensor& run_rows, const at::Tensor& bag,
                                 const at::Tensor& scale, const at::Tensor& max_idx,
                                 const c10::optional<at::Tensor>& frozen, int64_t num_blocks,
                                 int64_t mode, int64_t optimizer, double lr, double beta1,
                                 double beta2, double eps, double weight_decay, double step_size,
                                 int64_t nan_policy) {
  const auto dev = values.device();
  dsl_cpu::check_fused_pool("fused_update_rows", grad_out, values, state1, state2, optimizer);
  TORCH_CHECK(grad_out.size(1) == num_blocks * values.size(1),
              "fused_update_rows: grad_out must be [num_bags, num_blocks * block_size]");
  TORCH_CHECK(mode >= 0 && mode <= 2, "fused_update_rows: mode must be 0, 1 or 2, got ", mode);
  const int64_t C = values.size(0), B = values.size(1);
  check_plan_tensor(grad_out, "grad_out", values.scalar_type(), dev);
  check_plan_tensor(row_ptr, "row_ptr", at::kInt, dev);
  check_plan_tensor(row_slots, "row_slots", at::kInt, dev);
  check_plan_tensor(row_mask, "row_mask", at::kLong, dev);
  for (auto* t : {&perm, &run_start, &run_rows, &bag})
    check_plan_tensor(*t, "plan", at::kLong, dev);
  TORCH_CHECK(run_start.numel() == run_rows.numel() + 1,
              "fused_update_rows: run_start must have one entry more than run_rows");
  if (mode == 2) {
    check_plan_tensor(max_idx, "max_idx", at::kLong, dev);
  } else {
    check_plan_tensor(scale, "scale", at::kFloat, dev);
  }
  if (frozen.has_value()) {
    check_plan_tensor(*frozen, "frozen", at::kBool, dev);
    TORCH_CHECK(frozen->numel() == C, "fused_update_rows: frozen must have one flag per slot");
  }
  if (run_rows.numel()) {
    const int64_t lo = run_rows.min().item<int64_t>(), hi = run_rows.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < row_mask.size(0), "fused_update_rows: a row id is outside [0, ",
                row_mask.size(0), ")");
  }
  const dsl_fused::Hyper h = dsl_cpu::make_hyper(optimizer, lr, beta1, beta2, eps, weight_decay,
                                                 step_size, nan_policy);
  int64_t skipped = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "fused_update",
                                  [&] {
                                    skipped = run_cpu<scalar_t>(
                                        grad_out, values, state1, state2, row_ptr, row_slots,
                                        row_mask, perm, run_start, run_rows, bag, scale, max_idx,
                                        frozen, num_blocks, mode, h);
                                  });
  return at::full({1}, skipped, values.options().dtype(at::kLong));
}

// The touched-rows plan (see dsl_kernels/backends/touched_rows.py::touched_rows_plan, whose
// outputs these are, except that perm holds only the kept entries). A counting sort by row: O(L + num_rows), stable
// (entries of a row stay in input order), against the O(L log L) comparison sort of the torch
// version -- on CPU the sort was half of the fused step. Tables far larger than the batch fall
// back to sorting (row, position) pairs so the cost stays batch-sized.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_plan_cpu(
    const at::Tensor& indices, const at::Tensor& offsets,
    const c10::optional<at::Tensor>& per_sample_weights, int64_t mode, int64_t padding_idx,
    int64_t num_rows) {
  dsl::check_plan_args(indices, offsets, mode, num_rows);
  const auto idx_t = indices.to(at::kLong).contiguous();
  const auto off_t = offsets.to(at::kLong).contiguous();
  const int64_t L = idx_t.numel(), num_bags = off_t.numel() - 1;
  const int64_t* idx = idx_t.data_ptr<int64_t>();
  const int64_t* off = off_t.data_ptr<int64_t>();
  const auto lopt = idx_t.options();
  auto bag_t = at::empty({L}, lopt);
  int64_t* bag = bag_t.data_ptr<int64_t>();
  const bool is_max = mode == 2;
  auto scale_t = at::empty({is_max ? 0 : L}, lopt.dtype(at::kFloat));
  float* scale = is_max ? nullptr : scale_t.data_ptr<float>();
  at::Tensor psw_t;
  const float* psw = nullptr;
  if (per_sample_weights.has_value() && !is_max) {
    psw_t = per_sample_weights->reshape({-1}).to(at::kFloat).contiguous();
    TORCH_CHECK(psw_t.numel() >= L, "fused_plan: per_sample_weights needs one weight per index");
    psw = psw_t.data_ptr<float>();
  }
  const int64_t end = std::min<int64_t>(L, num_bags >= 0 ? off[num_bags] : 0);
  for (int64_t i = end; i < L; ++i) {  // past offsets[-1]: dropped (bag = num_bags)
    bag[i] = num_bags;
    if (scale) scale[i] = 0.0f;
  }
  std::atomic<int64_t> bad_row{0};
  at::parallel_for(0, num_bags, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = std::max<int64_t>(0, off[b]), hi = std::min<int64_t>(end, off[b + 1]);
      int64_t count = 0;
      for (int64_t i = lo; i < hi; ++i) {
        bag[i] = b;
        if (idx[i] != padding_idx) ++count;
        if (idx[i] < 0 || idx[i] >= num_rows) bad_row += 1;
      }
      if (!scale) continue;
      const float cnt = static_cast<float>(count > 0 ? count : 1);
      for (int64_t i = lo; i < hi; ++i) {  // the reference's order: keep * psw, then / count
        float s = idx[i] != padding_idx ? 1.0f : 0.0f;
        if (psw) s = s * psw[i];
        if (mode == 1) s = s / cnt;
        scale[i] = s;
      }
    }
  });
  TORCH_CHECK(bad_row.load() == 0, "fused_plan: an index is outside [0, ", num_rows, ")");

  std::vector<int64_t> perm, run_rows, run_start;
  perm.reserve(end);
  if (num_rows <= 8 * std::max<int64_t>(end, 1)) {
    std::vector<int64_t> cnt(num_rows + 1, 0);
    for (int64_t i = 0; i < end; ++i)
      if (idx[i] != padding_idx) ++cnt[idx[i] + 1];
    int64_t runs = 0;
    for (int64_t r = 0; r < num_rows; ++r) runs += cnt[r + 1] > 0;
    run_rows.reserve(runs);
    run_start.reserve(runs + 1);
    for (int64_t r = 0; r < num_rows; ++r) {
      if (cnt[r + 1] > 0) {
        run_rows.push_back(r);
        run_start.push_back(cnt[r]);
      }
      cnt[r + 1] += cnt[r];
    }
    run_start.push_back(cnt[num_rows]);
    perm.resize(cnt[num_rows]);
    for (int64_t i = 0; i < end; ++i)  // cnt[r] is now the next free position of row r
      if (idx[i] != padding_idx) perm[cnt[idx[i]]++] = i;
  } else {
    std::vector<std::pair<int64_t, int64_t>> kp;
    kp.reserve(end);
    for (int64_t i = 0; i < end; ++i)
      if (idx[i] != padding_idx) kp.emplace_back(idx[i], i);
    std::sort(kp.begin(), kp.end());  // (row, position): unique keys, so stable by construction
    for (int64_t e = 0; e < static_cast<int64_t>(kp.size()); ++e) {
      if (e == 0 || kp[e].first != kp[e - 1].first) {
        run_rows.push_back(kp[e].first);
        run_start.push_back(e);
      }
      perm.push_back(kp[e].second);
    }
    run_start.push_back(static_cast<int64_t>(kp.size()));
  }
  auto to_t = [&](const std::vector<int64_t>& v) {
    return at::from_blob(const_cast<int64_t*>(v.data()), {static_cast<int64_t>(v.size())},
                         at::kLong)
        .clone();
  };
  return {to_t(perm), to_t(run_start), to_t(run_rows), bag_t, scale_t};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsl_C, m) {
  m.def(
      "fused_plan(Tensor indices, Tensor offsets, Tensor? per_sample_weights, int mode, "
      "int padding_idx, int num_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "fused_update_rows(Tensor grad_out, Tensor(a!) values, Tensor(b!) state1, "
      "Tensor(c!) state2, Tensor row_ptr, Tensor row_slots, Tensor row_mask, Tensor perm, "
      "Tensor run_start, Tensor run_rows, Tensor bag, Tensor scale, Tensor max_idx, "
      "Tensor? frozen, int num_blocks, int mode, int optimizer, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, float step_size, int nan_policy) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsl_C, CPU, m) {
  m.impl("fused_update_rows", &fused_update_rows_cpu);
  m.impl("fused_plan", &fused_plan_cpu);
}
