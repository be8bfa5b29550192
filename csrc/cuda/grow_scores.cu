// dsl_C::grow_scores on CUDA: gradient norm of the inactive blocks of the rows a batch touched.
//
// The binding sorts the entries by row and finds the runs of equal rows (the R distinct rows,
// ascending). One thread per (row, block): active blocks are skipped (score 0, already zeroed);
// for an inactive block the thread sums, column by column, the scaled grad_out of the row's
// entries in entry order and accumulates the squares. Blocks of the same row sit in adjacent
// threads, so their grad_out reads coalesce.
#include "common.cuh"

namespace dsl_cuda {
namespace {

template <typename G>
__global__ void grow_kernel(const G* __restrict__ grad_out, PoolIndex P, int mode,
                            const int64_t* __restrict__ uniq, const int64_t* __restrict__ seg,
                            int64_t R, const int64_t* __restrict__ order,
                            const int64_t* __restrict__ bag_of, const float* __restrict__ scale,
                            const int64_t* __restrict__ max_idx, float* __restrict__ scores) {
  const int64_t NB = P.num_blocks, B = P.block_size, D = NB * B;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < R * NB;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t u = t / NB, j = t - u * NB;
    const int64_t r = uniq[u];
    if (!row_ok(P, r) || block_active(P, r, j)) continue;  // unchecked input: skip the row
    float sq = 0.0f;
    for (int64_t c = 0; c < B; ++c) {
      const int64_t d = j * B + c;
      float acc = 0.0f;
      for (int64_t q = seg[u]; q < seg[u + 1]; ++q) {
        const int64_t e = order[q];
        const int64_t b = bag_of[e];
        const float g = to_float(grad_out[b * D + d]);
        if (mode != kModeMax)
          acc = __fadd_rn(acc, __fmul_rn(g, scale[e]));
        else
          acc = __fadd_rn(acc, max_idx[b * D + d] == e ? g : 0.0f);
      }
      sq = __fadd_rn(sq, __fmul_rn(acc, acc));
    }
    scores[t] = sqrtf(sq);
  }
}

}  // namespace

cudaError_t grow_scores(const void* grad_out, DType dtype, const PoolIndex& pool, int mode,
                        const int64_t* uniq, const int64_t* seg, int64_t R, const int64_t* order,
                        const int64_t* bag_of, const float* scale, const int64_t* max_idx,
                        float* scores, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  const unsigned grid = grid_for(R * pool.num_blocks, kThreads);
  DSL_CUDA_DISPATCH_DTYPE(dtype, G, {
    grow_kernel<G><<<grid, kThreads, 0, stream>>>(static_cast<const G*>(grad_out), pool, mode,
                                                  uniq, seg, R, order, bag_of, scale, max_idx,
                                                  scores);
  })
  return cudaGetLastError();
}

}  // namespace dsl_cuda
