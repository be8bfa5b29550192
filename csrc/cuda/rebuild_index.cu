// dsl_C::rebuild_index on CUDA: the CSR row index of a slot pool from `coord`, without a sort.
//
// (1) one thread per slot sets its block's bit with atomicOr (the old word tells a block held
// twice), (2) one thread per row popcounts its mask words (the binding prefix-sums them into
// row_ptr), (3) one thread per active slot writes itself at row_ptr[row] + (its rank among the
// row's bits), i.e. in (row, col) order, the order the reference's sort produces.
#include "common.cuh"

namespace dsl_cuda {
namespace {

__global__ void rebuild_mask_kernel(const int64_t* __restrict__ coord, int64_t C, int64_t total,
                                    int64_t NB, int64_t W, unsigned long long* __restrict__ mask,
                                    int64_t* __restrict__ err) {
  for (int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; s < C;
       s += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = coord[s];
    if (k == -1) continue;
    if (k < -1 || k >= total) {
      report(err, kCoordBad, s, k);
      continue;
    }
    const int64_t r = k / NB, j = k - r * NB;
    const unsigned long long bit = 1ull << (j & 63);
    const unsigned long long old = atomicOr(mask + r * W + (j >> 6), bit);
    if (old & bit) report(err, kCoordDuplicate, s, k);
  }
}

__global__ void row_counts_kernel(const unsigned long long* __restrict__ mask, int64_t N,
                                  int64_t W, int32_t* __restrict__ counts) {
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < N;
       r += int64_t(gridDim.x) * blockDim.x) {
    int32_t n = 0;
    for (int64_t w = 0; w < W; ++w) n += __popcll(mask[r * W + w]);
    counts[r] = n;
  }
}

__global__ void scatter_kernel(const int64_t* __restrict__ coord, int64_t C, int64_t NB,
                               int64_t W, const unsigned long long* __restrict__ mask,
                               const int32_t* __restrict__ row_ptr,
                               int32_t* __restrict__ row_slots) {
  for (int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; s < C;
       s += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = coord[s];
    if (k < 0) continue;
    const int64_t r = k / NB, j = k - r * NB;
    const unsigned long long* m = mask + r * W;
    int64_t rank = __popcll(m[j >> 6] & ((1ull << (j & 63)) - 1));
    for (int64_t w = 0; w < (j >> 6); ++w) rank += __popcll(m[w]);
    row_slots[row_ptr[r] + rank] = static_cast<int32_t>(s);
  }
}

}  // namespace

cudaError_t rebuild_mask(const int64_t* coord, int64_t num_slots, int64_t num_rows,
                         int64_t num_blocks, int64_t* row_mask, int64_t* err,
                         cudaStream_t stream) {
  if (num_slots == 0) return cudaSuccess;
  const int64_t W = (num_blocks + 63) / 64;
  rebuild_mask_kernel<<<grid_for(num_slots, kThreads), kThreads, 0, stream>>>(
      coord, num_slots, num_rows * num_blocks, num_blocks, W,
      reinterpret_cast<unsigned long long*>(row_mask), err);
  return cudaGetLastError();
}

cudaError_t row_counts(const int64_t* row_mask, int64_t num_rows, int64_t num_words,
                       int32_t* counts, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  row_counts_kernel<<<grid_for(num_rows, kThreads), kThreads, 0, stream>>>(
      reinterpret_cast<const unsigned long long*>(row_mask), num_rows, num_words, counts);
  return cudaGetLastError();
}

cudaError_t scatter_row_slots(const int64_t* coord, int64_t num_slots, int64_t num_blocks,
                              int64_t num_words, const int64_t* row_mask, const int32_t* row_ptr,
                              int32_t* row_slots, cudaStream_t stream) {
  if (num_slots == 0) return cudaSuccess;
  scatter_kernel<<<grid_for(num_slots, kThreads), kThreads, 0, stream>>>(
      coord, num_slots, num_blocks, num_words,
      reinterpret_cast<const unsigned long long*>(row_mask), row_ptr, row_slots);
  return cudaGetLastError();
}

}  // namespace dsl_cuda
