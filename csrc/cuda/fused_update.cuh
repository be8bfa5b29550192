// Launch interface of the CUDA fused backward + optimizer (csrc/cuda/fused_update.cu).
//
// Plain C++ (no torch headers) so the .cu compiles with a bare nvcc; the torch-side checks and
// the work-list preparation live in csrc/cuda/fused_update_binding.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace dsl_fused_cuda {

enum ValueType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct FusedArgs {
  // Pool and its index.
  void* values;            // [C, B] of value_type
  float* state1;           // [C, B] ([C] for row-wise Adagrad) or null
  float* state2;           // [C, B] or null
  const int32_t* row_ptr;  // [N + 1]
  const int32_t* row_slots;
  const int64_t* row_mask;  // [N, W]
  const bool* frozen;       // [C] or null
  // Batch.
  const void* grad_out;  // [num_bags, D] of value_type
  const int64_t* perm;   // entries grouped by row
  const int64_t* run_start;
  const int64_t* run_rows;
  const int64_t* bag;      // [L]
  const float* scale;      // [L] (sum/mean) or null (max)
  const int64_t* max_idx;  // [num_bags, D] (max) or null
  int64_t num_runs;  // run_rows.numel(); a padded plan's extra runs are empty, row -1
  // Hot rows: the sorted entries are cut into aligned chunks [c * kChunk, (c + 1) * kChunk);
  // a chunk that lies inside one run is summed by its own warp into partial[c] first, and the
  // run's warp adds those partials (in order) between its head and tail entries.
  int64_t num_chunks;  // ceil(perm.numel() / kChunk)
  float* partial;      // [num_chunks, D] scratch (only chunks inside a run are written)
  int num_sms;         // multiprocessors: the update kernel's grid is sized by the device
  int64_t* skipped;  // [1] non-finite updates skipped (atomic add)
  // Sizes and hyper-parameters.
  int64_t C, B, D, NB, W;
  int64_t num_rows;  // N: a run row outside [0, N) is skipped (never read or written)
  int mode;  // 0 sum, 1 mean, 2 max
  int value_type;
  int optimizer;  // 0 sgd, 1 adagrad, 2 row-wise adagrad, 3 adam, 4 adamw
  int nan_check;
  float lr, beta1, beta2, eps, weight_decay, step_size;
};

constexpr int64_t kChunk = 256;  // entries per partial sum of a hot row

// Dynamic shared memory the kernels need per launch (the binding checks it against the
// device limit).
int64_t fused_update_smem_bytes(int64_t D, int64_t NB);

// Enqueues the partial-sum kernel (heavy runs) and the update kernels on `stream`. Returns the
// cudaError_t of the launches.
cudaError_t launch_fused_update_rows(const FusedArgs& a, cudaStream_t stream);

// ------------------------------------------------------------------ plan (fused_plan.cu)

struct PlanArgs {
  const void* indices;  // [L] int32 or int64
  const void* offsets;  // [num_bags + 1], same dtype
  bool index64;
  int64_t L, num_bags;
  const float* psw;  // [L] fp32 or null
  int mode;          // 0 sum, 1 mean, 2 max (no scale)
  int64_t padding_idx, num_rows;
  int64_t* bag;   // [L], pre-filled with num_bags
  void* key;      // [L] int32 (key64 false) or int64, pre-filled with the drop key
  bool key64;
  float* scale;   // [L] pre-filled with 0, or null (max)
};

// Step 1 (per bag): bag, sort key and scale of every entry.
cudaError_t plan_entries(const PlanArgs& a, cudaStream_t stream);
// Step 2: head[e] = 1 where a run of equal kept keys starts in the sorted keys.
cudaError_t plan_heads(const void* sorted_key, bool key64, int64_t L, int64_t* head,
                       cudaStream_t stream);
// Steps 3 and 4: run_start [L + 1], run_rows [L] (padded: empty runs of row -1) and
// meta = {R, kept entries} (zeroed by the caller) from run_id = inclusive prefix sum of head.
cudaError_t plan_runs(const void* sorted_key, bool key64, const int64_t* run_id, int64_t L,
                      int64_t* run_start, int64_t* run_rows, int64_t* meta,
                      cudaStream_t stream);

}  // namespace dsl_fused_cuda
