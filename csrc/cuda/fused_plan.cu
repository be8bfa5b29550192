// dsl_C::fused_plan on CUDA: the touched-rows plan of the fused backward + optimizer, built on
// the device with no host synchronisation.
//
// The CPU plan (csrc/cpu/fused_plan in fused_update.cpp, and backends/touched_rows.py) has
// exactly R runs; knowing R on the host needs a read-back. This one is padded instead: every
// output is sized by the number of indices L (known on the host), runs R..L-1 are empty
// (run_start[r] = run_start[R] = the number of kept entries) and name row -1, which the update
// kernel skips. Steps (the sort between 1 and 2 is torch's stable radix sort, in the binding):
//   1. entries: the bag and scale of each entry and the sort key (the row, or the drop key for
//      padding entries, rows outside the table and entries in no bag): per bag in mean mode
//      (the scale needs the bag's count), else per entry with a binary search for its bag;
//   2. heads: 1 where a run of equal kept keys starts in the sorted keys (a prefix sum in the
//      binding numbers the runs);
//   3. runs: run_start / run_rows of each run, and {R, kept entries} into meta;
//   4. pad: the empty runs R..L-1.
#include "common.cuh"
#include "fused_update.cuh"

namespace dsl_fused_cuda {
namespace {

using dsl_cuda::bag_range;

constexpr int kPlanThreads = 256;

inline unsigned plan_grid(int64_t n) {
  int64_t g = (n + kPlanThreads - 1) / kPlanThreads;
  if (g < 1) g = 1;
  if (g > 65535) g = 65535;  // grid-stride loops do the rest
  return static_cast<unsigned>(g);
}

// bag[], key[] and scale[] were filled by the binding with num_bags, kDrop and 0: entries that
// no bag covers keep those (dropped).
template <typename I, typename K>
__global__ void entries_kernel(const I* __restrict__ idx, int64_t L, const I* __restrict__ off,
                               int64_t num_bags, const float* __restrict__ psw, int mode,
                               int64_t pad, int64_t num_rows, int64_t* __restrict__ bag,
                               K* __restrict__ key, float* __restrict__ scale, K drop) {
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < num_bags;
       b += int64_t(gridDim.x) * blockDim.x) {
    int64_t lo, hi;
    bag_range(off, b, L, lo, hi);
    int64_t count = 0;
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t r = idx[i];
      bag[i] = b;
      count += (r != pad);
      key[i] = (r != pad && r >= 0 && r < num_rows) ? static_cast<K>(r) : drop;
    }
    if (scale == nullptr) continue;
    const float cnt = static_cast<float>(count > 0 ? count : 1);
    for (int64_t i = lo; i < hi; ++i) {  // the reference's order: keep * psw, then / count
      float s = static_cast<int64_t>(idx[i]) != pad ? 1.0f : 0.0f;
      if (psw != nullptr) s = __fmul_rn(s, psw[i]);
      if (mode == 1) s = __fdiv_rn(s, cnt);
      scale[i] = s;
    }
  }
}

// The same for sum and max mode (no per-bag count needed): one thread per entry, which finds
// its bag by binary search in the offsets (the last b with offsets[b] <= i), so the work is
// spread over the whole device instead of one thread per bag.
template <typename I, typename K>
__global__ void entries_flat_kernel(const I* __restrict__ idx, int64_t L,
                                    const I* __restrict__ off, int64_t num_bags,
                                    const float* __restrict__ psw, int64_t pad, int64_t num_rows,
                                    int64_t* __restrict__ bag, K* __restrict__ key,
                                    float* __restrict__ scale, K drop) {
  int64_t end = static_cast<int64_t>(off[num_bags]);
  end = end < 0 ? 0 : (end > L ? L : end);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < end;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = num_bags;  // answer in [lo, hi): off[lo] <= i (when off[0] = 0)
    while (hi - lo > 1) {
      const int64_t m = (lo + hi) >> 1;
      if (static_cast<int64_t>(off[m]) <= i) lo = m;
      else hi = m;
    }
    if (static_cast<int64_t>(off[lo]) > i) continue;  // before the first bag (bad offsets[0])
    const int64_t r = idx[i];
    bag[i] = lo;
    key[i] = (r != pad && r >= 0 && r < num_rows) ? static_cast<K>(r) : drop;
    if (scale != nullptr) {
      float s = r != pad ? 1.0f : 0.0f;
      if (psw != nullptr) s = __fmul_rn(s, psw[i]);
      scale[i] = s;
    }
  }
}

template <typename K>
__global__ void heads_kernel(const K* __restrict__ skey, int64_t L, K drop,
                             int64_t* __restrict__ head) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < L;
       e += int64_t(gridDim.x) * blockDim.x) {
    const K k = skey[e];
    head[e] = (k != drop && (e == 0 || skey[e - 1] != k)) ? 1 : 0;
  }
}

// run_id: inclusive prefix sum of head (run_id[e] - 1 is the run of a kept entry e).
template <typename K>
__global__ void runs_kernel(const K* __restrict__ skey, const int64_t* __restrict__ run_id,
                            int64_t L, K drop, int64_t* __restrict__ run_start,
                            int64_t* __restrict__ run_rows, int64_t* __restrict__ meta) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < L;
       e += int64_t(gridDim.x) * blockDim.x) {
    const K k = skey[e];
    if (k == drop) continue;
    const int64_t r = run_id[e] - 1;
    if (e == 0 || skey[e - 1] != k) {
      run_start[r] = e;
      run_rows[r] = static_cast<int64_t>(k);
    }
    if (e + 1 == L || skey[e + 1] == drop) {  // the last kept entry (dropped keys sort last)
      meta[0] = r + 1;
      meta[1] = e + 1;
    }
  }
}

__global__ void pad_kernel(int64_t L, const int64_t* __restrict__ meta,
                           int64_t* __restrict__ run_start, int64_t* __restrict__ run_rows) {
  const int64_t R = meta[0], kept = meta[1];
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r <= L;
       r += int64_t(gridDim.x) * blockDim.x) {
    if (r < R) continue;
    run_start[r] = kept;
    if (r < L) run_rows[r] = -1;
  }
}

template <typename K>
K drop_key() {
  return sizeof(K) == 4 ? static_cast<K>(0x7fffffff) : static_cast<K>(0x7fffffffffffffffLL);
}

}  // namespace

cudaError_t plan_entries(const PlanArgs& a, cudaStream_t stream) {
  if (a.num_bags == 0 || a.L == 0) return cudaSuccess;
#define DSL_PLAN_ENTRIES(I, K)                                                                  \
  if (a.mode == 1)                                                                              \
    entries_kernel<I, K><<<plan_grid(a.num_bags), kPlanThreads, 0, stream>>>(                  \
        static_cast<const I*>(a.indices), a.L, static_cast<const I*>(a.offsets), a.num_bags,   \
        a.psw, a.mode, a.padding_idx, a.num_rows, a.bag, static_cast<K*>(a.key), a.scale,      \
        drop_key<K>());                                                                         \
  else                                                                                          \
    entries_flat_kernel<I, K><<<plan_grid(a.L), kPlanThreads, 0, stream>>>(                    \
        static_cast<const I*>(a.indices), a.L, static_cast<const I*>(a.offsets), a.num_bags,   \
        a.psw, a.padding_idx, a.num_rows, a.bag, static_cast<K*>(a.key), a.scale,              \
        drop_key<K>())
  if (a.index64) {
    if (a.key64) DSL_PLAN_ENTRIES(int64_t, int64_t);
    else DSL_PLAN_ENTRIES(int64_t, int32_t);
  } else {
    if (a.key64) DSL_PLAN_ENTRIES(int32_t, int64_t);
    else DSL_PLAN_ENTRIES(int32_t, int32_t);
  }
#undef DSL_PLAN_ENTRIES
  return cudaGetLastError();
}

cudaError_t plan_heads(const void* sorted_key, bool key64, int64_t L, int64_t* head,
                       cudaStream_t stream) {
  if (L == 0) return cudaSuccess;
  if (key64)
    heads_kernel<int64_t><<<plan_grid(L), kPlanThreads, 0, stream>>>(
        static_cast<const int64_t*>(sorted_key), L, drop_key<int64_t>(), head);
  else
    heads_kernel<int32_t><<<plan_grid(L), kPlanThreads, 0, stream>>>(
        static_cast<const int32_t*>(sorted_key), L, drop_key<int32_t>(), head);
  return cudaGetLastError();
}

cudaError_t plan_runs(const void* sorted_key, bool key64, const int64_t* run_id, int64_t L,
                      int64_t* run_start, int64_t* run_rows, int64_t* meta,
                      cudaStream_t stream) {
  if (L > 0) {
    if (key64)
      runs_kernel<int64_t><<<plan_grid(L), kPlanThreads, 0, stream>>>(
          static_cast<const int64_t*>(sorted_key), run_id, L, drop_key<int64_t>(), run_start,
          run_rows, meta);
    else
      runs_kernel<int32_t><<<plan_grid(L), kPlanThreads, 0, stream>>>(
          static_cast<const int32_t*>(sorted_key), run_id, L, drop_key<int32_t>(), run_start,
          run_rows, meta);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  pad_kernel<<<plan_grid(L + 1), kPlanThreads, 0, stream>>>(L, meta, run_start, run_rows);
  return cudaGetLastError();
}

}  // namespace dsl_fused_cuda
