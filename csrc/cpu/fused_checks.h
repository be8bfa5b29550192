// Argument checks and hyper-parameters shared by the two CPU fused-optimizer paths
// (fused_update.cpp: lookup + fused_update_rows over a touched-rows plan; fused_step.cpp:
// fused_lookup + fused_apply). Everything is checked before anything is written.
#pragma once

#include <ATen/ATen.h>

#include "fused_update.h"

namespace dsl_cpu {

// values [C, B] contiguous; grad_out of the values dtype; the optimizer code known; the state
// tensors fp32, contiguous and sized for that optimizer (state1 [C] for row-wise Adagrad,
// [C, B] otherwise; state2 [C, B] for Adam/AdamW).
inline void check_fused_pool(const char* op, const at::Tensor& grad_out, const at::Tensor& values,
                             const at::Tensor& state1, const at::Tensor& state2,
                             int64_t optimizer) {
  const auto dev = values.device();
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous(), op,
              ": values must be a contiguous [C, B] tensor");
  TORCH_CHECK(grad_out.scalar_type() == values.scalar_type(), op, ": grad_out dtype ",
              grad_out.scalar_type(), " differs from values dtype ", values.scalar_type());
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.device() == dev, op,
              ": grad_out must be a 2-D tensor on ", dev);
  TORCH_CHECK(optimizer >= 0 && optimizer <= 4, op, ": unknown optimizer ", optimizer);
  const int64_t C = values.size(0), B = values.size(1);
  auto check_state = [&](const at::Tensor& s, const char* name, int64_t want) {
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.device() == dev, op,
                ": ", name, " must be a contiguous fp32 tensor on ", dev);
    TORCH_CHECK(s.numel() == want, op, ": ", name, " must hold ", want,
                " fp32 values for this optimizer, got ", s.numel());
  };
  if (optimizer != dsl_fused::kSGD)
    check_state(state1, "state1", optimizer == dsl_fused::kRowwiseAdagrad ? C : C * B);
  if (optimizer == dsl_fused::kAdam || optimizer == dsl_fused::kAdamW)
    check_state(state2, "state2", C * B);
}

inline dsl_fused::Hyper make_hyper(int64_t optimizer, double lr, double beta1, double beta2,
                                   double eps, double weight_decay, double step_size,
                                   int64_t nan_policy) {
  return dsl_fused::Hyper{optimizer,
                          static_cast<float>(lr),
                          static_cast<float>(beta1),
                          static_cast<float>(beta2),
                          static_cast<float>(eps),
                          static_cast<float>(weight_decay),
                          static_cast<float>(step_size),
                          nan_policy};
}

}  // namespace dsl_cpu
