"""``dsl::lookup_backward`` on CPU: the kernel of csrc/cpu/lookup_backward.cpp, ``torch.ops.dsl_C.lookup_backward``, whose
arguments are those of the reference implementation (csrc/ops.cpp), so it registers as is."""
import torch

from ..registry import register_impl

register_impl("cpu", "lookup_backward")(torch.ops.dsl_C.lookup_backward.default)
