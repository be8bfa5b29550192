"""``dsl::lookup`` on CPU: the kernel of csrc/cpu/lookup.cpp, ``torch.ops.dsl_C.lookup``, whose
arguments are those of the reference implementation (csrc/ops.cpp), so it registers as is."""
import torch

from ..registry import register_impl

register_impl("cpu", "lookup")(torch.ops.dsl_C.lookup.default)
