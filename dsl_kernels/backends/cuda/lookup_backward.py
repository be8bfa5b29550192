"""``dsl::lookup_backward`` on CUDA: ``torch.ops.dsl_C.lookup_backward``, whose CUDA kernel csrc/cuda/binding.cpp
registers (csrc/cuda/lookup_backward.cu); its arguments are those of the reference implementation."""
import torch

from ..registry import register_impl

register_impl("cuda", "lookup_backward")(torch.ops.dsl_C.lookup_backward.default)
