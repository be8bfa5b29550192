// Torch binding of the CUDA fused backward + optimizer: dsl_C::fused_update_rows on CUDA.
//
// The schema is defined with the CPU kernel (csrc/cpu/fused_update.cpp, built into
// dsl_kernels._C, which the CUDA extension's loader imports first). This file checks the
// arguments, sizes the hot-row scratch by the batch (see fused_update.cu; the plan comes from
// fused_plan.cu) and calls the raw-pointer launcher. Nothing is read back to the host: the
// plan may be padded (empty runs of row -1) and the hot-row split happens on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "../checks.h"
#include "fused_update.cuh"

namespace {

void check_t(const at::Tensor& t, const char* name, at::ScalarType dt, const c10::Device& dev) {
  TORCH_CHECK(t.scalar_type() == dt, "fused_update_rows: ", name, " must be ", dt, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fused_update_rows: ", name, " must be contiguous");
  TORCH_CHECK(t.device() == dev, "fused_update_rows: ", name, " is on ", t.device(),
              " but values are on ", dev);
}

// Multiprocessors of the device (the update kernel's grid). Read once per device
// (cudaDeviceGetAttribute does not synchronise).
int multiprocessors(c10::DeviceIndex dev) {
  static int cache[64] = {0};
  const int i = dev < 0 ? 0 : (dev < 64 ? dev : 63);
  if (cache[i] == 0) {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cache[i] = std::max(1, sms);
  }
  return cache[i];
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
  // Hot rows: aligned chunks of the sorted entries (see fused_update.cu); the scratch is
  // sized by the batch, so nothing is read back to size it.
  const int64_t E = perm.numel();
  const int64_t num_chunks = (E + dsl_fused_cuda::kChunk - 1) / dsl_fused_cuda::kChunk;
  at::Tensor partial = num_chunks > 0 ? at::empty({num_chunks, D}, values.options().dtype(at::kFloat))
                                      : at::Tensor();

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
  a.num_runs = R;
  a.num_chunks = num_chunks;
  a.partial = num_chunks > 0 ? partial.data_ptr<float>() : nullptr;
  a.num_sms = multiprocessors(dev.index());
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

// The touched-rows plan on the device, padded to the batch size so that nothing is read back
// (see fused_plan.cu): (perm [L], run_start [L + 1], run_rows [L], bag [L], scale [L or 0]).
// Runs past the R real ones are empty and name row -1. Entries of rows outside [0, num_rows)
// are dropped, not reported: the lookup's validation (bounds-check mode) reports them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_plan_cuda(
    const at::Tensor& indices, const at::Tensor& offsets,
    const c10::optional<at::Tensor>& per_sample_weights, int64_t mode, int64_t padding_idx,
    int64_t num_rows) {
  dsl::check_plan_args(indices, offsets, mode, num_rows);
  c10::cuda::CUDAGuard guard(indices.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor off = offsets.to(indices.scalar_type()).contiguous();
  const int64_t L = idx.numel(), num_bags = off.numel() - 1;
  const auto lopt = idx.options().dtype(at::kLong);
  const bool is_max = mode == 2;
  at::Tensor psw;
  if (per_sample_weights.has_value() && !is_max) {
    psw = per_sample_weights->reshape({-1}).to(at::kFloat).contiguous();
    TORCH_CHECK(psw.numel() >= L, "fused_plan: per_sample_weights needs one weight per index");
  }
  // 32-bit sort keys when the rows allow: half the radix passes of a 64-bit sort.
  const bool key64 = num_rows >= std::numeric_limits<int32_t>::max();
  const at::ScalarType kdt = key64 ? at::kLong : at::kInt;
  at::Tensor bag = at::full({L}, num_bags, lopt);
  at::Tensor key = at::full({L}, key64 ? std::numeric_limits<int64_t>::max()
                                       : int64_t(std::numeric_limits<int32_t>::max()),
                            idx.options().dtype(kdt));
  at::Tensor scale = at::zeros({is_max ? 0 : L}, idx.options().dtype(at::kFloat));
  dsl_fused_cuda::PlanArgs p{};
  p.indices = idx.data_ptr();
  p.offsets = off.data_ptr();
  p.index64 = idx.scalar_type() == at::kLong;
  p.L = L;
  p.num_bags = num_bags;
  p.psw = psw.defined() ? psw.data_ptr<float>() : nullptr;
  p.mode = static_cast<int>(mode);
  p.padding_idx = padding_idx;
  p.num_rows = num_rows;
  p.bag = bag.data_ptr<int64_t>();
  p.key = key.data_ptr();
  p.key64 = key64;
  p.scale = is_max ? nullptr : scale.data_ptr<float>();
  auto check = [](cudaError_t e) {
    TORCH_CHECK(e == cudaSuccess, "fused_plan: CUDA launch failed: ", cudaGetErrorString(e));
  };
  check(dsl_fused_cuda::plan_entries(p, stream));
  auto sorted = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor skey = std::get<0>(sorted), perm = std::get<1>(sorted);
  at::Tensor head = at::empty({L}, lopt);
  check(dsl_fused_cuda::plan_heads(skey.data_ptr(), key64, L, head.data_ptr<int64_t>(), stream));
  const at::Tensor run_id = L > 0 ? at::cumsum(head, 0) : head;
  at::Tensor run_start = at::empty({L + 1}, lopt);
  at::Tensor run_rows = at::empty({L}, lopt);
  at::Tensor meta = at::zeros({2}, lopt);
  check(dsl_fused_cuda::plan_runs(skey.data_ptr(), key64, run_id.data_ptr<int64_t>(), L,
                                  run_start.data_ptr<int64_t>(), run_rows.data_ptr<int64_t>(),
                                  meta.data_ptr<int64_t>(), stream));
  return {perm, run_start, run_rows, bag, scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsl_C, CUDA, m) {
  m.impl("fused_update_rows", &fused_update_rows_cuda);
  m.impl("fused_plan", &fused_plan_cuda);
}
