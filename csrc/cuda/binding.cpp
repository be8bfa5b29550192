// Torch binding of the CUDA kernels: TORCH_LIBRARY_IMPL(dsl_C, CUDA, m).
//
// Built only into dsl_kernels._C_cuda (setup.py, CUDA torch + nvcc). Each op checks its
// arguments (structure on the host; values with the validate_bags kernel, read back or not as
// the bounds-check mode below says), allocates the outputs, and calls the raw-pointer launch API of launch.h on the current
// stream. The deterministic backward and grow_scores sort the entries by row with torch's
// stable sort here, so the .cu files need nothing beyond the CUDA toolkit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

#include "../checks.h"
#include "launch.h"

namespace dsl_cuda_binding {
namespace {

using dsl_cuda::Bags;
using dsl_cuda::DType;
using dsl_cuda::PoolIndex;

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "dsl_C: unsupported dtype ", t);
  }
}

void check_cuda(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

void check_launch(const char* op, cudaError_t e) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(e));
}

PoolIndex pool_of(const dsl::PoolDims& p, const at::Tensor& rp, const at::Tensor& rs,
                  const at::Tensor& rm, int64_t B) {
  return PoolIndex{rp.data_ptr<int32_t>(), rs.data_ptr<int32_t>(), rm.data_ptr<int64_t>(),
                   p.N, p.W, p.C, p.NB, B};
}

Bags bags_of(const at::Tensor& idx, const at::Tensor& off, const at::Tensor& psw, int64_t mode,
             int64_t pad) {
  return Bags{idx.data_ptr(), off.data_ptr(), idx.scalar_type() == at::kLong,
              off.numel() - 1, idx.numel(), psw.defined() ? psw.data_ptr<float>() : nullptr,
              static_cast<int>(mode), pad};
}

// Bounds-check mode of the CUDA ops, process-wide (dsl_kernels.set_bounds_check_mode):
//   raise  (default) the validation kernel runs and its record is read back before the op
//          writes anything: a bad value raises naming the argument (one host sync per op);
//   device the validation kernel records the first bad value into a persistent per-device
//          record and nothing is read back (dsl_kernels.check_bounds() raises later); the
//          kernels skip what they cannot use (rows outside the table, offsets clamped);
//   off    no validation kernel; the kernels skip as in "device".
// FBGEMM's BoundsCheckMode plays the same part for its TBE ops.
enum CheckMode : int64_t { kCheckRaise = 0, kCheckDevice = 1, kCheckOff = 2 };
std::atomic<int64_t> g_check_mode{kCheckRaise};

int64_t cuda_bounds_check_mode(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= kCheckOff,
              "cuda_bounds_check_mode: mode must be 0 (raise), 1 (device), 2 (off) or -1 "
              "(query), got ", mode);
  return mode < 0 ? g_check_mode.load() : g_check_mode.exchange(mode);
}

// The persistent record of "device" mode on `dev` (int64[kErrorWords], zero = no error).
at::Tensor device_record(const c10::Device& dev) {
  static std::mutex mu;
  static std::vector<at::Tensor> records;
  TORCH_CHECK(dev.is_cuda(), "cuda_bounds_record: device must be a CUDA device, got ", dev);
  const c10::DeviceIndex i = dev.has_index() ? dev.index() : c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<size_t>(i) >= records.size()) records.resize(i + 1);
  if (!records[i].defined())
    records[i] = at::zeros({dsl_cuda::kErrorWords},
                           at::TensorOptions().dtype(at::kLong).device(at::kCUDA, i));
  return records[i];
}

at::Tensor cuda_bounds_record(c10::Device dev) { return device_record(dev); }

// Raises on the error record `e` (host copy) of op `op`.
void raise_record(const char* op, const int64_t* e, const Bags& bags, int64_t N, int64_t D) {
  switch (e[0]) {
    case dsl_cuda::kOk: return;
    case dsl_cuda::kOffsetStart:
      TORCH_CHECK(false, op, ": offsets must start at 0, got offsets[0] = ", e[2]);
    case dsl_cuda::kOffsetDecreasing:
      TORCH_CHECK(false, op, ": offsets must be non-decreasing, got offsets[", e[1], "] = ", e[2],
                  " below the entry before it");
    case dsl_cuda::kOffsetPastEnd:
      TORCH_CHECK(false, op, ": offsets point past the end of indices: last offset ", e[2],
                  " > indices length ", bags.num_indices);
    case dsl_cuda::kIndexOutOfRange:
      TORCH_CHECK_INDEX(false, op, ": indices[", e[1], "] = ", e[2],
                        " is out of range for num_rows = ", N);
    case dsl_cuda::kMaxIdxBad:
      TORCH_CHECK_INDEX(false, op, ": max_idx[", e[1] / D, ", ", e[1] % D, "] = ", e[2],
                        " is neither -1 nor an entry of its bag");
    default: TORCH_CHECK(false, op, ": validation failed with code ", e[0]);
  }
}

// Checks the batch as the bounds-check mode says. Returns L = offsets[-1] (clamped into
// [0, num_indices]) when need_length, which outside "raise" mode costs one read-back; else -1.
int64_t validate(const char* op, const Bags& bags, int64_t N, const at::Tensor& max_idx,
                 int64_t D, const c10::Device& dev, cudaStream_t stream,
                 const at::Tensor& offsets, bool need_length) {
  const int64_t mode = g_check_mode.load();
  const int64_t* mi = max_idx.defined() ? max_idx.data_ptr<int64_t>() : nullptr;
  if (mode == kCheckRaise) {
    at::Tensor err = at::zeros({dsl_cuda::kErrorWords}, at::TensorOptions().dtype(at::kLong).device(dev));
    check_launch(op, dsl_cuda::validate_bags(bags, N, mi, D, err.data_ptr<int64_t>(), stream));
    const at::Tensor h = err.cpu();  // synchronises
    raise_record(op, h.data_ptr<int64_t>(), bags, N, D);
    return h.data_ptr<int64_t>()[3];
  }
  if (mode == kCheckDevice)
    check_launch(op, dsl_cuda::validate_bags(bags, N, mi, D,
                                             device_record(dev).data_ptr<int64_t>(), stream));
  if (!need_length) return -1;
  const int64_t last = offsets.narrow(0, bags.num_bags, 1).item<int64_t>();  // synchronises
  return std::min<int64_t>(std::max<int64_t>(last, 0), bags.num_indices);
}

at::Tensor psw_float(const c10::optional<at::Tensor>& psw) {
  if (!psw.has_value()) return at::Tensor();
  return psw->reshape({-1}).to(at::kFloat).contiguous();
}

// ------------------------------------------------------------------------------- lookup

std::tuple<at::Tensor, at::Tensor> lookup_cuda(const at::Tensor& values, const at::Tensor& row_ptr,
                                               const at::Tensor& row_slots,
                                               const at::Tensor& row_mask,
                                               const at::Tensor& indices, const at::Tensor& offsets,
                                               const c10::optional<at::Tensor>& per_sample_weights,
                                               int64_t num_blocks, int64_t mode,
                                               int64_t padding_idx) {
  constexpr const char* op = "dsl_C::lookup";
  check_cuda(op, values, "values");
  const dsl::PoolDims p = dsl::check_pool(op, &values, row_ptr, row_slots, row_mask, num_blocks);
  const int64_t num_bags = dsl::check_bags(op, indices, offsets, per_sample_weights, mode,
                                           padding_idx, p.N, values.device());
  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  const at::Tensor vals = values.contiguous(), rp = row_ptr.contiguous(),
                   rs = row_slots.contiguous(), rm = row_mask.contiguous();
  const at::Tensor w = psw_float(per_sample_weights);
  const Bags bags = bags_of(idx, off, w, mode, padding_idx);
  const int64_t D = p.NB * p.B;
  validate(op, bags, p.N, at::Tensor(), D, values.device(), stream, off, false);

  at::Tensor out = at::empty({num_bags, D}, values.options());
  const auto long_opts = values.options().dtype(at::kLong);
  at::Tensor max_idx = mode == dsl::kModeMax ? at::empty({num_bags, D}, long_opts)
                                             : at::empty({0}, long_opts);
  check_launch(op, dsl_cuda::lookup_forward(
                       vals.data_ptr(), dtype_of(values.scalar_type()), pool_of(p, rp, rs, rm, p.B),
                       bags, out.data_ptr(),
                       mode == dsl::kModeMax ? max_idx.data_ptr<int64_t>() : nullptr, stream));
  return {out, max_idx};
}

// Entries [0, L) sorted stably by row (padding entries get row N, sorted last, skipped by the
// kernels): (rows, order), plus bag_of / scale per entry.
struct SortedEntries {
  at::Tensor rows, order, bag_of, scale;
};

SortedEntries sort_entries(const char* op, const at::Tensor& idx, const Bags& bags, int64_t L,
                           int64_t N, cudaStream_t stream) {
  SortedEntries s;
  const auto opts = idx.options();
  // Zero-filled: with validation off, entries no bag covers keep bag 0 and scale 0 (read in
  // bounds, contribute nothing in sum/mean mode; max mode compares entry ids, never theirs).
  s.bag_of = at::zeros({L}, opts.dtype(at::kLong));
  s.scale = at::zeros({L}, opts.dtype(at::kFloat));
  if (L > 0)
    check_launch(op, dsl_cuda::entry_info(bags, s.bag_of.data_ptr<int64_t>(),
                                          s.scale.data_ptr<float>(), stream));
  at::Tensor keys = idx.narrow(0, 0, L).to(at::kLong);
  if (bags.padding_idx >= 0) keys.masked_fill_(keys == bags.padding_idx, N);
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  s.rows = std::get<0>(sorted);
  s.order = std::get<1>(sorted);
  return s;
}

at::Tensor lookup_backward_cuda(const at::Tensor& grad_out, const at::Tensor& values,
                                const at::Tensor& row_ptr, const at::Tensor& row_slots,
                                const at::Tensor& row_mask, const at::Tensor& indices,
                                const at::Tensor& offsets,
                                const c10::optional<at::Tensor>& per_sample_weights,
                                const at::Tensor& max_idx, const c10::optional<at::Tensor>& frozen,
                                int64_t num_blocks, int64_t mode, int64_t padding_idx,
                                bool deterministic) {
  constexpr const char* op = "dsl_C::lookup_backward";
  check_cuda(op, values, "values");
  const dsl::PoolDims p = dsl::check_pool(op, &values, row_ptr, row_slots, row_mask, num_blocks);
  const c10::Device dev = values.device();
  const int64_t num_bags =
      dsl::check_bags(op, indices, offsets, per_sample_weights, mode, padding_idx, p.N, dev);
  const int64_t D = p.NB * p.B;
  dsl::check_grad_out(op, grad_out, num_bags, D, dev);
  dsl::check_max_idx_shape(op, max_idx, mode, num_bags, D, dev);
  dsl::check_frozen(op, frozen, p.C, dev);
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  const at::Tensor mi = mode == dsl::kModeMax ? max_idx.contiguous() : at::Tensor();
  const at::Tensor g = grad_out.contiguous(), rp = row_ptr.contiguous(),
                   rs = row_slots.contiguous(), rm = row_mask.contiguous();
  const at::Tensor w = psw_float(per_sample_weights);
  const at::Tensor fz = frozen.has_value() ? frozen->contiguous() : at::Tensor();
  const Bags bags = bags_of(idx, off, w, mode, padding_idx);
  // The sorted (deterministic) backward is sized by L = offsets[-1]; the atomic one needs no L.
  const int64_t L = validate(op, bags, p.N, mi, D, dev, stream, off, deterministic);

  at::Tensor grad = at::zeros({p.C, p.B}, values.options().dtype(at::kFloat));
  const PoolIndex pool = pool_of(p, rp, rs, rm, p.B);
  const int64_t* mip = mi.defined() ? mi.data_ptr<int64_t>() : nullptr;
  const bool* fzp = fz.defined() ? fz.data_ptr<bool>() : nullptr;
  if (deterministic) {
    const SortedEntries s = sort_entries(op, idx, bags, L, p.N, stream);
    check_launch(op, dsl_cuda::lookup_backward_sorted(
                         g.data_ptr(), dtype_of(g.scalar_type()), pool, static_cast<int>(mode),
                         s.rows.data_ptr<int64_t>(), s.order.data_ptr<int64_t>(), L,
                         s.bag_of.data_ptr<int64_t>(), s.scale.data_ptr<float>(), mip, fzp,
                         grad.data_ptr<float>(), stream));
  } else {
    check_launch(op, dsl_cuda::lookup_backward_atomic(g.data_ptr(), dtype_of(g.scalar_type()),
                                                      pool, bags, mip, fzp,
                                                      grad.data_ptr<float>(), stream));
  }
  return values.scalar_type() == at::kFloat ? grad : grad.to(values.scalar_type());
}

// -------------------------------------------------------------------------- grow scores

std::tuple<at::Tensor, at::Tensor> grow_scores_cuda(
    const at::Tensor& grad_out, const at::Tensor& row_ptr, const at::Tensor& row_slots,
    const at::Tensor& row_mask, const at::Tensor& indices, const at::Tensor& offsets,
    const c10::optional<at::Tensor>& per_sample_weights, const at::Tensor& max_idx,
    int64_t num_blocks, int64_t mode, int64_t padding_idx) {
  constexpr const char* op = "dsl_C::grow_scores";
  check_cuda(op, grad_out, "grad_out");
  const dsl::PoolDims p = dsl::check_pool(op, nullptr, row_ptr, row_slots, row_mask, num_blocks);
  const c10::Device dev = row_ptr.device();
  const int64_t num_bags =
      dsl::check_bags(op, indices, offsets, per_sample_weights, mode, padding_idx, p.N, dev);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == num_bags && grad_out.size(1) >= 1 &&
                  grad_out.size(1) % num_blocks == 0,
              op, ": grad_out must have shape [num_bags, num_blocks * block_size] with num_bags = ",
              num_bags, " and num_blocks = ", num_blocks, ", got ", grad_out.sizes());
  const int64_t D = grad_out.size(1), B = D / num_blocks;
  dsl::check_grad_out(op, grad_out, num_bags, D, dev);
  dsl::check_max_idx_shape(op, max_idx, mode, num_bags, D, dev);
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  const at::Tensor mi = mode == dsl::kModeMax ? max_idx.contiguous() : at::Tensor();
  const at::Tensor g = grad_out.contiguous(), rp = row_ptr.contiguous(),
                   rs = row_slots.contiguous(), rm = row_mask.contiguous();
  const at::Tensor w = psw_float(per_sample_weights);
  const Bags bags = bags_of(idx, off, w, mode, padding_idx);
  const int64_t L = validate(op, bags, p.N, mi, D, dev, stream, off, true);

  const SortedEntries s = sort_entries(op, idx, bags, L, p.N, stream);
  auto uc = at::unique_consecutive(s.rows, /*return_inverse=*/false, /*return_counts=*/true);
  at::Tensor uniq = std::get<0>(uc), counts = std::get<2>(uc);
  int64_t R = uniq.numel();
  if (R > 0 && padding_idx >= 0 && uniq[R - 1].item<int64_t>() == p.N) --R;  // drop padding
  uniq = uniq.narrow(0, 0, R).contiguous();
  at::Tensor seg = at::zeros({R + 1}, counts.options());
  if (R > 0) seg.narrow(0, 1, R).copy_(at::cumsum(counts.narrow(0, 0, R), 0));
  at::Tensor scores = at::zeros({R, num_blocks}, grad_out.options().dtype(at::kFloat));
  check_launch(op, dsl_cuda::grow_scores(
                       g.data_ptr(), dtype_of(g.scalar_type()), pool_of(p, rp, rs, rm, B),
                       static_cast<int>(mode), uniq.data_ptr<int64_t>(), seg.data_ptr<int64_t>(),
                       R, s.order.data_ptr<int64_t>(), s.bag_of.data_ptr<int64_t>(),
                       s.scale.data_ptr<float>(), mi.defined() ? mi.data_ptr<int64_t>() : nullptr,
                       scores.data_ptr<float>(), stream));
  return {uniq, scores};
}

// ------------------------------------------------------------------------ rebuild index

std::tuple<at::Tensor, at::Tensor, at::Tensor> rebuild_index_cuda(const at::Tensor& coord,
                                                                  int64_t num_rows,
                                                                  int64_t num_blocks) {
  constexpr const char* op = "dsl_C::rebuild_index";
  check_cuda(op, coord, "coord");
  TORCH_CHECK(coord.scalar_type() == at::kLong && coord.dim() == 1, op,
              ": coord must be a 1-D int64 tensor, got ", coord.scalar_type(), " of shape ",
              coord.sizes());
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows);
  TORCH_CHECK(num_blocks >= 1, op, ": num_blocks must be >= 1, got ", num_blocks);
  TORCH_CHECK(num_rows < std::numeric_limits<int32_t>::max() &&
                  num_rows <= std::numeric_limits<int64_t>::max() / num_blocks,
              op, ": num_rows * num_blocks is too large (", num_rows, " x ", num_blocks, ")");
  const int64_t C = coord.numel();
  TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), op,
              ": more slots than int32 row_slots can address (", C, ")");
  const c10::cuda::CUDAGuard guard(coord.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor c = coord.contiguous();
  const int64_t W = dsl::mask_words(num_blocks);
  const auto opts = coord.options();
  at::Tensor row_mask = at::zeros({num_rows, W}, opts.dtype(at::kLong));
  at::Tensor err = at::zeros({dsl_cuda::kErrorWords}, opts.dtype(at::kLong));
  check_launch(op, dsl_cuda::rebuild_mask(c.data_ptr<int64_t>(), C, num_rows, num_blocks,
                                          row_mask.data_ptr<int64_t>(), err.data_ptr<int64_t>(),
                                          stream));
  const at::Tensor h = err.cpu();
  const int64_t* e = h.data_ptr<int64_t>();
  TORCH_CHECK_INDEX(e[0] != dsl_cuda::kCoordBad, op, ": coord[", e[1], "] = ", e[2],
                    " is neither -1 (free) nor a block row * num_blocks + col of the ", num_rows,
                    " x ", num_blocks, " table");
  TORCH_CHECK(e[0] != dsl_cuda::kCoordDuplicate, op, ": coord[", e[1], "] = ", e[2],
              " names a block that another slot already holds");
  at::Tensor row_ptr = at::zeros({num_rows + 1}, opts.dtype(at::kInt));
  if (num_rows > 0) {
    at::Tensor tail = row_ptr.narrow(0, 1, num_rows);
    check_launch(op, dsl_cuda::row_counts(row_mask.data_ptr<int64_t>(), num_rows, W,
                                          tail.data_ptr<int32_t>(), stream));
    tail.copy_(at::cumsum(tail, 0, at::kInt));
  }
  at::Tensor row_slots = at::full({C}, -1, opts.dtype(at::kInt));
  check_launch(op, dsl_cuda::scatter_row_slots(c.data_ptr<int64_t>(), C, num_blocks, W,
                                               row_mask.data_ptr<int64_t>(),
                                               row_ptr.data_ptr<int32_t>(),
                                               row_slots.data_ptr<int32_t>(), stream));
  return {row_ptr, row_slots, row_mask};
}

}  // namespace
}  // namespace dsl_cuda_binding

TORCH_LIBRARY_FRAGMENT(dsl_C, m) {
  // Process-wide settings of the CUDA ops (no tensor arguments: one kernel for every key).
  m.def("cuda_bounds_check_mode(int mode) -> int", &dsl_cuda_binding::cuda_bounds_check_mode);
  m.def("cuda_bounds_record(Device device) -> Tensor", &dsl_cuda_binding::cuda_bounds_record);
}

TORCH_LIBRARY_IMPL(dsl_C, CUDA, m) {
  m.impl("lookup", &dsl_cuda_binding::lookup_cuda);
  m.impl("lookup_backward", &dsl_cuda_binding::lookup_backward_cuda);
  m.impl("grow_scores", &dsl_cuda_binding::grow_scores_cuda);
  m.impl("rebuild_index", &dsl_cuda_binding::rebuild_index_cuda);
}

#ifdef DSL_KERNELS_PYTHON_MODULE
// The Python module dsl_kernels._C_cuda: importing it runs the registration above (the schemas
// come from dsl_kernels._C, which must be imported first).
#include <Python.h>

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
#endif
