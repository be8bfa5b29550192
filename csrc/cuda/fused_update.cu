// CUDA fused backward + optimizer over the slot pool (dsl_C::fused_update_rows).
//
// Work list (the touched-rows plan: csrc/cuda/fused_plan.cu, or touched_rows.py): the batch's entries
// grouped by row. One group of G lanes per unique row (G = 8, 16 or 32, see group_width):
//   1. finds the row's active, non-frozen blocks (one lane per block column: mask bit, rank by
//      __popcll, slot) and compacts them into shared memory with a ballot of the group;
//   2. sums the gradient of every active column over the row's entries in input order (each lane
//      owns fixed columns, so the order of the additions is fixed: deterministic), reading only
//      the active columns of grad_out;
//   3. applies the optimizer to those columns and writes values / state in place.
// Rows looked up thousands of times (Zipf-hot) would make one warp the tail of the whole step,
// so the sorted entries are cut into aligned chunks of kChunk: partial_kernel sums each chunk
// that lies inside one run (one warp per chunk, all D columns, into a small [chunks, D]
// scratch), and the run's warp adds its head entries, those partials in order, then its tail
// entries. Which chunks are summed follows from the plan alone (no host-side split, no host
// sync), and the order of the additions is fixed: deterministic.
//
// Rounding: products and sums use __fmul_rn/__fadd_rn (no FMA contraction) and IEEE sqrt and
// division, so a light row is summed and updated exactly as the CPU kernel and the reference do.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fused_update.cuh"

namespace dsl_fused_cuda {
namespace {

constexpr int kWarps = 4;  // warps per thread block
constexpr unsigned kFull = 0xffffffffu;

// Shared memory of one run's group of lanes: acc[D] floats, act_slot/act_j/bad [NB] ints,
// rowmean/rows1 [NB] floats; rounded up to 16 bytes.
__host__ __device__ __forceinline__ int64_t smem_per_group(int64_t D, int64_t NB) {
  return ((4 * D + 20 * NB) + 15) / 16 * 16;
}

// Lanes per run in the update kernel. At density 0.1 a row has about one active block, so a
// run has B to 2B active columns: a whole warp per run would leave most lanes idle while the
// run's chain of dependent loads (row -> mask -> slot -> values) is in flight; 8 or 16 lanes per
// run keep 4 or 2 runs in flight per warp. Wide blocks or rows use the whole warp.
__host__ __device__ __forceinline__ int group_width(int64_t B, int64_t D) {
  if (B >= 32 || D > 256) return 32;
  if (B >= 16 || D > 128) return 16;
  return 8;
}

template <typename T>
__device__ __forceinline__ float load_f(const T* p);
template <>
__device__ __forceinline__ float load_f<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load_f<__half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float load_f<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ bool finite(float x) { return isfinite(x); }

// One element of the update (see dsl_kernels/backends/reference/fused_update.py::apply_rows for the formulas).
// g already includes the L2 weight decay; rowsq is the block's mean of g^2 (row-wise Adagrad).
__device__ __forceinline__ void update_elem(const FusedArgs& a, float g, float p, float s1,
                                            float s2, float rowmean, float& np, float& n1,
                                            float& n2) {
  switch (a.optimizer) {
    case 0:
      np = __fsub_rn(p, __fmul_rn(a.lr, g));
      break;
    case 1:
      n1 = __fadd_rn(s1, __fmul_rn(g, g));
      np = __fsub_rn(p, __fdiv_rn(__fmul_rn(a.lr, g), __fadd_rn(__fsqrt_rn(n1), a.eps)));
      break;
    case 2:
      n1 = __fadd_rn(s1, rowmean);
      np = __fsub_rn(p, __fdiv_rn(__fmul_rn(a.lr, g), __fadd_rn(__fsqrt_rn(n1), a.eps)));
      break;
    default: {
      const float pk =
          a.optimizer == 4 ? __fmul_rn(p, __fsub_rn(1.0f, __fmul_rn(a.lr, a.weight_decay))) : p;
      n1 = __fadd_rn(s1, __fmul_rn(__fsub_rn(g, s1), __fsub_rn(1.0f, a.beta1)));
      n2 = __fadd_rn(s2, __fmul_rn(__fsub_rn(__fmul_rn(g, g), s2), __fsub_rn(1.0f, a.beta2)));
      np = __fsub_rn(pk,
                     __fmul_rn(a.step_size, __fdiv_rn(n1, __fadd_rn(__fsqrt_rn(n2), a.eps))));
    }
  }
}

// The entries of a run or chunk are walked 32 at a time: each lane loads one entry's
// (position, bag, scale) -- independent loads, all in flight at once -- and the warp then takes
// them in entry order from the lanes by shuffle, so the gradient loads of consecutive entries
// do not wait on each other's index loads. The additions stay in entry order (same bits).
struct Entry {
  int64_t i, b;
  float s;
};

__device__ __forceinline__ Entry load_entry(const FusedArgs& a, int64_t e) {
  Entry x;
  x.i = a.perm[e];
  x.b = a.bag[x.i];
  x.s = a.scale ? a.scale[x.i] : 1.0f;
  return x;
}

// Entry x of lane q of the group (width G, lanes `mask`).
template <int G = 32>
__device__ __forceinline__ Entry shfl_entry(const Entry& x, int q, unsigned mask = kFull) {
  Entry y;
  y.i = __shfl_sync(mask, x.i, q, G);
  y.b = __shfl_sync(mask, x.b, q, G);
  y.s = __shfl_sync(mask, x.s, q, G);
  return y;
}

// acc[t] (this lane's columns t = lane, lane + G, ... of the K active columns) += the
// gradient of sorted entries [e0, e1); G lanes (`mask`) per run, arguments uniform over them.
// `first`, when `has_first`, is this lane's entry e0 + lane, loaded before (it is then in flight
// while the row's blocks are resolved).
template <typename T, int G>
__device__ __forceinline__ void sum_entries(const FusedArgs& a, int64_t e0, int64_t e1,
                                            float* acc, const int* act_j, int64_t K,
                                            int lane, unsigned mask, const Entry& first,
                                            bool has_first) {
  const T* go = static_cast<const T*>(a.grad_out);
  const int64_t D = a.D, B = a.B;
  for (int64_t base = e0; base < e1; base += G) {
    const int n = static_cast<int>(e1 - base < G ? e1 - base : G);
    Entry mine{0, 0, 0.0f};
    if (has_first && base == e0) mine = first;
    else if (lane < n) mine = load_entry(a, base + lane);
    for (int64_t t0 = 0; t0 < K; t0 += G) {
      const int64_t t = t0 + lane;
      const bool on = t < K;
      const int64_t col = on ? static_cast<int64_t>(act_j[t / B]) * B + t % B : 0;
      float r = on ? acc[t] : 0.0f;
#pragma unroll 4
      for (int q = 0; q < n; ++q) {
        const Entry x = shfl_entry<G>(mine, q, mask);
        if (on) {
          const float gv = load_f<T>(go + x.b * D + col);
          if (a.max_idx) {
            if (a.max_idx[x.b * D + col] == x.i) r = __fadd_rn(r, gv);
          } else {
            r = __fadd_rn(r, __fmul_rn(gv, x.s));
          }
        }
      }
      if (on) acc[t] = r;
    }
  }
}

// One warp per aligned chunk of the sorted entries; only a chunk that lies inside one run is
// summed (all D columns), the others belong to their runs' warps.
template <typename T>
__global__ void partial_kernel(FusedArgs a) {
  static_assert(kChunk % 32 == 0, "chunks are walked 32 entries at a time");
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t R = a.num_runs;
  if (c >= a.num_chunks || R == 0) return;
  const int64_t lo = c * kChunk, hi = lo + kChunk;
  if (hi > a.run_start[R]) return;  // past the kept entries
  // The run holding entry lo: the last r < R with run_start[r] <= lo (run_start[0] = 0 and
  // run_start is non-decreasing; real runs are never empty).
  int64_t l = 0, h = R;
  while (h - l > 1) {
    const int64_t m = (l + h) >> 1;
    if (a.run_start[m] <= lo) l = m;
    else h = m;
  }
  if (a.run_start[l + 1] < hi) return;  // the chunk spans two runs
  const T* go = static_cast<const T*>(a.grad_out);
  const int64_t D = a.D;
  for (int64_t cbase = 0; cbase < D; cbase += 128) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t base = lo; base < hi; base += 32) {
      const Entry mine = load_entry(a, base + lane);
#pragma unroll 4
      for (int q = 0; q < 32; ++q) {
        const Entry x = shfl_entry(mine, q);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int64_t col = cbase + lane + 32 * u;
          if (col < D) {
            const float gv = load_f<T>(go + x.b * D + col);
            if (a.max_idx) {
              if (a.max_idx[x.b * D + col] == x.i) acc[u] = __fadd_rn(acc[u], gv);
            } else {
              acc[u] = __fadd_rn(acc[u], __fmul_rn(gv, x.s));
            }
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t col = cbase + lane + 32 * u;
      if (col < D) a.partial[c * D + col] = acc[u];
    }
  }
}

// A grid-stride loop of lane groups (G lanes each, several per warp) over the runs (the grid
// is sized by the device, not by the number of runs, so a padded plan costs no read-back).
// The groups of a warp take different runs, so they diverge; every warp-level primitive below
// names its group's lanes only.
template <typename T, int G>
__global__ void update_kernel(FusedArgs a) {
  constexpr int kGroups = 32 * kWarps / G;  // groups per block
  extern __shared__ unsigned char smem_raw[];
  const int group = threadIdx.x / G, lane = threadIdx.x % G;
  const int shift = (threadIdx.x & 31) / G * G;  // the group's first lane in its warp
  const unsigned mask = G == 32 ? kFull : (((1u << G) - 1u) << shift);
  const int64_t D = a.D, NB = a.NB, B = a.B, W = a.W;
  unsigned char* mine = smem_raw + group * smem_per_group(D, NB);
  float* acc = reinterpret_cast<float*>(mine);
  int* act_slot = reinterpret_cast<int*>(acc + D);
  int* act_j = act_slot + NB;
  int* bad = act_j + NB;
  float* rowmean = reinterpret_cast<float*>(bad + NB);  // row-wise Adagrad: mean g^2 per block
  float* rows1 = rowmean + NB;                          // and its state before the update
  T* vals = static_cast<T*>(a.values);

  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGroups;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kGroups + group; r < a.num_runs;
       r += stride) {
    __syncwarp(mask);  // the previous run's reads of the shared arrays are done
    const int64_t row = a.run_rows[r];
    const int64_t e0 = a.run_start[r], e1 = a.run_start[r + 1];
    // Unvalidated input (validate=False, torch.compile) may name rows outside the table, and a
    // padded plan ends in runs of row -1: such a run updates nothing.
    if (row < 0 || row >= a.num_rows) continue;
    const int64_t c0 = (e0 + kChunk - 1) / kChunk, c1 = e1 / kChunk;
    // A run without chunks: its first G entries' indices load now, beside the row's index.
    const bool prefetch = c1 <= c0;
    Entry first{0, 0, 0.0f};
    if (prefetch && e0 + lane < e1) first = load_entry(a, e0 + lane);
    const uint64_t* m = reinterpret_cast<const uint64_t*>(a.row_mask) + row * W;
    const int64_t pos0 = a.row_ptr[row];

    // 1. Active, non-frozen blocks of the row, compacted in column order.
    int nact = 0;
    for (int64_t j0 = 0; j0 < NB; j0 += G) {
      const int64_t j = j0 + lane;
      bool on = false;
      int64_t slot = -1;
      if (j < NB) {
        const uint64_t word = m[j >> 6];
        const int bit = static_cast<int>(j & 63);
        on = (word >> bit) & 1ull;
        if (on) {
          int64_t rank = __popcll(word & ((1ull << bit) - 1ull));
          for (int64_t u = 0; u < (j >> 6); ++u) rank += __popcll(m[u]);
          const int64_t pos = pos0 + rank;
          slot = (pos >= 0 && pos < a.C) ? a.row_slots[pos] : -1;
          if (slot < 0 || slot >= a.C) on = false;  // corrupt index: never write out of bounds
          else if (a.frozen && a.frozen[slot]) on = false;
        }
      }
      const unsigned ballot = __ballot_sync(mask, on) >> shift;  // this group's lanes, from 0
      if (on) {
        const int k = nact + __popc(ballot & ((1u << lane) - 1u));
        act_slot[k] = static_cast<int>(slot);
        act_j[k] = static_cast<int>(j);
        bad[k] = 0;
      }
      nact += __popc(ballot);
    }
    __syncwarp(mask);
    if (nact == 0) continue;
    const int64_t K = static_cast<int64_t>(nact) * B;

    // 2. Gradient of the active columns, in entry order: head entries, the partials of the
    //    aligned chunks inside the run (hot rows only), tail entries.
    for (int64_t t = lane; t < K; t += G) acc[t] = 0.0f;
    if (!prefetch) {
      sum_entries<T, G>(a, e0, c0 * kChunk, acc, act_j, K, lane, mask, first, false);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t t = lane; t < K; t += G) {
          const int64_t col = static_cast<int64_t>(act_j[t / B]) * B + t % B;
          acc[t] = __fadd_rn(acc[t], a.partial[c * D + col]);
        }
      sum_entries<T, G>(a, c1 * kChunk, e1, acc, act_j, K, lane, mask, first, false);
    } else {
      sum_entries<T, G>(a, e0, e1, acc, act_j, K, lane, mask, first, true);
    }
    __syncwarp(mask);

    // 3. Optimizer. L2 weight decay first (into acc, so row-wise Adagrad sees the decayed g).
    if (a.optimizer != 4 && a.weight_decay != 0.0f) {
      for (int64_t t = lane; t < K; t += G) {
        const float p = load_f<T>(vals + static_cast<int64_t>(act_slot[t / B]) * B + t % B);
        acc[t] = __fadd_rn(acc[t], __fmul_rn(a.weight_decay, p));
      }
      __syncwarp(mask);
    }
    // Row-wise Adagrad reads every column of a block and writes one state per block: snapshot
    // both per block first, so a lane's write can never race with another lane's read.
    if (a.optimizer == 2) {
      for (int64_t blk = lane; blk < nact; blk += G) {
        float sq = 0.0f;
        for (int64_t u = 0; u < B; ++u) {
          const float gu = acc[blk * B + u];
          sq = __fadd_rn(sq, __fmul_rn(gu, gu));
        }
        rowmean[blk] = __fdiv_rn(sq, static_cast<float>(B));
        rows1[blk] = a.state1[act_slot[blk]];
      }
      __syncwarp(mask);
    }
    // Two passes when non-finite updates must be skipped: flag the blocks, then write the others.
    for (int pass = a.nan_check ? 0 : 1; pass < 2; ++pass) {
      for (int64_t t = lane; t < K; t += G) {
        const int64_t blk = t / B, k = t % B;
        const int64_t slot = act_slot[blk];
        const float g = acc[t];
        const float p = load_f<T>(vals + slot * B + k);
        float rm = 0.0f, s1 = 0.0f, s2 = 0.0f;
        if (a.optimizer == 2) {
          rm = rowmean[blk];
          s1 = rows1[blk];
        } else if (a.optimizer != 0) {
          s1 = a.state1[slot * B + k];
          if (a.optimizer >= 3) s2 = a.state2[slot * B + k];
        }
        float np = p, n1 = s1, n2 = s2;
        update_elem(a, g, p, s1, s2, rm, np, n1, n2);
        const T out = from_f<T>(np);
        if (pass == 0) {
          const bool ok = finite(load_f<T>(&out)) && finite(n1) && finite(n2);
          if (!ok) atomicOr(&bad[blk], 1);
          continue;
        }
        if (a.nan_check && bad[blk]) {
          if (k == 0) atomicAdd(reinterpret_cast<unsigned long long*>(a.skipped), 1ull);
          continue;
        }
        vals[slot * B + k] = out;
        if (a.optimizer == 2) {
          if (k == 0) a.state1[slot] = n1;
        } else if (a.optimizer != 0) {
          a.state1[slot * B + k] = n1;
          if (a.optimizer >= 3) a.state2[slot * B + k] = n2;
        }
      }
      __syncwarp(mask);
    }
  }
}

template <typename T, int G>
cudaError_t launch_update(const FusedArgs& a, int64_t smem, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(
        update_kernel<T, G>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  // As many blocks as the device holds at once (64 registers a thread: 32 warps per
  // multiprocessor; forcing fewer registers spills), each group striding over the runs.
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, update_kernel<T, G>, 32 * kWarps,
                                                    static_cast<size_t>(smem)) != cudaSuccess ||
      per_sm < 1)
    per_sm = 1;
  constexpr int64_t kGroups = 32 * kWarps / G;
  int64_t blocks = (a.num_runs + kGroups - 1) / kGroups;
  const int64_t most = static_cast<int64_t>(per_sm) * (a.num_sms > 0 ? a.num_sms : 1);
  if (blocks > most) blocks = most;
  update_kernel<T, G><<<dim3(static_cast<unsigned>(blocks < 1 ? 1 : blocks)), dim3(32 * kWarps),
                        smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const FusedArgs& a, cudaStream_t stream) {
  const dim3 block(32 * kWarps);
  if (a.num_chunks > 0) {
    const dim3 grid(static_cast<unsigned>((a.num_chunks + kWarps - 1) / kWarps));
    partial_kernel<T><<<grid, block, 0, stream>>>(a);
  }
  if (a.num_runs == 0) return cudaGetLastError();
  const int64_t smem = fused_update_smem_bytes(a.D, a.NB);
  switch (group_width(a.B, a.D)) {
    case 8: return launch_update<T, 8>(a, smem, stream);
    case 16: return launch_update<T, 16>(a, smem, stream);
    default: return launch_update<T, 32>(a, smem, stream);
  }
}

}  // namespace

int64_t fused_update_smem_bytes(int64_t D, int64_t NB) {
  const int64_t groups = 32 * kWarps / group_width(NB > 0 ? D / NB : D, D);
  return smem_per_group(D, NB) * groups;
}

cudaError_t launch_fused_update_rows(const FusedArgs& a, cudaStream_t stream) {
  switch (a.value_type) {
    case kF16:
      return launch_typed<__half>(a, stream);
    case kBF16:
      return launch_typed<__nv_bfloat16>(a, stream);
    default:
      return launch_typed<float>(a, stream);
  }
}

}  // namespace dsl_fused_cuda
