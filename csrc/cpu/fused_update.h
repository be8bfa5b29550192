// Per-block optimizer update shared by the CPU kernel (csrc/cpu/fused_update.cpp) and, as a
// reading aid, mirrored by the CUDA kernel (csrc/cuda/fused_update.cu) and the Triton kernel
// (dsl_kernels/backends/triton/fused_update.py). The formulas and their evaluation order are
// those of dsl_kernels/backends/reference/fused_update.py::apply_rows (the reference), so
// backends agree to the last bits.
//
// No torch headers: plain C++ usable from any translation unit.
#pragma once

#include <cmath>
#include <cstdint>

namespace dsl_fused {

enum Optimizer : int64_t { kSGD = 0, kAdagrad = 1, kRowwiseAdagrad = 2, kAdam = 3, kAdamW = 4 };
enum NanPolicy : int64_t { kIgnore = 0, kSkip = 1, kRaise = 2 };

struct Hyper {
  int64_t optimizer;
  float lr, beta1, beta2, eps, weight_decay, step_size;
  int64_t nan_policy;
};

// Update one block of B values in place. g: fp32 gradient (clobbered); p: fp32 values in/out;
// s1/s2: the slot's state (s1 has 1 element for row-wise Adagrad, B for the others; unused
// pointers may be null). new_s1/new_s2: scratch of B floats. Returns false (and writes
// nothing back into p/s1/s2) when the policy skips a non-finite update; `round` maps a float
// to the value dtype and back (fp16 overflow must count as non-finite).
template <typename Round>
inline bool update_block(const Hyper& h, int64_t B, float* g, float* p, float* s1, float* s2,
                         float* new_s1, float* new_s2, float* new_p, Round round) {
  if (h.optimizer != kAdamW && h.weight_decay != 0.0f)
    for (int64_t k = 0; k < B; ++k) g[k] = g[k] + h.weight_decay * p[k];
  switch (h.optimizer) {
    case kSGD:
      for (int64_t k = 0; k < B; ++k) new_p[k] = p[k] - h.lr * g[k];
      break;
    case kAdagrad:
      for (int64_t k = 0; k < B; ++k) {
        new_s1[k] = s1[k] + g[k] * g[k];
        new_p[k] = p[k] - h.lr * g[k] / (std::sqrt(new_s1[k]) + h.eps);
      }
      break;
    case kRowwiseAdagrad: {
      float sq = 0.0f;
      for (int64_t k = 0; k < B; ++k) sq = sq + g[k] * g[k];
      new_s1[0] = s1[0] + sq / static_cast<float>(B);
      const float denom = std::sqrt(new_s1[0]) + h.eps;
      for (int64_t k = 0; k < B; ++k) new_p[k] = p[k] - h.lr * g[k] / denom;
      break;
    }
    default: {  // Adam / AdamW, SparseAdam's lazy form
      const float decay = 1.0f - h.lr * h.weight_decay;
      for (int64_t k = 0; k < B; ++k) {
        const float pk = h.optimizer == kAdamW ? p[k] * decay : p[k];
        new_s1[k] = s1[k] + (g[k] - s1[k]) * (1.0f - h.beta1);
        new_s2[k] = s2[k] + (g[k] * g[k] - s2[k]) * (1.0f - h.beta2);
        new_p[k] = pk - h.step_size * (new_s1[k] / (std::sqrt(new_s2[k]) + h.eps));
      }
    }
  }
  const int64_t n1 = h.optimizer == kSGD ? 0 : (h.optimizer == kRowwiseAdagrad ? 1 : B);
  const int64_t n2 = (h.optimizer == kAdam || h.optimizer == kAdamW) ? B : 0;
  if (h.nan_policy != kIgnore) {
    bool ok = true;
    for (int64_t k = 0; k < B; ++k) ok = ok && std::isfinite(round(new_p[k]));
    for (int64_t k = 0; k < n1; ++k) ok = ok && std::isfinite(new_s1[k]);
    for (int64_t k = 0; k < n2; ++k) ok = ok && std::isfinite(new_s2[k]);
    if (!ok) return false;
  }
  for (int64_t k = 0; k < B; ++k) p[k] = new_p[k];
  for (int64_t k = 0; k < n1; ++k) s1[k] = new_s1[k];
  for (int64_t k = 0; k < n2; ++k) s2[k] = new_s2[k];
  return true;
}

}  // namespace dsl_fused
