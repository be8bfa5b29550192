// dsl_C::grow_scores on CPU: the growth criterion of DSL for the rows a batch touched.
//
// For every distinct non-padding row r of the batch (ascending) and every INACTIVE block j of
// it: the L2 norm of the dense gradient of block (r, j), i.e. of the sum over the row's entries
// of their scaled grad_out; active blocks score 0 (they already hold a slot). The entries are
// sorted by (row, position), so each row is one segment summed in entry order (the reference
// order) and the segments run in parallel. The sort is a stable radix sort by row (the order of
// sorting the (row, position) pairs); the entries' bag rows are prefetched ahead. The row's
// whole gradient is summed (each entry's grad_out row read once, contiguously); only inactive
// blocks get a norm.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "common.h"

namespace dsl_cpu {
namespace {

constexpr const char* kOp = "dsl_C::grow_scores";

// Kept entries sorted by (row, position): returns the permutation, the segment starts and each
// segment's row. The entries are taken in position order and sorted by row with a stable LSD
// radix sort (11-bit digits, as many passes as the rows' bits need: 2 at 1e6 rows), which gives
// exactly the (row, position) order of a comparison sort of the pairs, in O(L) per pass.
template <typename I>
void sort_entries_by_row(const I* idx, int64_t L, int64_t pad, int64_t N,
                         std::vector<int64_t>& order, std::vector<int64_t>& seg,
                         std::vector<int64_t>& seg_row) {
  order.clear();
  seg.clear();
  seg_row.clear();
  if (N < (int64_t(1) << 31) && L < (int64_t(1) << 32)) {
    // (row << 32) | position in one 64-bit word; sorted by the row digits only (stable).
    std::vector<uint64_t> key, tmp;
    key.reserve(L);
    for (int64_t i = 0; i < L; ++i) {
      const int64_t r = idx[i];
      if (r != pad) key.push_back((static_cast<uint64_t>(r) << 32) | static_cast<uint64_t>(i));
    }
    const int64_t K = static_cast<int64_t>(key.size());
    int bits = 0;
    while (bits < 31 && (int64_t(1) << bits) < N) ++bits;
    constexpr int kDigit = 11;
    if (K > 1 && bits > 0) {
      tmp.resize(K);
      std::vector<int64_t> cnt(int64_t(1) << kDigit);
      for (int shift = 0; shift < bits; shift += kDigit) {
        std::fill(cnt.begin(), cnt.end(), 0);
        const int sh = 32 + shift;
        const uint64_t dm = (uint64_t(1) << kDigit) - 1;
        for (int64_t k = 0; k < K; ++k) ++cnt[(key[k] >> sh) & dm];
        int64_t sum = 0;
        for (auto& c : cnt) {
          const int64_t n = c;
          c = sum;
          sum += n;
        }
        for (int64_t k = 0; k < K; ++k) tmp[cnt[(key[k] >> sh) & dm]++] = key[k];
        key.swap(tmp);
      }
    }
    order.resize(K);
    for (int64_t k = 0; k < K; ++k) {
      order[k] = static_cast<int64_t>(key[k] & 0xFFFFFFFFull);
      if (k == 0 || (key[k] >> 32) != (key[k - 1] >> 32)) {
        seg.push_back(k);
        seg_row.push_back(static_cast<int64_t>(key[k] >> 32));
      }
    }
  } else {
    std::vector<std::pair<int64_t, int64_t>> key;
    key.reserve(L);
    for (int64_t i = 0; i < L; ++i) {
      const int64_t r = idx[i];
      if (r != pad) key.emplace_back(r, i);
    }
    std::sort(key.begin(), key.end());
    order.resize(key.size());
    for (size_t k = 0; k < key.size(); ++k) {
      order[k] = key[k].second;
      if (k == 0 || key[k].first != key[k - 1].first) {
        seg.push_back(static_cast<int64_t>(k));
        seg_row.push_back(key[k].first);
      }
    }
  }
  seg.push_back(static_cast<int64_t>(order.size()));
}

template <typename G, typename I>
std::tuple<at::Tensor, at::Tensor> grow_kernel(const G* grad_out, const RowIndex& ix, int64_t B,
                                               const I* idx, const I* off, int64_t num_bags,
                                               const float* psw, const int64_t* max_idx,
                                               int64_t mode, int64_t pad,
                                               const at::TensorOptions& opts) {
  const int64_t D = ix.NB * B;
  const int64_t L = static_cast<int64_t>(off[num_bags]);
  const EntryScales es = entry_scales(idx, off, num_bags, psw, mode, pad);
  std::vector<int64_t> order, seg, seg_row;
  sort_entries_by_row(idx, L, pad, ix.N, order, seg, seg_row);
  const int64_t K = static_cast<int64_t>(order.size());
  const int64_t* bag_of = es.bag_of.data();
  const int64_t R = static_cast<int64_t>(seg.size()) - 1;
  at::Tensor rows = at::empty({R}, opts.dtype(at::kLong));
  at::Tensor scores = at::zeros({R, ix.NB}, opts.dtype(at::kFloat));
  int64_t* rows_p = rows.data_ptr<int64_t>();
  float* sc = scores.data_ptr<float>();
  const int nt = num_threads();
  const uint64_t* mask = reinterpret_cast<const uint64_t*>(ix.row_mask);
#pragma omp parallel num_threads(nt) if (R > 64)
  {
    // The whole row's gradient, entry by entry: each entry's grad_out row is read once, in
    // order (per block it was re-read one block at a time, each a cache miss). Every column
    // still sums the row's entries in entry order, so the scores are bit-identical.
    std::vector<float> acc(D);
#pragma omp for schedule(dynamic, 8)
    for (int64_t u = 0; u < R; ++u) {
      if (u + 8 < R) __builtin_prefetch(mask + seg_row[u + 8] * ix.W);
      const int64_t r = seg_row[u];
      rows_p[u] = r;
      const uint64_t* m = mask + r * ix.W;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = seg[u]; k < seg[u + 1]; ++k) {
        // The entries' positions are scattered: fetch bag_of 16 entries ahead and the bag's
        // grad_out row (and max_idx row) 8 ahead.
        if (k + 16 < K) __builtin_prefetch(bag_of + order[k + 16]);
        if (k + 8 < K) {
          const int64_t pb = bag_of[order[k + 8]];
          const char* g = reinterpret_cast<const char*>(grad_out + pb * D);
          for (int64_t o = 0; o < D * static_cast<int64_t>(sizeof(G)); o += 64)
            __builtin_prefetch(g + o);
          if (max_idx != nullptr) {
            const char* m8 = reinterpret_cast<const char*>(max_idx + pb * D);
            for (int64_t o = 0; o < D * static_cast<int64_t>(sizeof(int64_t)); o += 64)
              __builtin_prefetch(m8 + o);
          }
        }
        const int64_t i = order[k];
        const int64_t b = bag_of[i];
        const G* src = grad_out + b * D;
        if (max_idx == nullptr) {
          const float s = es.scale[i];
          for (int64_t c = 0; c < D; ++c) acc[c] += to_f(src[c]) * s;
        } else {
          const int64_t* mi = max_idx + b * D;
          for (int64_t c = 0; c < D; ++c) acc[c] += (mi[c] == i) ? to_f(src[c]) : 0.0f;
        }
      }
      for (int64_t j = 0; j < ix.NB; ++j) {
        if ((m[j >> 6] >> (j & 63)) & 1) continue;  // active: score 0
        const float* a = acc.data() + j * B;
        float sq = 0.0f;
        for (int64_t c = 0; c < B; ++c) sq += a[c] * a[c];
        sc[u * ix.NB + j] = std::sqrt(sq);
      }
    }
  }
  return {rows, scores};
}

std::tuple<at::Tensor, at::Tensor> grow_scores_cpu(
    const at::Tensor& grad_out, const at::Tensor& row_ptr, const at::Tensor& row_slots,
    const at::Tensor& row_mask, const at::Tensor& indices, const at::Tensor& offsets,
    const c10::optional<at::Tensor>& per_sample_weights, const at::Tensor& max_idx,
    int64_t num_blocks, int64_t mode, int64_t padding_idx) {
  dsl::PoolDims p = dsl::check_pool(kOp, nullptr, row_ptr, row_slots, row_mask, num_blocks);
  const c10::Device dev = row_ptr.device();
  const int64_t num_bags =
      dsl::check_bags(kOp, indices, offsets, per_sample_weights, mode, padding_idx, p.N, dev);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == num_bags && grad_out.size(1) >= 1 &&
                  grad_out.size(1) % num_blocks == 0,
              kOp, ": grad_out must have shape [num_bags, num_blocks * block_size] with num_bags = ",
              num_bags, " and num_blocks = ", num_blocks, ", got ", grad_out.sizes());
  p.B = grad_out.size(1) / num_blocks;
  const int64_t D = grad_out.size(1);
  dsl::check_grad_out(kOp, grad_out, num_bags, D, dev);
  dsl::check_max_idx_shape(kOp, max_idx, mode, num_bags, D, dev);
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  dsl::check_bag_values_cpu(kOp, idx, off, p.N);
  at::Tensor mi;
  if (mode == dsl::kModeMax) {
    mi = max_idx.contiguous();
    dsl::check_max_idx_cpu(kOp, mi, off, D);
  }
  const at::Tensor g = grad_out.contiguous(), rp = row_ptr.contiguous(),
                   rs = row_slots.contiguous(), rm = row_mask.contiguous();
  const at::Tensor w = psw_float(per_sample_weights);
  const RowIndex ix(rp, rs, rm, p);
  std::tuple<at::Tensor, at::Tensor> result;
  DSL_DISPATCH_VALUE_TYPES(g.scalar_type(), "dsl_C::grow_scores", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "dsl_C::grow_scores", [&] {
      result = grow_kernel<scalar_t, index_t>(
          g.data_ptr<scalar_t>(), ix, p.B, idx.data_ptr<index_t>(), off.data_ptr<index_t>(),
          num_bags, w.defined() ? w.data_ptr<float>() : nullptr,
          mi.defined() ? mi.data_ptr<int64_t>() : nullptr, mode, padding_idx,
          grad_out.options());
    });
  });
  return result;
}

}  // namespace
}  // namespace dsl_cpu

TORCH_LIBRARY_IMPL(dsl_C, CPU, m) { m.impl("grow_scores", &dsl_cpu::grow_scores_cpu); }
