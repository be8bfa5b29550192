// Launch API of the CUDA kernels (csrc/cuda/*.cu).
//
// The kernels know nothing of torch: they take raw device pointers and sizes, so `nvcc` compiles
// them on any machine with the CUDA toolkit (no GPU, no CUDA build of torch needed; see
// scripts/check_nvcc.sh). The torch side -- argument checks, allocation, streams, sorting -- is in
// binding.cpp. Every function enqueues work on `stream` and returns cudaGetLastError().
//
// Numerics: values and gradients are widened to fp32; sums are formed in entry order with
// __fmul_rn/__fadd_rn (no FMA contraction), so the deterministic paths give the same fp32 bits
// as the CPU and reference backends. The atomic (fast) backward is not ordered.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dsl_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kModeSum = 0, kModeMean = 1, kModeMax = 2;

// Read-only CSR row index of the slot pool (see dsl_kernels/format.py).
struct PoolIndex {
  const int32_t* row_ptr;    // [num_rows + 1]
  const int32_t* row_slots;  // [num_slots]
  const int64_t* row_mask;   // [num_rows, num_words]
  int64_t num_rows, num_words, num_slots, num_blocks, block_size;
};

// The bags of a batch: CSR offsets [num_bags + 1] over indices (both int32 or both int64).
struct Bags {
  const void* indices;
  const void* offsets;
  bool index64;
  int64_t num_bags;
  int64_t num_indices;
  const float* psw;  // per-sample weights as fp32, or nullptr
  int mode;
  int64_t padding_idx;  // -1 = none
};

// Validation record in device memory (int64[kErrorWords], zeroed by the caller):
// {code, position, value, L = offsets[num_bags]}. The first failing thread wins.
enum ErrorCode : int64_t {
  kOk = 0,
  kOffsetStart = 1,       // offsets[0] != 0
  kOffsetDecreasing = 2,  // offsets[position] < offsets[position - 1]
  kOffsetPastEnd = 3,     // offsets[num_bags] > num_indices
  kIndexOutOfRange = 4,   // indices[position] = value not in [0, num_rows)
  kMaxIdxBad = 5,         // max_idx.flat[position] = value not -1 nor an entry of its bag
  kCoordBad = 6,          // coord[position] = value not in [-1, num_rows * num_blocks)
  kCoordDuplicate = 7,    // coord[position] = value already held by another slot
};
constexpr int kErrorWords = 4;

// Checks offsets, the first L indices and (when max_idx != nullptr) max_idx[num_bags, D].
cudaError_t validate_bags(const Bags& bags, int64_t num_rows, const int64_t* max_idx, int64_t D,
                          int64_t* err, cudaStream_t stream);

// Forward: out[num_bags, D] (dtype of values), max_idx[num_bags, D] in max mode.
cudaError_t lookup_forward(const void* values, DType dtype, const PoolIndex& pool,
                           const Bags& bags, void* out, int64_t* max_idx, cudaStream_t stream);

// Fast backward: atomicAdd of every contribution into grad (fp32 [num_slots, block_size],
// zeroed by the caller). frozen (bool[num_slots]) may be nullptr.
cudaError_t lookup_backward_atomic(const void* grad_out, DType dtype, const PoolIndex& pool,
                                   const Bags& bags, const int64_t* max_idx, const bool* frozen,
                                   float* grad, cudaStream_t stream);

// Per entry: its bag and its scale in the bag's sum (keep * psw / count in mean mode).
cudaError_t entry_info(const Bags& bags, int64_t* bag_of, float* scale, cudaStream_t stream);

// Deterministic backward over the n entries sorted (stably) by row: rows[k] is the row of
// entry order[k] (rows >= num_rows mark padding and are skipped). One group of threads owns a
// row and writes its slots with plain stores, summing the entries in their original order.
cudaError_t lookup_backward_sorted(const void* grad_out, DType dtype, const PoolIndex& pool,
                                   int mode, const int64_t* rows, const int64_t* order, int64_t n,
                                   const int64_t* bag_of, const float* scale,
                                   const int64_t* max_idx, const bool* frozen, float* grad,
                                   cudaStream_t stream);

// Growth scores of the R distinct rows uniq[R]; the entries of uniq[u] are
// order[seg[u] .. seg[u + 1]). scores (fp32 [R, num_blocks]) zeroed by the caller; only the
// inactive blocks are written. pool.block_size is the block size of grad_out.
cudaError_t grow_scores(const void* grad_out, DType dtype, const PoolIndex& pool, int mode,
                        const int64_t* uniq, const int64_t* seg, int64_t R, const int64_t* order,
                        const int64_t* bag_of, const float* scale, const int64_t* max_idx,
                        float* scores, cudaStream_t stream);

// rebuild_index in three steps. (1) set the mask bits of coord (row_mask zeroed by the caller),
// recording bad or duplicate coords in err; (2) popcount per row into counts[num_rows]
// (the caller turns them into row_ptr by a prefix sum); (3) scatter the active slots to
// row_slots (filled with -1 by the caller).
cudaError_t rebuild_mask(const int64_t* coord, int64_t num_slots, int64_t num_rows,
                         int64_t num_blocks, int64_t* row_mask, int64_t* err,
                         cudaStream_t stream);
cudaError_t row_counts(const int64_t* row_mask, int64_t num_rows, int64_t num_words,
                       int32_t* counts, cudaStream_t stream);
cudaError_t scatter_row_slots(const int64_t* coord, int64_t num_slots, int64_t num_blocks,
                              int64_t num_words, const int64_t* row_mask, const int32_t* row_ptr,
                              int32_t* row_slots, cudaStream_t stream);

}  // namespace dsl_cuda
