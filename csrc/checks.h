// Argument checks shared by the CPU kernels and the CUDA binding.
//
// Every op validates all of its inputs before it writes anything, so a bad call raises a
// c10::Error (a RuntimeError/IndexError in Python) whose message names the op and the argument,
// and leaves every tensor untouched. The structural checks (dtype, rank, size, device) are free;
// the value checks of batch-sized inputs (index bounds, offsets order, max_idx) read data:
// check_bag_values_cpu does them for CPU tensors, the CUDA binding runs a validation kernel.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace dsl {

constexpr int64_t kModeSum = 0, kModeMean = 1, kModeMax = 2;

inline int64_t mask_words(int64_t num_blocks) { return (num_blocks + 63) / 64; }

inline bool is_value_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_device(const char* op, const char* name, const at::Tensor& t,
                         const c10::Device& dev) {
  TORCH_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(), " but the pool is on ",
              dev);
}

// Sizes of the slot pool and its row index.
struct PoolDims {
  int64_t N;   // rows
  int64_t W;   // 64-bit mask words per row
  int64_t C;   // slots
  int64_t NB;  // blocks per row
  int64_t B;   // block size (0 when unknown, i.e. grow_scores)
};

// values may be undefined (grow_scores has no values): then B is taken from the caller.
inline PoolDims check_pool(const char* op, const at::Tensor* values, const at::Tensor& row_ptr,
                           const at::Tensor& row_slots, const at::Tensor& row_mask,
                           int64_t num_blocks) {
  PoolDims p{};
  TORCH_CHECK(num_blocks >= 1, op, ": num_blocks must be >= 1, got ", num_blocks);
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && row_ptr.dim() == 1 && row_ptr.numel() >= 1,
              op, ": row_ptr must be a 1-D int32 tensor of num_rows + 1 entries, got ",
              row_ptr.scalar_type(), " of shape ", row_ptr.sizes());
  TORCH_CHECK(row_slots.scalar_type() == at::kInt && row_slots.dim() == 1, op,
              ": row_slots must be a 1-D int32 tensor, got ", row_slots.scalar_type(),
              " of shape ", row_slots.sizes());
  p.N = row_ptr.numel() - 1;
  p.NB = num_blocks;
  p.W = mask_words(num_blocks);
  p.C = row_slots.numel();
  TORCH_CHECK(p.C <= std::numeric_limits<int32_t>::max(), op,
              ": the pool has more slots than int32 row_slots can address (", p.C, ")");
  TORCH_CHECK(row_mask.scalar_type() == at::kLong && row_mask.dim() == 2 &&
                  row_mask.size(0) == p.N && row_mask.size(1) == p.W,
              op, ": row_mask must be int64 of shape [num_rows, ceil(num_blocks / 64)] = [", p.N,
              ", ", p.W, "], got ", row_mask.scalar_type(), " of shape ", row_mask.sizes());
  const c10::Device dev = row_ptr.device();
  check_device(op, "row_slots", row_slots, dev);
  check_device(op, "row_mask", row_mask, dev);
  if (values != nullptr) {
    const at::Tensor& v = *values;
    TORCH_CHECK(v.dim() == 2, op, ": values must be 2-D [num_slots, block_size], got shape ",
                v.sizes());
    TORCH_CHECK(is_value_dtype(v.scalar_type()), op,
                ": values must be float32, float16 or bfloat16, got ", v.scalar_type());
    TORCH_CHECK(v.size(0) == p.C, op, ": values has ", v.size(0), " slots but row_slots has ",
                p.C);
    TORCH_CHECK(v.size(1) >= 1, op, ": values must have block_size >= 1");
    check_device(op, "values", v, dev);
    p.B = v.size(1);
  }
  return p;
}

// Structural checks of the bag description; returns num_bags.
inline int64_t check_bags(const char* op, const at::Tensor& indices, const at::Tensor& offsets,
                          const c10::optional<at::Tensor>& psw, int64_t mode, int64_t padding_idx,
                          int64_t N, const c10::Device& dev) {
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
              ": indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK(indices.dim() == 1, op, ": indices must be 1-D, got shape ", indices.sizes());
  TORCH_CHECK(offsets.scalar_type() == indices.scalar_type(), op, ": offsets dtype ",
              offsets.scalar_type(), " does not match indices dtype ", indices.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1, op,
              ": offsets must be 1-D CSR offsets of num_bags + 1 entries, got shape ",
              offsets.sizes());
  TORCH_CHECK(mode == kModeSum || mode == kModeMean || mode == kModeMax, op,
              ": mode must be 0 (sum), 1 (mean) or 2 (max), got ", mode);
  TORCH_CHECK(padding_idx >= -1 && padding_idx < N, op, ": padding_idx must be -1 or in [0, ",
              N, "), got ", padding_idx);
  check_device(op, "indices", indices, dev);
  check_device(op, "offsets", offsets, dev);
  if (psw.has_value()) {
    const at::Tensor& w = *psw;
    TORCH_CHECK(w.is_floating_point(), op, ": per_sample_weights must be floating point, got ",
                w.scalar_type());
    TORCH_CHECK(w.numel() == indices.numel(), op, ": per_sample_weights has ", w.numel(),
                " entries but indices has ", indices.numel());
    check_device(op, "per_sample_weights", w, dev);
  }
  return offsets.numel() - 1;
}

inline void check_grad_out(const char* op, const at::Tensor& grad_out, int64_t num_bags,
                           int64_t D, const c10::Device& dev) {
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == num_bags && grad_out.size(1) == D, op,
              ": grad_out must have shape [num_bags, num_blocks * block_size] = [", num_bags, ", ",
              D, "], got ", grad_out.sizes());
  TORCH_CHECK(is_value_dtype(grad_out.scalar_type()), op,
              ": grad_out must be float32, float16 or bfloat16, got ", grad_out.scalar_type());
  check_device(op, "grad_out", grad_out, dev);
}

inline void check_max_idx_shape(const char* op, const at::Tensor& max_idx, int64_t mode,
                                int64_t num_bags, int64_t D, const c10::Device& dev) {
  if (mode != kModeMax) return;  // ignored by sum/mean
  TORCH_CHECK(max_idx.scalar_type() == at::kLong && max_idx.dim() == 2 &&
                  max_idx.size(0) == num_bags && max_idx.size(1) == D,
              op, ": max_idx must be int64 of shape [num_bags, D] = [", num_bags, ", ", D,
              "] in max mode, got ", max_idx.scalar_type(), " of shape ", max_idx.sizes());
  check_device(op, "max_idx", max_idx, dev);
}

// ----------------------------------------------------------------------- CPU value checks

// offsets start at 0, never decrease, stay within indices; the first offsets[-1] indices are
// in [0, N). Returns L = offsets[-1], the number of entries the bags use.
template <typename I>
int64_t check_bag_values_cpu_t(const char* op, const I* idx, int64_t num_indices, const I* off,
                               int64_t num_bags, int64_t N) {
  TORCH_CHECK(off[0] == 0, op, ": offsets must start at 0, got offsets[0] = ",
              static_cast<int64_t>(off[0]));
  for (int64_t b = 0; b < num_bags; ++b) {
    TORCH_CHECK(off[b + 1] >= off[b], op, ": offsets must be non-decreasing, got offsets[", b,
                "] = ", static_cast<int64_t>(off[b]), " > offsets[", b + 1,
                "] = ", static_cast<int64_t>(off[b + 1]));
  }
  const int64_t L = static_cast<int64_t>(off[num_bags]);
  TORCH_CHECK(L <= num_indices, op, ": offsets point past the end of indices: last offset ", L,
              " > indices length ", num_indices);
  // One pass without branches first (vectorises); locate the culprit only on failure.
  bool bad = false;
  for (int64_t i = 0; i < L; ++i) bad |= (idx[i] < 0) | (static_cast<int64_t>(idx[i]) >= N);
  if (bad) {
    for (int64_t i = 0; i < L; ++i) {
      const int64_t v = static_cast<int64_t>(idx[i]);
      TORCH_CHECK_INDEX(v >= 0 && v < N, op, ": indices[", i, "] = ", v,
                        " is out of range for num_rows = ", N);
    }
  }
  return L;
}

inline int64_t check_bag_values_cpu(const char* op, const at::Tensor& indices,
                                    const at::Tensor& offsets, int64_t N) {
  const int64_t num_bags = offsets.numel() - 1;
  if (indices.scalar_type() == at::kInt)
    return check_bag_values_cpu_t<int32_t>(op, indices.data_ptr<int32_t>(), indices.numel(),
                                           offsets.data_ptr<int32_t>(), num_bags, N);
  return check_bag_values_cpu_t<int64_t>(op, indices.data_ptr<int64_t>(), indices.numel(),
                                         offsets.data_ptr<int64_t>(), num_bags, N);
}

// max_idx[b, d] is -1 or the position of an entry of bag b (what lookup produced).
template <typename I>
void check_max_idx_cpu_t(const char* op, const int64_t* mi, const I* off, int64_t num_bags,
                         int64_t D) {
  for (int64_t b = 0; b < num_bags; ++b) {
    const int64_t lo = off[b], hi = off[b + 1];
    for (int64_t d = 0; d < D; ++d) {
      const int64_t v = mi[b * D + d];
      TORCH_CHECK_INDEX(v == -1 || (v >= lo && v < hi), op, ": max_idx[", b, ", ", d, "] = ", v,
                        " is neither -1 nor an entry of bag ", b, " [", lo, ", ", hi, ")");
    }
  }
}

inline void check_max_idx_cpu(const char* op, const at::Tensor& max_idx,
                              const at::Tensor& offsets, int64_t D) {
  const int64_t num_bags = offsets.numel() - 1;
  if (offsets.scalar_type() == at::kInt)
    check_max_idx_cpu_t<int32_t>(op, max_idx.data_ptr<int64_t>(), offsets.data_ptr<int32_t>(),
                                 num_bags, D);
  else
    check_max_idx_cpu_t<int64_t>(op, max_idx.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                 num_bags, D);
}

inline void check_frozen(const char* op, const c10::optional<at::Tensor>& frozen, int64_t C,
                         const c10::Device& dev) {
  if (!frozen.has_value()) return;
  TORCH_CHECK(frozen->scalar_type() == at::kBool && frozen->dim() == 1 && frozen->numel() == C,
              op, ": frozen must be a 1-D bool tensor of num_slots = ", C, " entries, got ",
              frozen->scalar_type(), " of shape ", frozen->sizes());
  check_device(op, "frozen", *frozen, dev);
}

// Arguments of dsl_C::fused_plan (CPU and CUDA): 1-D int32/int64 indices, 1-D offsets of
// num_bags + 1 entries on the same device, mode 0..2, num_rows >= 0.
inline void check_plan_args(const at::Tensor& indices, const at::Tensor& offsets, int64_t mode,
                            int64_t num_rows) {
  TORCH_CHECK(indices.dim() == 1 && offsets.dim() == 1 && offsets.numel() >= 1,
              "fused_plan: indices must be 1-D and offsets 1-D with num_bags + 1 entries");
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "fused_plan: indices must be int32 or int64");
  TORCH_CHECK(offsets.device() == indices.device(),
              "fused_plan: indices and offsets must be on the same device");
  TORCH_CHECK(mode >= 0 && mode <= 2, "fused_plan: mode must be 0, 1 or 2, got ", mode);
  TORCH_CHECK(num_rows >= 0, "fused_plan: num_rows must be >= 0, got ", num_rows);
}

}  // namespace dsl
