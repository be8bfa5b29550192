"""``dsl::rebuild_index`` on CUDA: ``torch.ops.dsl_C.rebuild_index``, whose CUDA kernel csrc/cuda/binding.cpp
registers (csrc/cuda/rebuild_index.cu); its arguments are those of the reference implementation."""
import torch

from ..registry import register_impl

register_impl("cuda", "rebuild_index")(torch.ops.dsl_C.rebuild_index.default)
