"""Python objects the backward of ``dsl::lookup`` reports to (a pool whose lookups are observed
by the sparsity engine), known by an integer id.

The id is what crosses a ``torch.compile`` graph (an int argument of the op); the object stays
out of it and is reached at run time by the opaque op :func:`observe_lookup`, so observing the
gradient is no Python side effect inside the traced region ("Unsafe side effect" otherwise).
"""
from __future__ import annotations

import itertools
import weakref
from typing import Any, Dict, Optional

import torch
from torch import Tensor

_OBJECTS: Dict[int, "weakref.ref[Any]"] = {}
_NEXT = itertools.count()


def register(obj: Any) -> int:
    """A new id for ``obj`` (held weakly: the entry dies with the object)."""
    hook_id = next(_NEXT)
    _OBJECTS[hook_id] = weakref.ref(obj, lambda _, i=hook_id: _OBJECTS.pop(i, None))
    return hook_id


def resolve(hook_id: int) -> Any:
    ref = _OBJECTS.get(hook_id)
    obj = ref() if ref is not None else None
    if obj is None:
        raise RuntimeError(f"dsl lookup hook {hook_id} refers to an object that no longer exists")
    return obj


@torch.library.custom_op("dsl::observe_lookup", mutates_args=())
def observe_lookup(grad_out: Tensor, indices: Tensor, offsets: Tensor,
                   per_sample_weights: Optional[Tensor], max_idx: Tensor, num_blocks: int,
                   mode: int, padding_idx: int, observer: int) -> Tensor:
    """Hand the output gradient of a lookup to ``resolve(observer).notify_lookup(...)``; returns
    ``grad_out`` (a copy: a custom op may not alias), which the backward then uses, so the call
    is never dropped as dead code."""
    resolve(observer).notify_lookup(grad_out, indices, offsets, per_sample_weights, max_idx,
                                    num_blocks, mode, padding_idx)
    return grad_out.clone()


@observe_lookup.register_fake
def _observe_lookup_fake(grad_out, indices, offsets, per_sample_weights, max_idx, num_blocks,
                         mode, padding_idx, observer):
    return torch.empty_like(grad_out)
