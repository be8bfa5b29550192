"""``dsl::fill_rows_`` on CPU: csrc/cpu/fill_rows.cpp (rows prefetched ahead) for contiguous
tensors it supports (any dtype for 0, fp32 for other values); anything else runs the
reference's ``index_fill_``."""
from torch import Tensor
import torch

from ..reference.fill_rows import fill_rows_reference
from ..registry import register_impl
from .fused_update import has_compiled_op


def fill_rows_cpu(t: Tensor, rows: Tensor, value: float) -> None:
    if t.is_contiguous() and t.dim() >= 1 and (value == 0.0 or t.dtype == torch.float32):
        torch.ops.dsl_C.fill_rows_(t, rows, value)
    else:
        fill_rows_reference(t, rows, value)


if has_compiled_op("dsl_C::fill_rows_", "CPU"):  # an extension built before it lacks the op
    register_impl("cpu", "fill_rows_")(fill_rows_cpu)
