"""``dsl::rebuild_index`` on CPU: the kernel of csrc/cpu/rebuild_index.cpp, ``torch.ops.dsl_C.rebuild_index``, whose
arguments are those of the reference implementation (csrc/ops.cpp), so it registers as is."""
import torch

from ..registry import register_impl

register_impl("cpu", "rebuild_index")(torch.ops.dsl_C.rebuild_index.default)
