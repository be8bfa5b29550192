"""``dsl::fused_update`` on CUDA: the compiled kernel (csrc/cuda/fused_update.cu) when this
build has it, else the Triton kernel when Triton runs, else the reference (the registry's
fallback)."""
from __future__ import annotations

from ..cpu.fused_update import fused_update as compiled_fused_update, has_compiled_op
from ..registry import implementation, register_impl, why_not

if has_compiled_op("dsl_C::fused_update_rows", "CUDA"):
    register_impl("cuda", "fused_update")(compiled_fused_update)
elif why_not("triton", "cuda") is None:  # a CUDA build without the fused kernel
    register_impl("cuda", "fused_update")(implementation("triton", "fused_update"))
