"""Python objects the backward of ``dsl::lookup`` / ``dsl::fused_lookup`` reports to (a pool
whose lookups the sparsity engine observes, a fused optimizer), known by an integer id.

The id is what crosses a ``torch.compile`` graph (an int argument of the op); the object stays
out of it and is reached at run time by the opaque ops :func:`observe_lookup` and
:func:`fused_step_`, so observing the gradient or stepping the optimizer is no Python side effect
inside the traced region (``torch.compile`` rejects those as "Unsafe side effect").
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


@torch.library.custom_op("dsl::fused_step_", mutates_args=("values",))
def fused_step_(values: Tensor, grad_out: Tensor, row_ptr: Tensor, row_slots: Tensor,
                row_mask: Tensor, indices: Tensor, offsets: Tensor,
                per_sample_weights: Optional[Tensor], max_idx: Tensor, frozen: Optional[Tensor],
                plan: Tensor, plan_scale: Tensor, num_blocks: int, bag_mode: int,
                padding_idx: int, psw_grad: bool, backend: str, fused: int) -> Tensor:
    """The backward of ``dsl::fused_lookup``: ``resolve(fused).step_from_backward(...)`` updates
    ``values`` (and the optimizer state it holds) in place and returns the gradient of
    ``per_sample_weights`` (fp32, empty unless ``psw_grad``). (``bag_mode``, not ``mode``: the
    functionalisation wrapper of a mutating op takes a ``mode`` keyword of its own.)"""
    return resolve(fused).step_from_backward(
        values, grad_out, row_ptr, row_slots, row_mask, indices, offsets, per_sample_weights,
        max_idx, frozen, plan, plan_scale, num_blocks, bag_mode, padding_idx, psw_grad, backend)


@fused_step_.register_fake
def _fused_step_fake(values, grad_out, row_ptr, row_slots, row_mask, indices, offsets,
                     per_sample_weights, max_idx, frozen, plan, plan_scale, num_blocks, bag_mode,
                     padding_idx, psw_grad, backend, fused):
    return grad_out.new_empty((indices.shape[0] if psw_grad else 0,), dtype=torch.float32)
