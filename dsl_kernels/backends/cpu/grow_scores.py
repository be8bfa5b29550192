"""``dsl::grow_scores`` on CPU: the kernel of csrc/cpu/grow_scores.cpp, ``torch.ops.dsl_C.grow_scores``, whose
arguments are those of the reference implementation (csrc/ops.cpp), so it registers as is."""
import torch

from ..registry import register_impl

register_impl("cpu", "grow_scores")(torch.ops.dsl_C.grow_scores.default)
