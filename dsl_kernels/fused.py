"""Fused backward + optimizer on the slot pool (``dsl::fused_update``), as FBGEMM's
table-batched embeddings do it: the lookup gradient is scattered straight into an optimizer
update of the *touched* active slots, so ``values.grad`` is never materialised and no
``optimizer.step()`` runs for the module.

For every active, non-frozen slot touched by the batch the op computes ``g`` = the sum of its
contributions (deterministic: entries grouped by row with a stable sort, summed in input order)
and applies one of

=================== =====================================================================
``"sgd"``           ``p -= lr * (g + wd * p)``  (like ``torch.optim.SGD`` without momentum)
``"adagrad"``       ``s += g^2; p -= lr * g / (sqrt(s) + eps)`` (``torch.optim.Adagrad``,
                    ``wd`` added to ``g``)
``"rowwise_adagrad"`` one fp32 state per slot (FBGEMM's row-wise Adagrad at block granularity):
                    ``s += mean(g^2); p -= lr * g / (sqrt(s) + eps)``
``"adam"``          lazy Adam exactly like ``torch.optim.SparseAdam``: only touched slots
                    update their moments, bias correction uses the global step count,
                    ``p -= lr*sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)``; ``wd`` is L2 (added
                    to ``g``) as in ``torch.optim.Adam``
``"adamw"``         the same with decoupled weight decay on the touched slots
                    (``p *= 1 - lr * wd`` first, as ``torch.optim.AdamW``)
=================== =====================================================================

Untouched slots are not modified at all (lazy semantics): with ``weight_decay=0`` this equals
the dense torch optimizer for SGD and Adagrad, whose untouched rows get a zero gradient.

Optimizer state is fp32 ``[C, B]`` (``[C]`` for row-wise Adagrad), registered as buffers of the
module (``fused_state1``, ``fused_state2``, ``fused_step``), hence saved in its ``state_dict``
and moved by ``.to()``. The sparsity engine resets the state of re-assigned slots with
:func:`reset_optimizer_state`.

``nan_policy``: ``"ignore"`` writes whatever comes out (like torch); ``"skip"`` leaves a slot
untouched (values and state) when its update would be non-finite; ``"raise"`` checks the
gradient first and raises ``FloatingPointError`` before anything is written (and raises after
the update if a slot still had to be skipped).

Example::

    >>> import torch, dsl_kernels
    >>> from dsl_kernels.fused import fuse_optimizer
    >>> emb = dsl_kernels.SparseEmbeddingBag(1000, 16, mode="sum", density=0.25, block_size=4)
    >>> opt = fuse_optimizer(emb, "adam", lr=1e-2)
    >>> before = emb.values.detach().clone()
    >>> emb(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2])).sum().backward()
    >>> emb.values.grad is None, bool((emb.values != before).any()), int(emb.fused_step)
    (True, True, 1)
"""
from __future__ import annotations

import math
import types
import weakref
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import dispatch, ops, reference
from .reference import MODE_MAX, MODE_MEAN

__all__ = ["FusedOptimizer", "fuse_optimizer", "unfuse_optimizer", "reset_optimizer_state",
           "fused_update", "reference_fused_update", "touched_rows_plan", "split_heavy_runs", "OPTIMIZERS",
           "NAN_POLICIES"]

SGD, ADAGRAD, ROWWISE_ADAGRAD, ADAM, ADAMW = 0, 1, 2, 3, 4
OPTIMIZERS: Dict[str, int] = {"sgd": SGD, "adagrad": ADAGRAD, "rowwise_adagrad": ROWWISE_ADAGRAD,
                              "adam": ADAM, "adamw": ADAMW}
NAN_IGNORE, NAN_SKIP, NAN_RAISE = 0, 1, 2
NAN_POLICIES: Dict[str, int] = {"ignore": NAN_IGNORE, "skip": NAN_SKIP, "raise": NAN_RAISE}
# eps defaults of the matching torch optimizers (FBGEMM's for row-wise Adagrad).
_DEFAULT_EPS = {SGD: 0.0, ADAGRAD: 1e-10, ROWWISE_ADAGRAD: 1e-8, ADAM: 1e-8, ADAMW: 1e-8}


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """SparseAdam's bias-corrected step ``lr * sqrt(1 - b2^t) / (1 - b1^t)`` (0 for non-Adam)."""
    if step <= 0:
        return 0.0
    return lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)


# --------------------------------------------------------------------------- reference


def apply_rows(values: Tensor, state1: Tensor, state2: Tensor, slots: Tensor, g: Tensor,
               optimizer: int, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, step_size: float, nan_policy: int) -> Tensor:
    """Apply one optimizer update to the rows ``slots`` (unique, int64) of the pool given their
    fp32 gradient ``g [U, B]``; returns the number of slots skipped as non-finite (int64[1]).
    Shared by the reference backend; the kernels follow the same formulas in the same order."""
    p = values[slots].float()
    if optimizer != ADAMW and weight_decay != 0.0:
        g = g + weight_decay * p
    s1 = s2 = None
    if optimizer == SGD:
        new_p = p - lr * g
    elif optimizer == ADAGRAD:
        s1 = state1[slots] + g * g
        new_p = p - lr * g / (s1.sqrt() + eps)
    elif optimizer == ROWWISE_ADAGRAD:
        s1 = state1[slots] + (g * g).mean(1)
        new_p = p - lr * g / (s1.sqrt() + eps).unsqueeze(1)
    elif optimizer in (ADAM, ADAMW):
        if optimizer == ADAMW:
            p = p * (1.0 - lr * weight_decay)
        m, v = state1[slots], state2[slots]
        s1 = m + (g - m) * (1.0 - beta1)
        s2 = v + (g * g - v) * (1.0 - beta2)
        new_p = p - step_size * (s1 / (s2.sqrt() + eps))
    else:
        raise ValueError(f"unknown optimizer code {optimizer}")
    skipped = torch.zeros(1, dtype=torch.int64, device=values.device)
    if nan_policy != NAN_IGNORE:
        ok = torch.isfinite(new_p.to(values.dtype)).all(1)
        for s in (s1, s2):
            if s is not None:
                ok &= torch.isfinite(s.view(s.shape[0], -1)).all(1)
        skipped += (~ok).sum()
        slots, new_p = slots[ok], new_p[ok]
        s1 = s1[ok] if s1 is not None else None
        s2 = s2[ok] if s2 is not None else None
    values[slots] = new_p.to(values.dtype)
    if s1 is not None:
        state1[slots] = s1
    if s2 is not None:
        state2[slots] = s2
    return skipped


def reference_fused_update(grad_out: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor,
                           row_mask: Tensor, indices: Tensor, offsets: Tensor,
                           per_sample_weights: Optional[Tensor], max_idx: Tensor,
                           frozen: Optional[Tensor], state1: Tensor, state2: Tensor,
                           num_blocks: int, mode: int, padding_idx: int, optimizer: int,
                           lr: float, beta1: float, beta2: float, eps: float,
                           weight_decay: float, step: int, nan_policy: int) -> Tensor:
    """The oracle: per-entry gradients (batch-sized), slot of every (entry, block), stable sort by
    slot, segment sum, then :func:`apply_rows`. Never builds a ``[C, B]`` gradient."""
    B = values.shape[1]
    idx, keep, eg = reference._entry_grads(grad_out, indices, offsets, per_sample_weights,
                                           max_idx, mode, padding_idx)
    slots = reference.resolve_slots(row_ptr, row_slots, row_mask, idx, num_blocks)  # [L, NB]
    ok = (slots >= 0) & keep.unsqueeze(1)
    if frozen is not None:
        ok &= ~frozen.bool()[slots.clamp(min=0)]
    tgt = slots[ok]
    src = eg.view(-1, num_blocks, B)[ok]
    order = torch.sort(tgt, stable=True).indices
    tgt, src = tgt[order], src[order]
    uniq, cnt = torch.unique_consecutive(tgt, return_counts=True)
    if uniq.numel() == 0:
        return torch.zeros(1, dtype=torch.int64, device=values.device)
    g = torch.segment_reduce(src, "sum", lengths=cnt, axis=0)
    return apply_rows(values, state1, state2, uniq, g, optimizer, lr, beta1, beta2, eps,
                      weight_decay, adam_step_size(lr, beta1, beta2, step), nan_policy)


# ------------------------------------------------------------------------------ plan


def touched_rows_plan(indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
                      mode: int, padding_idx: int, num_rows: Optional[int] = None
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Entries grouped by row, the work list of the fused kernels (all batch-sized):

    ``perm int64[L']`` positions in ``indices`` sorted by row (stable: input order inside a
    row; padding entries and entries past ``offsets[-1]`` dropped), ``run_start int64[R+1]``
    (the entries of unique row ``run_rows[r]`` are ``perm[run_start[r]:run_start[r+1]]``),
    ``run_rows int64[R]``, ``bag int64[L]`` (bag of every position) and ``scale fp32[L]`` (weight
    of every position in its bag's sum: per-sample weight, 1/count for mean; empty for max).
    """
    dev = indices.device
    idx = indices.long()
    L = idx.numel()
    off = offsets.long()
    num_bags = off.numel() - 1
    pos = torch.arange(L, device=dev)
    # Bag of each position; entries past offsets[-1] get bag == num_bags and are dropped.
    bag = torch.searchsorted(off[1:], pos, right=True)
    keep = bag < num_bags
    if padding_idx >= 0:
        keep &= idx != padding_idx
    if mode == MODE_MAX:
        scale = torch.empty(0, dtype=torch.float32, device=dev)
    else:
        scale = keep.float()
        if per_sample_weights is not None:
            scale = scale * per_sample_weights.reshape(-1)[:L].float()
        if mode == MODE_MEAN:
            counts = torch.zeros(num_bags + 1, dtype=torch.float32, device=dev)
            counts.index_add_(0, bag, keep.float())
            scale = scale / counts.clamp(min=1.0)[bag]
    # Dropped entries sort last under a key past every row; cut them off after the sort.
    # 32-bit keys when row ids allow: half the radix passes of a 64-bit sort on the GPU.
    top = num_rows if num_rows is not None else (int(idx.max()) + 1 if L else 0)  # no sync if given
    kdt = torch.int32 if top < 2 ** 31 - 1 else torch.int64
    big = torch.iinfo(kdt).max
    key = torch.where(keep, idx, torch.full_like(idx, big)).to(kdt)
    skey, perm = torch.sort(key, stable=True)
    run_rows, counts = torch.unique_consecutive(skey, return_counts=True)
    if run_rows.numel() and int(run_rows[-1]) == big:
        run_rows, counts = run_rows[:-1], counts[:-1]
    run_rows = run_rows.long()
    run_start = torch.zeros(run_rows.numel() + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=run_start[1:])
    return perm, run_start, run_rows, bag, scale


def split_heavy_runs(run_start: Tensor, chunk: int
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Split the plan's runs for the GPU kernels: ``light`` (int64 run ids with at most
    ``chunk`` entries, one program each) and ``heavy`` (the Zipf-hot rest). Each heavy run is cut
    into chunks of ``chunk`` entries, chunk ``c`` covering entries ``[chunk_lo[c], chunk_hi[c])``;
    heavy run ``heavy[h]`` owns chunks ``[chunk_ptr[h], chunk_ptr[h+1])`` (in entry order, so the
    two-level sum stays deterministic)."""
    dev = run_start.device
    counts = run_start[1:] - run_start[:-1]
    is_heavy = counts > chunk
    light = torch.nonzero(~is_heavy).squeeze(1)
    heavy = torch.nonzero(is_heavy).squeeze(1)
    if heavy.numel() == 0:
        e = torch.zeros(0, dtype=torch.int64, device=dev)
        return light, heavy, e, e, torch.zeros(1, dtype=torch.int64, device=dev)
    nch = torch.div(counts[heavy] + chunk - 1, chunk, rounding_mode="floor")
    chunk_ptr = torch.zeros(heavy.numel() + 1, dtype=torch.int64, device=dev)
    torch.cumsum(nch, 0, out=chunk_ptr[1:])
    total = int(chunk_ptr[-1])
    owner = torch.repeat_interleave(torch.arange(heavy.numel(), device=dev), nch,
                                    output_size=total)
    k = torch.arange(total, device=dev) - chunk_ptr[owner]
    run = heavy[owner]
    chunk_lo = run_start[run] + k * chunk
    chunk_hi = torch.minimum(chunk_lo + chunk, run_start[run + 1])
    return light, heavy, chunk_lo, chunk_hi, chunk_ptr


# --------------------------------------------------------------------------- backends


def _cxx_fused_update(grad_out, values, row_ptr, row_slots, row_mask, indices, offsets,
                      per_sample_weights, max_idx, frozen, state1, state2, num_blocks, mode,
                      padding_idx, optimizer, lr, beta1, beta2, eps, weight_decay, step,
                      nan_policy):
    """C++/CUDA kernels (``torch.ops.dsl_C.fused_update_rows``) over the touched-rows plan
    (on CPU built by the C++ counting sort ``dsl_C::fused_plan`` when the build has it)."""
    if values.device.type == "cpu" and _has_cxx_op("dsl_C::fused_plan", "CPU"):
        perm, run_start, run_rows, bag, scale = torch.ops.dsl_C.fused_plan(
            indices, offsets, per_sample_weights, mode, padding_idx, row_mask.shape[0])
    else:
        perm, run_start, run_rows, bag, scale = touched_rows_plan(indices, offsets,
                                                                  per_sample_weights, mode,
                                                                  padding_idx, row_mask.shape[0])
    return torch.ops.dsl_C.fused_update_rows(
        grad_out.contiguous(), values, state1, state2, row_ptr, row_slots, row_mask, perm,
        run_start, run_rows, bag, scale, max_idx, frozen, num_blocks, mode, optimizer, lr, beta1,
        beta2, eps, weight_decay, adam_step_size(lr, beta1, beta2, step), nan_policy)


def _has_cxx_op(name: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
    except Exception:  # the op is not defined at all (extension without this file)
        return False


def _has_cxx_kernel(device_type: str) -> bool:
    """Whether the compiled extension registered ``dsl_C::fused_update_rows`` for the device."""
    return _has_cxx_op("dsl_C::fused_update_rows", "CUDA" if device_type == "cuda" else "CPU")


def fused_impl(backend: str) -> Callable:
    """The ``fused_update`` implementation of ``backend`` (reference when it has none): a
    ``fused_update`` attribute of the backend module, else this file's kernels for it."""
    if backend == "reference":
        return reference_fused_update
    impl = dispatch.get(backend)  # loads the extension / package (None when unavailable)
    fn = getattr(impl, "fused_update", None) if impl is not None else None
    if fn is not None and not isinstance(fn, types.ModuleType):  # (the submodule, once imported)
        return fn
    if backend in ("cpu", "cuda") and impl is not None and _has_cxx_kernel(backend):
        return _cxx_fused_update
    if backend == "cuda" and dispatch._why_not("triton", "cuda") is None:
        backend, impl = "triton", dispatch.get("triton")  # CUDA build without the fused kernel
    if backend == "triton" and impl is not None:
        from .triton.fused_update import fused_update as triton_fused_update

        return triton_fused_update
    return reference_fused_update


@torch.library.custom_op("dsl::fused_update", mutates_args=("values", "state1", "state2"))
def fused_update(grad_out: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor,
                 row_mask: Tensor, indices: Tensor, offsets: Tensor,
                 per_sample_weights: Optional[Tensor], max_idx: Tensor, frozen: Optional[Tensor],
                 state1: Tensor, state2: Tensor, num_blocks: int, mode: int, padding_idx: int,
                 optimizer: int, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, step: int, nan_policy: int, backend: str) -> Tensor:
    """Backward of ``dsl::lookup`` fused with an optimizer step, in place on ``values`` /
    ``state1`` / ``state2``; returns int64[1], the number of slots skipped as non-finite.
    ``step`` is the (already incremented) global step count used by Adam's bias correction."""
    return fused_impl(backend)(grad_out, values, row_ptr, row_slots, row_mask, indices, offsets,
                               per_sample_weights, max_idx, frozen, state1, state2, num_blocks,
                               mode, padding_idx, optimizer, lr, beta1, beta2, eps, weight_decay,
                               step, nan_policy)


@fused_update.register_fake
def _fused_update_fake(grad_out, values, *args):
    return values.new_empty((1,), dtype=torch.int64)


# -------------------------------------------------------------------------- user API


class _FusedLookup(torch.autograd.Function):
    """``dsl::lookup`` forward; backward = ``dsl::fused_update`` (values get no ``.grad``)."""

    @staticmethod
    def forward(ctx, fo, call_id, values, row_ptr, row_slots, row_mask, indices, offsets, psw,
                frozen, num_blocks, mode, padding_idx, deterministic, backend):
        out, max_idx = ops.lookup(values, row_ptr, row_slots, row_mask, indices, offsets, psw,
                                  frozen, num_blocks, mode, padding_idx, deterministic, backend)
        # values is not saved: the backward mutates it, and a saved copy would trip autograd's
        # version check when the pool is looked up twice in one graph.
        ctx.save_for_backward(row_ptr, row_slots, row_mask, indices, offsets, psw, frozen,
                              max_idx)
        ctx.fo, ctx.call_id = fo, call_id
        ctx.args = (num_blocks, mode, padding_idx, backend)
        ctx.mark_non_differentiable(max_idx)
        return out, max_idx

    @staticmethod
    def backward(ctx, grad_out, _grad_max_idx):
        row_ptr, row_slots, row_mask, indices, offsets, psw, frozen, max_idx = ctx.saved_tensors
        num_blocks, mode, padding_idx, backend = ctx.args
        fo: FusedOptimizer = ctx.fo
        module = fo.module
        grad_out = grad_out.contiguous()
        grad_psw = None
        if psw is not None and ctx.needs_input_grad[8]:
            # Uses the values before this step's update, as the unfused path does.
            grad_psw = ops.per_sample_weights_grad(
                grad_out, module.values.detach(), row_ptr, row_slots, row_mask, indices, offsets,
                num_blocks, padding_idx, backend).to(psw.dtype)
        fo._apply(ctx.call_id, grad_out, row_ptr, row_slots, row_mask, indices, offsets, psw,
                  max_idx, frozen, num_blocks, mode, padding_idx, backend)
        return (None, None, None, None, None, None, None, None, grad_psw, None, None, None, None,
                None, None)


class FusedOptimizer:
    """Optimizer fused into the backward of one sparse module (see the module docstring).

    Build it with :func:`fuse_optimizer`. Attributes ``lr``, ``betas``, ``eps``,
    ``weight_decay`` may be changed between steps (e.g. by an lr schedule). Every call of the
    module that runs a backward is one optimizer step (the step count is shared by all the
    table groups of a collection call, so lazy Adam's bias correction matches SparseAdam).
    """

    def __init__(self, name: str = "adam", lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: Optional[float] = None, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, nan_policy: str = "skip"):
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {sorted(NAN_POLICIES)}, got "
                             f"{nan_policy!r}")
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be a non-negative number, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.name, self.code = name, OPTIMIZERS[name]
        self.lr, self.betas = float(lr), (float(betas[0]), float(betas[1]))
        self.eps = _DEFAULT_EPS[self.code] if eps is None else float(eps)
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.weight_decay = float(weight_decay)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.nan_policy = nan_policy
        self.skipped_slots = 0  # non-finite updates skipped so far (read lazily, see below)
        self._skipped: Optional[Tensor] = None
        self._module_ref = None
        self._call_id = 0
        self._last_call = -1
        self._step = 0
        self._hooks = []

    # ------------------------------------------------------------------ wiring
    @property
    def module(self):
        m = self._module_ref() if self._module_ref is not None else None
        if m is None:
            raise RuntimeError("this FusedOptimizer is not attached to a live module")
        return m

    def attach(self, module) -> "FusedOptimizer":
        from .pool import BlockSparseBase

        if not isinstance(module, BlockSparseBase):
            raise TypeError(f"module must be a dsl_kernels sparse module, got "
                            f"{type(module).__name__}")
        if getattr(module, "fused_optimizer", None) is not None:
            raise RuntimeError("module already has a fused optimizer; unfuse_optimizer() first")
        C, B = module.values.shape
        dev = module.values.device
        if self.code in (ADAGRAD, ADAM, ADAMW):
            s1 = torch.full((C, B), self.initial_accumulator_value if self.code == ADAGRAD
                            else 0.0, dtype=torch.float32, device=dev)
        elif self.code == ROWWISE_ADAGRAD:
            s1 = torch.full((C,), self.initial_accumulator_value, dtype=torch.float32, device=dev)
        else:
            s1 = torch.empty(0, dtype=torch.float32, device=dev)
        s2 = (torch.zeros((C, B), dtype=torch.float32, device=dev) if self.code in (ADAM, ADAMW)
              else torch.empty(0, dtype=torch.float32, device=dev))
        module.register_buffer("fused_state1", s1)
        module.register_buffer("fused_state2", s2)
        module.register_buffer("fused_step", torch.zeros((), dtype=torch.int64, device=dev))
        self._module_ref = weakref.ref(module)
        module.fused_optimizer = self
        # The hook pool.BlockSparseBase._lookup consults (its one fused-path line).
        module._fused_lookup = self._lookup
        self._hooks = [
            module.register_forward_pre_hook(self._on_call),
            module.register_load_state_dict_post_hook(self._on_load),
        ]
        return self

    def __getstate__(self):
        # deepcopy / pickle of the module: keep the module strongly in the state (pickle and
        # deepcopy resolve the cycle through their memo), so a copy drives the COPIED module.
        st = self.__dict__.copy()
        st["_module_ref"] = None
        st["_module_strong"] = self._module_ref() if self._module_ref is not None else None
        st["_hooks"] = []
        return st

    def __setstate__(self, st):
        m = st.pop("_module_strong", None)
        self.__dict__.update(st)
        self._module_ref = weakref.ref(m) if m is not None else None

    def detach(self) -> None:
        """Undo :meth:`attach`: the module trains with ``values.grad`` again (state dropped)."""
        module = self.module
        for h in self._hooks:
            h.remove()
        self._hooks = []
        # Hooks copied with the module (deepcopy) have no handle here: remove them by owner.
        for hooks in (module._forward_pre_hooks, module._load_state_dict_post_hooks):
            for k in [k for k, f in hooks.items() if getattr(f, "__self__", None) is self]:
                del hooks[k]
        for name in ("fused_state1", "fused_state2", "fused_step"):
            module._buffers.pop(name, None)
        module.fused_optimizer = None
        module._fused_lookup = None
        self._module_ref = None

    def _on_call(self, module, args):
        self._call_id += 1

    def _on_load(self, module, incompatible_keys):
        self._step = int(module.fused_step)
        self._last_call = self._call_id  # no step increment for a pending call

    def _lookup(self, values, row_ptr, row_slots, row_mask, indices, offsets, psw, frozen,
                num_blocks, mode, padding_idx, deterministic, backend):
        """Drop-in for ``ops.lookup`` whose backward is the fused update."""
        return _FusedLookup.apply(self, self._call_id, values, row_ptr, row_slots, row_mask,
                                  indices, offsets, psw, frozen, num_blocks, mode, padding_idx,
                                  deterministic, backend)

    # ------------------------------------------------------------------ update
    @property
    def step_count(self) -> int:
        return self._step

    def _apply(self, call_id, grad_out, row_ptr, row_slots, row_mask, indices, offsets, psw,
               max_idx, frozen, num_blocks, mode, padding_idx, backend) -> None:
        module = self.module
        if call_id != self._last_call:  # first backward of this module call: one more step
            self._last_call = call_id
            self._step += 1
            module.fused_step.fill_(self._step)
        policy = NAN_POLICIES[self.nan_policy]
        if policy == NAN_RAISE:
            bad = ~torch.isfinite(grad_out).all()
            if psw is not None:
                bad |= ~torch.isfinite(psw).all()
            if bool(bad):
                raise FloatingPointError("non-finite gradient reached the fused optimizer of "
                                         f"{type(module).__name__}; nothing was updated")
        with torch.no_grad():
            skipped = fused_update(grad_out, module.values.detach(), row_ptr, row_slots, row_mask,
                                   indices, offsets, psw, max_idx, frozen, module.fused_state1,
                                   module.fused_state2, num_blocks, mode, padding_idx, self.code,
                                   self.lr, self.betas[0], self.betas[1], self.eps,
                                   self.weight_decay, self._step, policy, backend)
        if policy == NAN_RAISE and int(skipped) > 0:
            raise FloatingPointError(f"{int(skipped)} slot updates were non-finite and skipped "
                                     "(the other touched slots were updated)")
        # Accumulated on device; read on demand (no host sync per step).
        self._skipped = skipped if self._skipped is None else self._skipped + skipped

    def num_skipped(self) -> int:
        """Slots whose update was skipped as non-finite so far (synchronises)."""
        return 0 if self._skipped is None else int(self._skipped.sum())

    @torch.no_grad()
    def reset_state(self, slots: Tensor) -> None:
        """Zero (Adagrad: refill with ``initial_accumulator_value``) the state of ``slots``."""
        module = self.module
        slots = torch.as_tensor(slots, device=module.values.device)
        if slots.dtype == torch.bool:
            slots = torch.nonzero(slots).squeeze(1)
        slots = slots.long()
        init = self.initial_accumulator_value if self.code in (ADAGRAD, ROWWISE_ADAGRAD) else 0.0
        if module.fused_state1.numel():
            module.fused_state1[slots] = init
        if module.fused_state2.numel():
            module.fused_state2[slots] = 0.0

    def state_bytes(self) -> int:
        module = self.module
        return sum(t.numel() * t.element_size()
                   for t in (module.fused_state1, module.fused_state2))

    def __repr__(self) -> str:
        return (f"FusedOptimizer({self.name!r}, lr={self.lr}, betas={self.betas}, eps={self.eps}, "
                f"weight_decay={self.weight_decay}, nan_policy={self.nan_policy!r})")


def fuse_optimizer(module, optimizer: str = "adam", **kwargs) -> FusedOptimizer:
    """Make ``module`` (any dsl_kernels sparse module) train with the fused backward+optimizer.

    Installs the state buffers on the module and returns the :class:`FusedOptimizer` (also at
    ``module.fused_optimizer``). From then on ``loss.backward()`` updates ``module.values`` in
    place; ``values.grad`` stays None, so leave the module's parameters out of any torch
    optimizer. Call it before ``load_state_dict`` when resuming (the state is in the state dict).

    >>> import torch, dsl_kernels
    >>> from dsl_kernels.fused import fuse_optimizer
    >>> emb = dsl_kernels.SparseEmbeddingBag(100, 8, mode="sum", density=0.5, block_size=4)
    >>> fuse_optimizer(emb, "rowwise_adagrad", lr=0.1)
    FusedOptimizer('rowwise_adagrad', lr=0.1, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0, nan_policy='skip')
    >>> emb.fused_state1.shape == (emb.budget,)
    True
    """
    return FusedOptimizer(optimizer, **kwargs).attach(module)


def unfuse_optimizer(module) -> None:
    """Remove the fused optimizer of ``module`` (its state is dropped)."""
    fo = getattr(module, "fused_optimizer", None)
    if fo is not None:
        fo.detach()


def reset_optimizer_state(module, slots: Tensor) -> None:
    """Reset the fused optimizer state of ``slots`` (int indices or a bool mask over the pool) —
    what prune/regrow calls for re-assigned slots. A no-op for modules without a fused optimizer.
    """
    fo = getattr(module, "fused_optimizer", None)
    if fo is not None:
        fo.reset_state(slots)
