// dsl_C::lookup on CPU: embedding-bag forward over the block-slot pool.
//
// Sum and mean take the staged walk of staged_lookup.h (fused_step.cpp). Max pooling:
// one OpenMP task per bag (bags are independent, so no synchronisation); for each entry the
// active blocks of its row are found by walking the set bits of the row mask, and each block's
// B values are accumulated into an fp32 row buffer by a loop over the block that the compiler
// vectorises. Inactive blocks read as zero: they add nothing to sum/mean and count as 0 in max.
#include <torch/library.h>

#include <limits>

#include "common.h"
#include "staged_lookup.h"

namespace dsl_cpu {
namespace {

constexpr const char* kOp = "dsl_C::lookup";

template <typename T, typename I>
void lookup_kernel(const T* values, const RowIndex& ix, int64_t B, const I* idx, const I* off,
                   int64_t num_bags, const float* psw, int64_t mode, int64_t pad, T* out,
                   int64_t* max_idx, std::atomic<bool>& corrupt) {
  const int64_t D = ix.NB * B;
  const int64_t L = static_cast<int64_t>(off[num_bags]);
  const int nt = num_threads();
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> acc(D);
    std::vector<int32_t> arg(mode == dsl::kModeMax ? D : 0);
    const std::vector<T> zero(B, T(0.0f));  // what an inactive block reads
#pragma omp for schedule(dynamic, 16)
    for (int64_t b = 0; b < num_bags; ++b) {
      const int64_t lo = off[b], hi = off[b + 1];
      float* a = acc.data();
      if (mode != dsl::kModeMax) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        float cnt = 1.0f;
        if (mode == dsl::kModeMean) {
          int64_t n = 0;
          for (int64_t i = lo; i < hi; ++i) n += (static_cast<int64_t>(idx[i]) != pad);
          cnt = static_cast<float>(n > 0 ? n : 1);
        }
        for (int64_t i = lo; i < hi; ++i) {
          ix.prefetch([&](int64_t k) { return static_cast<int64_t>(idx[k]); }, i, L,
                      reinterpret_cast<const char*>(values), B * int64_t(sizeof(T)));
          const int64_t r = idx[i];
          if (r == pad) continue;
          float s = 1.0f;
          if (psw != nullptr) s = s * psw[i];
          if (mode == dsl::kModeMean) s = s / cnt;
          const bool ok = ix.for_active(r, [&](int64_t j, int64_t slot) {
            const T* v = values + slot * B;
            float* aj = a + j * B;
            for (int64_t c = 0; c < B; ++c) aj[c] += to_f(v[c]) * s;
          });
          if (!ok) corrupt.store(true, std::memory_order_relaxed);
        }
      } else {
        // Max over the dense image rows: every block counts, inactive ones as 0 (read from a
        // zero block, so the loop over the block has no branch and vectorises). The first
        // kept entry initialises the maximum; later ones replace it only when strictly
        // greater, so the first entry reaching the maximum wins (torch's rule). Winners are
        // tracked as int32 offsets in the bag (same width as the float compare mask).
        int32_t* g = arg.data();
        std::fill(acc.begin(), acc.end(), 0.0f);
        std::fill(arg.begin(), arg.end(), int32_t(-1));
        bool first = true;
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t r = idx[i];
          if (r == pad) continue;
          const int32_t rel = static_cast<int32_t>(i - lo);
          const uint64_t* m = reinterpret_cast<const uint64_t*>(ix.row_mask) + r * ix.W;
          int64_t pos = ix.row_ptr[r];
          for (int64_t j = 0; j < ix.NB; ++j) {
            const T* v = zero.data();
            if ((m[j >> 6] >> (j & 63)) & 1) {
              const int64_t slot = (pos >= 0 && pos < ix.C) ? ix.row_slots[pos] : -1;
              ++pos;
              if (slot < 0 || slot >= ix.C) {
                corrupt.store(true, std::memory_order_relaxed);
              } else {
                v = values + slot * B;
              }
            }
            float* aj = a + j * B;
            int32_t* gj = g + j * B;
            if (first) {
              for (int64_t c = 0; c < B; ++c) {
                aj[c] = to_f(v[c]);
                gj[c] = rel;
              }
            } else {
              for (int64_t c = 0; c < B; ++c) {
                const float x = to_f(v[c]);
                const bool take = x > aj[c];
                aj[c] = take ? x : aj[c];
                gj[c] = take ? rel : gj[c];
              }
            }
          }
          first = false;
        }
        int64_t* mb = max_idx + b * D;
        for (int64_t d = 0; d < D; ++d) mb[d] = g[d] < 0 ? int64_t(-1) : lo + g[d];
      }
      T* o = out + b * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(a[d]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> lookup_cpu(const at::Tensor& values, const at::Tensor& row_ptr,
                                              const at::Tensor& row_slots,
                                              const at::Tensor& row_mask, const at::Tensor& indices,
                                              const at::Tensor& offsets,
                                              const c10::optional<at::Tensor>& per_sample_weights,
                                              int64_t num_blocks, int64_t mode,
                                              int64_t padding_idx) {
  const dsl::PoolDims p = dsl::check_pool(kOp, &values, row_ptr, row_slots, row_mask, num_blocks);
  const int64_t num_bags = dsl::check_bags(kOp, indices, offsets, per_sample_weights, mode,
                                           padding_idx, p.N, values.device());
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  const int64_t L = dsl::check_bag_values_cpu(kOp, idx, off, p.N);
  TORCH_CHECK(mode != dsl::kModeMax || L < std::numeric_limits<int32_t>::max(), kOp,
              ": max mode supports at most 2^31 - 1 entries per batch, got ", L);
  const at::Tensor vals = values.contiguous(), rp = row_ptr.contiguous(),
                   rs = row_slots.contiguous(), rm = row_mask.contiguous();
  const at::Tensor w = psw_float(per_sample_weights);
  const int64_t D = p.NB * p.B;
  const auto long_opts = values.options().dtype(at::kLong);
  if (mode != dsl::kModeMax && num_bags <= std::numeric_limits<int32_t>::max() / p.NB) {
    // sum/mean: the staged walk of fused_step.cpp (same sums, same order; several times faster
    // on tables larger than the caches). Max keeps the kernel below.
    at::Tensor out = std::get<0>(staged_lookup(kOp, values, row_ptr, row_slots, row_mask,
                                               indices, offsets, per_sample_weights,
                                               c10::nullopt, num_blocks, mode, padding_idx,
                                               false));
    return {out, at::empty({0}, long_opts)};
  }

  at::Tensor out = at::empty({num_bags, D}, values.options());
  at::Tensor max_idx = mode == dsl::kModeMax ? at::empty({num_bags, D}, long_opts)
                                             : at::empty({0}, long_opts);
  const RowIndex ix(rp, rs, rm, p);
  std::atomic<bool> corrupt{false};
  DSL_DISPATCH_VALUE_TYPES(values.scalar_type(), "dsl_C::lookup", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "dsl_C::lookup", [&] {
      lookup_kernel<scalar_t, index_t>(
          vals.data_ptr<scalar_t>(), ix, p.B, idx.data_ptr<index_t>(), off.data_ptr<index_t>(),
          num_bags, w.defined() ? w.data_ptr<float>() : nullptr, mode, padding_idx,
          out.data_ptr<scalar_t>(), mode == dsl::kModeMax ? max_idx.data_ptr<int64_t>() : nullptr,
          corrupt);
    });
  });
  check_not_corrupt(kOp, corrupt.load());
  return {out, max_idx};
}

}  // namespace
}  // namespace dsl_cpu

TORCH_LIBRARY_IMPL(dsl_C, CPU, m) { m.impl("lookup", &dsl_cpu::lookup_cpu); }
