// dsl_C::lookup_backward on CUDA: masked gradient scatter into the slot pool, two ways.
//
// * fast (atomic): the forward's layout (a group of threads per bag, a vector chunk per thread)
//   and one fp32 atomicAdd per element into the pool gradient. The order of the additions
//   varies from run to run.
// * deterministic (sorted): the binding sorts the entries stably by row; a group of threads
//   owns each row (the first position of its run in the sorted order) and sums the row's
//   entries in their original order into registers, then stores each slot once. Same sums,
//   same order, same bits as the CPU and reference backends; no atomics.
//
// Both skip padding entries, inactive blocks and frozen slots.
#include "common.cuh"

namespace dsl_cuda {
namespace {

template <typename G, typename I, int VEC>
__global__ void backward_atomic_kernel(const G* __restrict__ grad_out, PoolIndex P,
                                       const I* __restrict__ idx, const I* __restrict__ off,
                                       int64_t num_bags, int64_t num_indices,
                                       const float* __restrict__ psw, int mode, int64_t pad,
                                       const int64_t* __restrict__ max_idx,
                                       const bool* __restrict__ frozen, float* __restrict__ grad,
                                       int GS) {
  const int64_t B = P.block_size, D = P.num_blocks * B, chunks = D / VEC;
  const int lane = threadIdx.x % GS;
  const int64_t group = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / GS;
  const int64_t ngroups = (int64_t(gridDim.x) * blockDim.x) / GS;
  for (int64_t b = group; b < num_bags; b += ngroups) {
    int64_t lo, hi;
    bag_range(off, b, num_indices, lo, hi);
    if (mode == kModeMax) {
      // Only the winner of each column gets its gradient: walk the columns, not the entries.
      for (int64_t c = lane; c < chunks; c += GS) {
        const int64_t d0 = c * VEC, j = d0 / B, cb = d0 - j * B;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const int64_t e = max_idx[b * D + d0 + k];
          if (e < lo || e >= hi) continue;  // -1 (empty bag), or unchecked input
          const int64_t r = idx[e];
          if (!row_ok(P, r)) continue;
          const int64_t s = slot_of(P, r, j);
          if (s < 0 || (frozen != nullptr && frozen[s])) continue;
          atomicAdd(grad + s * B + cb + k, to_float(grad_out[b * D + d0 + k]));
        }
      }
      continue;
    }
    float cnt = 1.0f;
    if (mode == kModeMean) {
      int64_t n = 0;
      for (int64_t i = lo; i < hi; ++i) n += (static_cast<int64_t>(idx[i]) != pad);
      cnt = static_cast<float>(n > 0 ? n : 1);
    }
    for (int64_t c = lane; c < chunks; c += GS) {
      const int64_t d0 = c * VEC, j = d0 / B, cb = d0 - j * B;
      float g[VEC];
      load_vec<G, VEC>(grad_out + b * D + d0, g);
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t r = idx[i];
        if (r == pad || !row_ok(P, r)) continue;
        const int64_t s = slot_of(P, r, j);
        if (s < 0 || (frozen != nullptr && frozen[s])) continue;
        float sc = 1.0f;
        if (psw != nullptr) sc = __fmul_rn(sc, psw[i]);
        if (mode == kModeMean) sc = __fdiv_rn(sc, cnt);
#pragma unroll
        for (int k = 0; k < VEC; ++k) atomicAdd(grad + s * B + cb + k, __fmul_rn(g[k], sc));
      }
    }
  }
}

// Bag of every entry and its scale: keep * psw, divided by the bag's count in mean mode.
template <typename I>
__global__ void entry_info_kernel(const I* __restrict__ idx, const I* __restrict__ off,
                                  int64_t num_bags, int64_t num_indices,
                                  const float* __restrict__ psw, int mode, int64_t pad,
                                  int64_t* __restrict__ bag_of, float* __restrict__ scale) {
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < num_bags;
       b += int64_t(gridDim.x) * blockDim.x) {
    int64_t lo, hi;
    bag_range(off, b, num_indices, lo, hi);
    int64_t n = 0;
    for (int64_t i = lo; i < hi; ++i) n += (static_cast<int64_t>(idx[i]) != pad);
    const float cnt = static_cast<float>(n > 0 ? n : 1);
    for (int64_t i = lo; i < hi; ++i) {
      float s = (static_cast<int64_t>(idx[i]) != pad) ? 1.0f : 0.0f;
      if (psw != nullptr) s = __fmul_rn(s, psw[i]);
      if (mode == kModeMean) s = __fdiv_rn(s, cnt);
      bag_of[i] = b;
      scale[i] = s;
    }
  }
}

template <typename G, int VEC>
__global__ void backward_sorted_kernel(const G* __restrict__ grad_out, PoolIndex P, int mode,
                                       const int64_t* __restrict__ rows,
                                       const int64_t* __restrict__ order, int64_t n,
                                       const int64_t* __restrict__ bag_of,
                                       const float* __restrict__ scale,
                                       const int64_t* __restrict__ max_idx,
                                       const bool* __restrict__ frozen, float* __restrict__ grad,
                                       int GS) {
  const int64_t B = P.block_size, D = P.num_blocks * B, chunks = D / VEC;
  const int lane = threadIdx.x % GS;
  const int64_t group = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / GS;
  const int64_t ngroups = (int64_t(gridDim.x) * blockDim.x) / GS;
  for (int64_t k0 = group; k0 < n; k0 += ngroups) {
    const int64_t r = rows[k0];
    if (k0 > 0 && rows[k0 - 1] == r) continue;  // not the head of its row's run
    if (r < 0 || r >= P.num_rows) continue;      // padding sentinel
    for (int64_t c = lane; c < chunks; c += GS) {
      const int64_t d0 = c * VEC, j = d0 / B, cb = d0 - j * B;
      const int64_t s = slot_of(P, r, j);
      if (s < 0 || (frozen != nullptr && frozen[s])) continue;
      float acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = 0.0f;
      for (int64_t q = k0; q < n && rows[q] == r; ++q) {
        const int64_t e = order[q];
        const int64_t b = bag_of[e];
        float g[VEC];
        load_vec<G, VEC>(grad_out + b * D + d0, g);
        if (mode != kModeMax) {
          const float sc = scale[e];
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] = __fadd_rn(acc[k], __fmul_rn(g[k], sc));
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k)
            acc[k] = __fadd_rn(acc[k], max_idx[b * D + d0 + k] == e ? g[k] : 0.0f);
        }
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) grad[s * B + cb + k] = acc[k];
    }
  }
}

}  // namespace

cudaError_t lookup_backward_atomic(const void* grad_out, DType dtype, const PoolIndex& pool,
                                   const Bags& bags, const int64_t* max_idx, const bool* frozen,
                                   float* grad, cudaStream_t stream) {
  if (bags.num_bags == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  DSL_CUDA_DISPATCH_DTYPE(dtype, G, {
    DSL_CUDA_DISPATCH_INDEX(bags.index64, I, {
      constexpr int kVec = 16 / sizeof(G);
      const bool vec = pick_vec(pool.block_size, sizeof(G), grad_out, nullptr) == kVec;
      const int64_t chunks = pool.num_blocks * pool.block_size / (vec ? kVec : 1);
      const int GS = group_size(chunks);
      const unsigned grid = grid_for(bags.num_bags, kThreads / GS);
      const G* g = static_cast<const G*>(grad_out);
      const I* ix = static_cast<const I*>(bags.indices);
      const I* of = static_cast<const I*>(bags.offsets);
      if (vec)
        backward_atomic_kernel<G, I, kVec><<<grid, kThreads, 0, stream>>>(
            g, pool, ix, of, bags.num_bags, bags.num_indices, bags.psw, bags.mode,
            bags.padding_idx, max_idx, frozen, grad, GS);
      else
        backward_atomic_kernel<G, I, 1><<<grid, kThreads, 0, stream>>>(
            g, pool, ix, of, bags.num_bags, bags.num_indices, bags.psw, bags.mode,
            bags.padding_idx, max_idx, frozen, grad, GS);
      err = cudaGetLastError();
    })
  })
  return err;
}

cudaError_t entry_info(const Bags& bags, int64_t* bag_of, float* scale, cudaStream_t stream) {
  if (bags.num_bags == 0) return cudaSuccess;
  const unsigned grid = grid_for(bags.num_bags, kThreads);
  DSL_CUDA_DISPATCH_INDEX(bags.index64, I, {
    entry_info_kernel<I><<<grid, kThreads, 0, stream>>>(
        static_cast<const I*>(bags.indices), static_cast<const I*>(bags.offsets), bags.num_bags,
        bags.num_indices, bags.psw, bags.mode, bags.padding_idx, bag_of, scale);
  })
  return cudaGetLastError();
}

cudaError_t lookup_backward_sorted(const void* grad_out, DType dtype, const PoolIndex& pool,
                                   int mode, const int64_t* rows, const int64_t* order, int64_t n,
                                   const int64_t* bag_of, const float* scale,
                                   const int64_t* max_idx, const bool* frozen, float* grad,
                                   cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  DSL_CUDA_DISPATCH_DTYPE(dtype, G, {
    constexpr int kVec = 16 / sizeof(G);
    const bool vec = pick_vec(pool.block_size, sizeof(G), grad_out, nullptr) == kVec;
    const int64_t chunks = pool.num_blocks * pool.block_size / (vec ? kVec : 1);
    const int GS = group_size(chunks);
    const unsigned grid = grid_for(n, kThreads / GS);
    const G* g = static_cast<const G*>(grad_out);
    if (vec)
      backward_sorted_kernel<G, kVec><<<grid, kThreads, 0, stream>>>(
          g, pool, mode, rows, order, n, bag_of, scale, max_idx, frozen, grad, GS);
    else
      backward_sorted_kernel<G, 1><<<grid, kThreads, 0, stream>>>(
          g, pool, mode, rows, order, n, bag_of, scale, max_idx, frozen, grad, GS);
    err = cudaGetLastError();
  })
  return err;
}

}  // namespace dsl_cuda
