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
  // Work split (see dsl_kernels/backends/touched_rows.py::split_heavy_runs).
  const int64_t* light;  // run ids handled directly
  int64_t num_light;
  const int64_t* heavy;  // run ids summed from chunk partials
  int64_t num_heavy;
  const int64_t* chunk_lo;
  const int64_t* chunk_hi;
  const int64_t* chunk_ptr;  // [num_heavy + 1]
  int64_t num_chunks;
  float* partial;  // [num_chunks, D] scratch
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

// Dynamic shared memory the kernels need per launch (the binding checks it against the
// device limit).
int64_t fused_update_smem_bytes(int64_t D, int64_t NB);

// Enqueues the partial-sum kernel (heavy runs) and the update kernels on `stream`. Returns the
// cudaError_t of the launches.
cudaError_t launch_fused_update_rows(const FusedArgs& a, cudaStream_t stream);

}  // namespace dsl_fused_cuda
