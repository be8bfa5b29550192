"""``dsl::update_index_`` on CPU: the in-place kernel of csrc/cpu/update_index.cpp,
``torch.ops.dsl_C.update_index_``, whose arguments are those of the reference implementation."""
import torch

from ..registry import register_impl
from .fused_update import has_compiled_op

if has_compiled_op("dsl_C::update_index_", "CPU"):  # an extension built before it lacks the op
    register_impl("cpu", "update_index_")(torch.ops.dsl_C.update_index_.default)
