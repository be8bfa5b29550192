// Torch binding of the CUDA fused backward + optimizer: dsl_C::fused_update_rows on CUDA.
//
// The schema is defined with the CPU kernel (csrc/cpu/fused_update.cpp, built into
// dsl_kernels._C, which the CUDA extension's loader imports first). This file checks the
// arguments, splits the Zipf-hot rows off into chunks (the device-side mirror of
// dsl_kernels/backends/touched_rows.py::split_heavy_runs) and calls the raw-pointer launcher.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fused_update.cuh"

namespace {

constexpr int64_t kChunk = 256;  // entries per partial sum of a hot row

void check_t(const at::Tensor& t, const char* name, at::ScalarType dt, const c10::Device& dev) {
  TORCH_CHECK(t.scalar_type() == dt, "fused_update_rows: ", name, " must be ", dt, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fused_update_rows: ", name, " must be contiguous");
  TORCH_CHECK(t.device() == dev, "fused_update_rows: ", name, " is on ", t.device(),
              " but values are on ", dev);
}

at::Tensor fused_update_rows_cuda(const at::Tensor& grad_out, at::Tensor& values,
                                  at::Tensor& state1, at::Tensor& state2,
                                  const at::Tensor& row_ptr, const at::Tensor& row_slots,
                                  const at::Tensor& row_mask, const at::Tensor& perm,
                                  const at::Tensor& run_start, const at::Tensor& run_rows,
                                  const at::Tensor& bag, const at::Tensor& scale,
                                  const at::Tensor& max_idx,
                                  const c10::optional<at::Tensor>& frozen, int64_t num_blocks,
                                  int64_t mode, int64_t optimizer, double lr, double beta1,
                                  double beta2, double eps, double weight_decay,
                                  double step_size, int64_t nan_policy) {
  const auto dev = values.device();
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous(),
              "fused_update_rows: values must be a contiguous [C, B] tensor");
  const int64_t C = values.size(0), B = values.size(1), D = num_blocks * B;
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(1) == D,
              "fused_update_rows: grad_out must be [num_bags, num_blocks * block_size]");
  TORCH_CHECK(optimizer >= 0 && optimizer <= 4, "fused_update_rows: unknown optimizer ",
              optimizer);
  TORCH_CHECK(mode >= 0 && mode <= 2, "fused_update_rows: mode must be 0, 1 or 2, got ", mode);
  check_t(grad_out, "grad_out", values.scalar_type(), dev);
  check_t(row_ptr, "row_ptr", at::kInt, dev);
  check_t(row_slots, "row_slots", at::kInt, dev);
  check_t(row_mask, "row_mask", at::kLong, dev);
  check_t(perm, "perm", at::kLong, dev);
  check_t(run_start, "run_start", at::kLong, dev);
  check_t(run_rows, "run_rows", at::kLong, dev);
  check_t(bag, "bag", at::kLong, dev);
  TORCH_CHECK(run_start.numel() == run_rows.numel() + 1,
              "fused_update_rows: run_start must have one entry more than run_rows");
  if (mode == 2) check_t(max_idx, "max_idx", at::kLong, dev);
  else check_t(scale, "scale", at::kFloat, dev);
  if (optimizer != 0) {
    check_t(state1, "state1", at::kFloat, dev);
    TORCH_CHECK(state1.numel() == (optimizer == 2 ? C : C * B),
                "fused_update_rows: state1 has the wrong size for this optimizer");
  }
  if (optimizer >= 3) {
    check_t(state2, "state2", at::kFloat, dev);
    TORCH_CHECK(state2.numel() == C * B, "fused_update_rows: state2 must be [C, B] fp32");
  }
  if (frozen.has_value()) {
    check_t(*frozen, "frozen", at::kBool, dev);
    TORCH_CHECK(frozen->numel() == C, "fused_update_rows: frozen must have one flag per slot");
  }
  const int64_t smem = dsl_fused_cuda::fused_update_smem_bytes(D, num_blocks);
  TORCH_CHECK(smem <= 160 * 1024, "fused_update_rows: embedding_dim ", D,
              " is too wide for the CUDA fused kernel (shared memory); use backend='triton'");

  c10::cuda::CUDAGuard guard(dev);
  auto skipped = at::zeros({1}, values.options().dtype(at::kLong));
  const int64_t R = run_rows.numel();
  if (R == 0) return skipped;

  // Light runs (<= kChunk entries): one warp each. Heavy runs: chunks of kChunk entries summed
  // by their own warps first, in entry order.
  auto counts = run_start.slice(0, 1) - run_start.slice(0, 0, R);
  auto is_heavy = counts > kChunk;
  auto light = at::nonzero(is_heavy.logical_not()).squeeze(1).contiguous();
  auto heavy = at::nonzero(is_heavy).squeeze(1).contiguous();
  const int64_t H = heavy.numel();
  at::Tensor chunk_lo, chunk_hi, chunk_ptr, partial;
  int64_t total = 0;
  if (H > 0) {
    auto nch = at::div(counts.index_select(0, heavy) + (kChunk - 1), kChunk, "floor");
    chunk_ptr = at::zeros({H + 1}, run_start.options());
    chunk_ptr.slice(0, 1).copy_(at::cumsum(nch, 0));
    total = chunk_ptr[H].item<int64_t>();
    auto owner = at::repeat_interleave(at::arange(H, run_start.options()), nch, 0, total);
    auto k = at::arange(total, run_start.options()) - chunk_ptr.index_select(0, owner);
    auto run = heavy.index_select(0, owner);
    chunk_lo = (run_start.index_select(0, run) + k * kChunk).contiguous();
    chunk_hi = at::minimum(chunk_lo + kChunk, run_start.index_select(0, run + 1)).contiguous();
    partial = at::empty({total, D}, values.options().dtype(at::kFloat));
  }

  dsl_fused_cuda::FusedArgs a{};
  a.values = values.data_ptr();
  a.state1 = state1.numel() ? state1.data_ptr<float>() : nullptr;
  a.state2 = state2.numel() ? state2.data_ptr<float>() : nullptr;
  a.row_ptr = row_ptr.data_ptr<int32_t>();
  a.row_slots = row_slots.data_ptr<int32_t>();
  a.row_mask = row_mask.data_ptr<int64_t>();
  a.frozen = frozen.has_value() ? frozen->data_ptr<bool>() : nullptr;
  a.grad_out = grad_out.data_ptr();
  a.perm = perm.data_ptr<int64_t>();
  a.run_start = run_start.data_ptr<int64_t>();
  a.run_rows = run_rows.data_ptr<int64_t>();
  a.bag = bag.data_ptr<int64_t>();
  a.scale = mode == 2 ? nullptr : scale.data_ptr<float>();
  a.max_idx = mode == 2 ? max_idx.data_ptr<int64_t>() : nullptr;
  a.light = light.data_ptr<int64_t>();
  a.num_light = light.numel();
  a.heavy = H ? heavy.data_ptr<int64_t>() : nullptr;
  a.num_heavy = H;
  a.chunk_lo = H ? chunk_lo.data_ptr<int64_t>() : nullptr;
  a.chunk_hi = H ? chunk_hi.data_ptr<int64_t>() : nullptr;
  a.chunk_ptr = H ? chunk_ptr.data_ptr<int64_t>() : nullptr;
  a.num_chunks = total;
  a.partial = H ? partial.data_ptr<float>() : nullptr;
  a.skipped = skipped.data_ptr<int64_t>();
  a.C = C;
  a.B = B;
  a.D = D;
  a.NB = num_blocks;
  a.W = row_mask.size(1);
  a.num_rows = row_mask.size(0);
  a.mode = static_cast<int>(mode);
  a.value_type = values.scalar_type() == at::kHalf       ? dsl_fused_cuda::kF16
                 : values.scalar_type() == at::kBFloat16 ? dsl_fused_cuda::kBF16
                                                         : dsl_fused_cuda::kF32;
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kHalf ||
                  values.scalar_type() == at::kBFloat16,
              "fused_update_rows: values must be float32, float16 or bfloat16");
  a.optimizer = static_cast<int>(optimizer);
  a.nan_check = nan_policy != 0;
  a.lr = static_cast<float>(lr);
  a.beta1 = static_cast<float>(beta1);
  a.beta2 = static_cast<float>(beta2);
  a.eps = static_cast<float>(eps);
  a.weight_decay = static_cast<float>(weight_decay);
  a.step_size = static_cast<float>(step_size);
  const cudaError_t err =
      dsl_fused_cuda::launch_fused_update_rows(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "fused_update_rows: CUDA launch failed: ",
              cudaGetErrorString(err));
  return skipped;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsl_C, CUDA, m) { m.impl("fused_update_rows", &fused_update_rows_cuda); }
