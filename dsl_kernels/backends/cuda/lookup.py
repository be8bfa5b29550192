"""``dsl::lookup`` on CUDA: ``torch.ops.dsl_C.lookup``, whose CUDA kernel csrc/cuda/binding.cpp
registers (csrc/cuda/lookup.cu); its arguments are those of the reference implementation."""
import torch

from ..registry import register_impl

register_impl("cuda", "lookup")(torch.ops.dsl_C.lookup.default)
