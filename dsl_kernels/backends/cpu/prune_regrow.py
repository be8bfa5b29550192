"""``dsl::prune_regrow_`` on CPU: the kernel of csrc/cpu/prune_regrow.cpp (one pass for the block
magnitudes, a radix select for the k weakest, nth_element over the candidates; same results and
tie rules as the reference), ``torch.ops.dsl_C.prune_regrow_``, whose arguments are those of the
reference implementation, so it registers as is."""
import torch

from ..registry import register_impl
from .fused_update import has_compiled_op

if has_compiled_op("dsl_C::prune_regrow_", "CPU"):  # an extension built before it lacks the op
    register_impl("cpu", "prune_regrow_")(torch.ops.dsl_C.prune_regrow_.default)
