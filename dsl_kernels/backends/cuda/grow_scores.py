"""``dsl::grow_scores`` on CUDA: ``torch.ops.dsl_C.grow_scores``, whose CUDA kernel csrc/cuda/binding.cpp
registers (csrc/cuda/grow_scores.cu); its arguments are those of the reference implementation."""
import torch

from ..registry import register_impl

register_impl("cuda", "grow_scores")(torch.ops.dsl_C.grow_scores.default)
