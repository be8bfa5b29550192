// dsl_C::rebuild_index on CPU: the CSR row index of a slot pool from `coord`.
//
// O(C + N) with no sort: (1) set the bit of every active block in the row masks (this also
// finds a block held by two slots), (2) per-row popcounts and a prefix sum give row_ptr,
// (3) every active slot writes itself at row_ptr[row] + (its rank among the row's set bits),
// which is the (row, col) order the reference's sort produces. Free slots (-1) land nowhere;
// the tail of row_slots stays -1.
#include <torch/library.h>

#include <limits>

#include "common.h"

namespace dsl_cpu {
namespace {

constexpr const char* kOp = "dsl_C::rebuild_index";

std::tuple<at::Tensor, at::Tensor, at::Tensor> rebuild_index_cpu(const at::Tensor& coord,
                                                                 int64_t num_rows,
                                                                 int64_t num_blocks) {
  TORCH_CHECK(coord.scalar_type() == at::kLong && coord.dim() == 1, kOp,
              ": coord must be a 1-D int64 tensor, got ", coord.scalar_type(), " of shape ",
              coord.sizes());
  TORCH_CHECK(num_rows >= 0, kOp, ": num_rows must be >= 0, got ", num_rows);
  TORCH_CHECK(num_blocks >= 1, kOp, ": num_blocks must be >= 1, got ", num_blocks);
  TORCH_CHECK(num_rows < std::numeric_limits<int32_t>::max() &&
                  num_rows <= std::numeric_limits<int64_t>::max() / num_blocks,
              kOp, ": num_rows * num_blocks is too large (", num_rows, " x ", num_blocks, ")");
  const int64_t C = coord.numel();
  TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), kOp,
              ": more slots than int32 row_slots can address (", C, ")");
  const int64_t NB = num_blocks, W = dsl::mask_words(num_blocks), total = num_rows * NB;
  const at::Tensor c = coord.contiguous();
  const int64_t* cp = c.data_ptr<int64_t>();

  bool bad = false;
  for (int64_t s = 0; s < C; ++s) bad |= (cp[s] < -1) | (cp[s] >= total);
  if (bad) {
    for (int64_t s = 0; s < C; ++s)
      TORCH_CHECK_INDEX(cp[s] >= -1 && cp[s] < total, kOp, ": coord[", s, "] = ", cp[s],
                        " is neither -1 (free) nor a block row * num_blocks + col of the ",
                        num_rows, " x ", num_blocks, " table");
  }

  const auto opts = coord.options();
  at::Tensor row_mask = at::zeros({num_rows, W}, opts.dtype(at::kLong));
  uint64_t* mask = reinterpret_cast<uint64_t*>(row_mask.data_ptr<int64_t>());
  for (int64_t s = 0; s < C; ++s) {
    const int64_t k = cp[s];
    if (k < 0) continue;
    const int64_t r = k / NB, j = k - r * NB;
    uint64_t& word = mask[r * W + (j >> 6)];
    const uint64_t bit = uint64_t(1) << (j & 63);
    TORCH_CHECK(!(word & bit), kOp, ": coord[", s, "] = ", k, " names block (row ", r, ", col ",
                j, ") that another slot already holds");
    word |= bit;
  }

  at::Tensor row_ptr = at::empty({num_rows + 1}, opts.dtype(at::kInt));
  int32_t* rp = row_ptr.data_ptr<int32_t>();
  rp[0] = 0;
  const int nt = num_threads();
#pragma omp parallel for num_threads(nt) schedule(static) if (num_rows > 4096)
  for (int64_t r = 0; r < num_rows; ++r) {
    int32_t n = 0;
    for (int64_t w = 0; w < W; ++w) n += popcount64(mask[r * W + w]);
    rp[r + 1] = n;
  }
  for (int64_t r = 0; r < num_rows; ++r) rp[r + 1] += rp[r];

  at::Tensor row_slots = at::full({C}, -1, opts.dtype(at::kInt));
  int32_t* rs = row_slots.data_ptr<int32_t>();
#pragma omp parallel for num_threads(nt) schedule(static) if (C > 4096)
  for (int64_t s = 0; s < C; ++s) {
    const int64_t k = cp[s];
    if (k < 0) continue;
    const int64_t r = k / NB, j = k - r * NB;
    const uint64_t* m = mask + r * W;
    int64_t rank = popcount64(m[j >> 6] & ((uint64_t(1) << (j & 63)) - 1));
    for (int64_t w = 0; w < (j >> 6); ++w) rank += popcount64(m[w]);
    rs[rp[r] + rank] = static_cast<int32_t>(s);
  }
  return {row_ptr, row_slots, row_mask};
}

}  // namespace
}  // namespace dsl_cpu

TORCH_LIBRARY_IMPL(dsl_C, CPU, m) { m.impl("rebuild_index", &dsl_cpu::rebuild_index_cpu); }
