// dsl_C::lookup on CUDA: embedding-bag forward over the block-slot pool.
//
// A group of G threads (G a power of two <= 32, sized to the row) handles one bag; thread
// `lane` owns the vector chunks lane, lane + G, ... of the output row, each chunk VEC elements
// inside one block (a 16-byte load when the block size allows). For every entry of the bag the
// chunk's block is resolved with a popcount rank on the row bitmask; inactive blocks read as 0.
// The entries are summed in order with explicit round-to-nearest ops (no FMA), as the CPU and
// reference backends do.
#include "common.cuh"

namespace dsl_cuda {
namespace {

template <typename T, typename I, int VEC>
__global__ void lookup_kernel(const T* __restrict__ values, PoolIndex P,
                              const I* __restrict__ idx, const I* __restrict__ off,
                              int64_t num_bags, int64_t num_indices,
                              const float* __restrict__ psw, int mode, int64_t pad,
                              T* __restrict__ out, int64_t* __restrict__ max_idx, int G) {
  const int64_t B = P.block_size, D = P.num_blocks * B, chunks = D / VEC;
  const int lane = threadIdx.x % G;
  const int64_t group = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  const int64_t ngroups = (int64_t(gridDim.x) * blockDim.x) / G;
  for (int64_t b = group; b < num_bags; b += ngroups) {
    int64_t lo, hi;
    bag_range(off, b, num_indices, lo, hi);
    float cnt = 1.0f;
    if (mode == kModeMean) {
      int64_t n = 0;
      for (int64_t i = lo; i < hi; ++i) n += (static_cast<int64_t>(idx[i]) != pad);
      cnt = static_cast<float>(n > 0 ? n : 1);
    }
    for (int64_t c = lane; c < chunks; c += G) {
      const int64_t d0 = c * VEC, j = d0 / B, cb = d0 - j * B;
      float acc[VEC];
      int64_t arg[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        acc[k] = 0.0f;
        arg[k] = -1;
      }
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t r = idx[i];
        if (r == pad) continue;
        // A row outside the table (unchecked input) reads as an all-inactive row.
        const int64_t s = row_ok(P, r) ? slot_of(P, r, j) : -1;
        float v[VEC];
        if (mode != kModeMax) {
          if (s < 0) continue;
          float sc = 1.0f;
          if (psw != nullptr) sc = __fmul_rn(sc, psw[i]);
          if (mode == kModeMean) sc = __fdiv_rn(sc, cnt);
          load_vec<T, VEC>(values + s * B + cb, v);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] = __fadd_rn(acc[k], __fmul_rn(v[k], sc));
        } else {
          if (s >= 0) {
            load_vec<T, VEC>(values + s * B + cb, v);
          } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) v[k] = 0.0f;
          }
          // First entry reaching the maximum wins (torch's rule).
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            if (arg[k] < 0 || v[k] > acc[k]) {
              acc[k] = v[k];
              arg[k] = i;
            }
          }
        }
      }
      store_vec<T, VEC>(out + b * D + d0, acc);
      if (mode == kModeMax) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) max_idx[b * D + d0 + k] = arg[k];
      }
    }
  }
}

template <typename T, typename I, int VEC>
cudaError_t launch(const void* values, const PoolIndex& P, const Bags& A, void* out,
                   int64_t* max_idx, cudaStream_t stream) {
  const int64_t chunks = P.num_blocks * P.block_size / VEC;
  const int G = group_size(chunks);
  const unsigned grid = grid_for(A.num_bags, kThreads / G);
  lookup_kernel<T, I, VEC><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(values), P, static_cast<const I*>(A.indices),
      static_cast<const I*>(A.offsets), A.num_bags, A.num_indices, A.psw, A.mode, A.padding_idx,
      static_cast<T*>(out), max_idx, G);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lookup_forward(const void* values, DType dtype, const PoolIndex& pool,
                           const Bags& bags, void* out, int64_t* max_idx, cudaStream_t stream) {
  if (bags.num_bags == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  DSL_CUDA_DISPATCH_DTYPE(dtype, T, {
    DSL_CUDA_DISPATCH_INDEX(bags.index64, I, {
      constexpr int kVec = 16 / sizeof(T);
      if (pick_vec(pool.block_size, sizeof(T), values, out) == kVec)
        err = launch<T, I, kVec>(values, pool, bags, out, max_idx, stream);
      else
        err = launch<T, I, 1>(values, pool, bags, out, max_idx, stream);
    })
  })
  return err;
}

}  // namespace dsl_cuda
