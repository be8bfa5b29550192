// Value checks of a batch on the GPU, run by the binding before any op writes: offsets start
// at 0, never decrease and stay within indices; the used indices are valid rows; max_idx (max
// mode backward) names an entry of its own bag or -1. The first failure is recorded in `err`
// ({code, position, value}); err[3] receives L = offsets[num_bags]. The binding reads the record
// back (one synchronisation) and raises a message naming the argument.
#include "common.cuh"

namespace dsl_cuda {
namespace {

template <typename I>
__global__ void validate_kernel(const I* __restrict__ idx, int64_t num_indices,
                                const I* __restrict__ off, int64_t num_bags, int64_t N,
                                const int64_t* __restrict__ max_idx, int64_t D,
                                int64_t* __restrict__ err) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t last = off[num_bags];
  if (tid == 0) {
    err[3] = last;
    if (off[0] != 0) report(err, kOffsetStart, 0, off[0]);
    if (last > num_indices) report(err, kOffsetPastEnd, num_bags, last);
  }
  for (int64_t b = tid; b < num_bags; b += stride)
    if (off[b + 1] < off[b]) report(err, kOffsetDecreasing, b + 1, off[b + 1]);
  const int64_t L = last < 0 ? 0 : (last > num_indices ? num_indices : last);
  for (int64_t i = tid; i < L; i += stride) {
    const int64_t v = idx[i];
    if (v < 0 || v >= N) report(err, kIndexOutOfRange, i, v);
  }
  if (max_idx != nullptr) {
    for (int64_t t = tid; t < num_bags * D; t += stride) {
      const int64_t v = max_idx[t], b = t / D;
      if (v != -1 && (v < off[b] || v >= off[b + 1])) report(err, kMaxIdxBad, t, v);
    }
  }
}

}  // namespace

cudaError_t validate_bags(const Bags& bags, int64_t num_rows, const int64_t* max_idx, int64_t D,
                          int64_t* err, cudaStream_t stream) {
  int64_t work = bags.num_indices > bags.num_bags ? bags.num_indices : bags.num_bags;
  if (max_idx != nullptr && bags.num_bags * D > work) work = bags.num_bags * D;
  const unsigned grid = grid_for(work, kThreads) > 1024 ? 1024 : grid_for(work, kThreads);
  DSL_CUDA_DISPATCH_INDEX(bags.index64, I, {
    validate_kernel<I><<<grid, kThreads, 0, stream>>>(
        static_cast<const I*>(bags.indices), bags.num_indices,
        static_cast<const I*>(bags.offsets), bags.num_bags, num_rows, max_idx, D, err);
  })
  return cudaGetLastError();
}

}  // namespace dsl_cuda
