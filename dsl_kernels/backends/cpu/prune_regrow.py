"""``dsl::prune_regrow_`` on CPU: the kernel of csrc/cpu/prune_regrow.cpp (one pass for the block
magnitudes and a radix select for the k weakest, the same select over the candidates; same
results and tie rules as the reference), ``torch.ops.dsl_C.prune_regrow_``. It also checks the
candidates against the table layout (``tables``) in its pass over the keys, so the op skips the
Python check (``checks_tables``), which builds candidate-sized temporaries. ``keep_first`` (a
row's first active block is not prunable) is done in the kernel's key pass (``keeps_first``)."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..registry import register_impl
from .fused_update import has_compiled_op


def prune_regrow_cpu(values: Tensor, coord: Tensor, row_mask: Tensor, cand_keys: Tensor,
                     cand_scores: Tensor, k: int, num_blocks: int, prune_slots: Optional[Tensor],
                     tables: Optional[Tensor] = None, keep_first: bool = False
                     ) -> Tuple[Tensor, Tensor]:
    if keep_first:
        return torch.ops.dsl_C.prune_regrow_(values, coord, row_mask, cand_keys, cand_scores, k,
                                             num_blocks, prune_slots, tables, True)
    return torch.ops.dsl_C.prune_regrow_(values, coord, row_mask, cand_keys, cand_scores, k,
                                         num_blocks, prune_slots, tables)


prune_regrow_cpu.checks_tables = True  # read by dsl_kernels/ops/prune_regrow.py

if has_compiled_op("dsl_C::prune_regrow_", "CPU"):  # an extension built before it lacks the op
    register_impl("cpu", "prune_regrow_")(prune_regrow_cpu)
    # An extension built before keep_first lacks the argument: the op then passes a slot list.
    prune_regrow_cpu.keeps_first = any(
        a.name == "keep_first" for a in torch.ops.dsl_C.prune_regrow_.default._schema.arguments)
