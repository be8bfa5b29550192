// dsl_C::lookup_backward on CPU: masked gradient scatter into the slot pool.
//
// Deterministic by construction (the `deterministic` flag changes nothing here): entries are
// grouped so that every row (hence every slot) belongs to exactly one group (group_by_row), the
// groups run in parallel, and inside a group the entries keep their original order. Each slot
// therefore receives its contributions in entry order no matter how many threads run, with no
// atomics and no per-thread copies of the gradient. Only active, non-frozen blocks of
// non-padding entries receive anything; the gradient is accumulated in fp32 and rounded once to
// the values dtype.
#include <torch/library.h>

#include "common.h"

namespace dsl_cpu {
namespace {

constexpr const char* kOp = "dsl_C::lookup_backward";

template <typename G, typename I>
void backward_kernel(const G* grad_out, const RowIndex& ix, int64_t B, const I* idx,
                     const I* off, int64_t num_bags, const float* psw, const int64_t* max_idx,
                     const bool* frozen, int64_t mode, int64_t pad, float* grad,
                     std::atomic<bool>& corrupt) {
  const int64_t D = ix.NB * B;
  const int64_t L = static_cast<int64_t>(off[num_bags]);
  if (L == 0) return;
  const EntryScales es = entry_scales(idx, off, num_bags, psw, mode, pad);
  const int nt = num_threads();
  // More groups than threads so that dynamic scheduling evens out the Zipf-hot rows.
  const int64_t ngroups = (nt == 1 || L < 1024) ? 1 : int64_t(nt) * 16;
  const RowGroups rg = group_by_row(idx, L, pad, ngroups);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (ngroups > 1)
  for (int64_t k = 0; k < ngroups; ++k) {
    const int64_t end = rg.start[k + 1];
    for (int64_t q = rg.start[k]; q < end; ++q) {
      if (max_idx == nullptr)
        ix.prefetch([&](int64_t u) { return static_cast<int64_t>(idx[rg.entry[u]]); }, q, end,
                    reinterpret_cast<const char*>(grad), B * int64_t(sizeof(float)));
      const int64_t i = rg.entry[q];
      const int64_t r = idx[i];
      const int64_t b = es.bag_of[i];
      const float s = es.scale[i];
      const G* gb = grad_out + b * D;
      const int64_t* mb = max_idx != nullptr ? max_idx + b * D : nullptr;
      const bool ok = ix.for_active(r, [&](int64_t j, int64_t slot) {
        if (frozen != nullptr && frozen[slot]) return;
        float* dst = grad + slot * B;
        const G* src = gb + j * B;
        if (mb == nullptr) {
          for (int64_t c = 0; c < B; ++c) dst[c] += to_f(src[c]) * s;
        } else {
          // Max mode: only the entry that won column d gets grad_out[b, d].
          const int64_t* mi = mb + j * B;
          for (int64_t c = 0; c < B; ++c) dst[c] += (mi[c] == i) ? to_f(src[c]) : 0.0f;
        }
      });
      if (!ok) corrupt.store(true, std::memory_order_relaxed);
    }
  }
}

at::Tensor lookup_backward_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                               const at::Tensor& row_ptr, const at::Tensor& row_slots,
                               const at::Tensor& row_mask, const at::Tensor& indices,
                               const at::Tensor& offsets,
                               const c10::optional<at::Tensor>& per_sample_weights,
                               const at::Tensor& max_idx, const c10::optional<at::Tensor>& frozen,
                               int64_t num_blocks, int64_t mode, int64_t padding_idx,
                               bool deterministic) {
  (void)deterministic;  // always deterministic on CPU
  const dsl::PoolDims p = dsl::check_pool(kOp, &values, row_ptr, row_slots, row_mask, num_blocks);
  const c10::Device dev = values.device();
  const int64_t num_bags =
      dsl::check_bags(kOp, indices, offsets, per_sample_weights, mode, padding_idx, p.N, dev);
  const int64_t D = p.NB * p.B;
  dsl::check_grad_out(kOp, grad_out, num_bags, D, dev);
  dsl::check_max_idx_shape(kOp, max_idx, mode, num_bags, D, dev);
  dsl::check_frozen(kOp, frozen, p.C, dev);
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
  const at::Tensor fz = frozen.has_value() ? frozen->contiguous() : at::Tensor();

  at::Tensor grad = at::zeros({p.C, p.B}, values.options().dtype(at::kFloat));
  const RowIndex ix(rp, rs, rm, p);
  std::atomic<bool> corrupt{false};
  DSL_DISPATCH_VALUE_TYPES(g.scalar_type(), "dsl_C::lookup_backward", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "dsl_C::lookup_backward", [&] {
      backward_kernel<scalar_t, index_t>(
          g.data_ptr<scalar_t>(), ix, p.B, idx.data_ptr<index_t>(), off.data_ptr<index_t>(),
          num_bags, w.defined() ? w.data_ptr<float>() : nullptr,
          mi.defined() ? mi.data_ptr<int64_t>() : nullptr,
          fz.defined() ? fz.data_ptr<bool>() : nullptr, mode, padding_idx,
          grad.data_ptr<float>(), corrupt);
    });
  });
  check_not_corrupt(kOp, corrupt.load());
  return values.scalar_type() == at::kFloat ? grad : grad.to(values.scalar_type());
}

}  // namespace
}  // namespace dsl_cpu

TORCH_LIBRARY_IMPL(dsl_C, CPU, m) { m.impl("lookup_backward", &dsl_cpu::lookup_backward_cpu); }
