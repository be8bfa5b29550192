// The staged forward of sum/mean bags (csrc/cpu/fused_step.cpp): each level of the row index
// (mask words, row_ptr, row_slots, values) walked for a chunk of entries in its own loop, so
// the cache misses of many entries overlap. dsl_C::fused_lookup calls it with emit_plan (the
// fused backward's plan); dsl_C::lookup (lookup.cpp) without, for its sum/mean forward.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace dsl_cpu {

// (out, plan, plan_scale); plan and plan_scale are undefined without emit_plan. `op` names the
// caller in error messages. Requires num_bags * num_blocks < 2^31 (the plan's int32 offsets).
std::tuple<at::Tensor, at::Tensor, at::Tensor> staged_lookup(
    const char* op, const at::Tensor& values, const at::Tensor& row_ptr,
    const at::Tensor& row_slots, const at::Tensor& row_mask, const at::Tensor& indices,
    const at::Tensor& offsets, const c10::optional<at::Tensor>& per_sample_weights,
    const c10::optional<at::Tensor>& frozen, int64_t num_blocks, int64_t mode,
    int64_t padding_idx, bool emit_plan);

}  // namespace dsl_cpu
