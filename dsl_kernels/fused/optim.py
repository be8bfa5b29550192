"""The user API of the fused backward + optimizer: :class:`FusedOptimizer`,
:func:`fuse_optimizer` and friends (the semantics are in :mod:`dsl_kernels.fused`)."""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..format import (ADAGRAD, ADAM, ADAMW, NAN_POLICIES, NAN_RAISE, OPTIMIZERS,
                      ROWWISE_ADAGRAD, SGD)
from ..backends import has_impl, implementation
from ..ops import fill_rows_, fused_update, hooks, per_sample_weights_grad
from ..pool import BlockSparseBase

# eps defaults of the matching torch optimizers (FBGEMM's for row-wise Adagrad).
_DEFAULT_EPS = {SGD: 0.0, ADAGRAD: 1e-10, ROWWISE_ADAGRAD: 1e-8, ADAM: 1e-8, ADAMW: 1e-8}


class FusedOptimizer:
    """Optimizer fused into the backward of one sparse module (see the module docstring).

    Build it with :func:`fuse_optimizer`. Attributes ``lr``, ``betas``, ``eps``,
    ``weight_decay`` may be changed between steps (e.g. by an lr schedule), or use FBGEMM's
    :meth:`set_learning_rate` / :meth:`split_optimizer_states`. The backward that follows one
    or more calls of the module is one optimizer step (the step count is shared by all the
    lookups it back-propagates, e.g. the table groups of a collection call, so lazy Adam's bias
    correction matches SparseAdam).
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
        # Per-slot state follows the pool's slots (compaction, checkpoint resize); an empty
        # placeholder (SGD has no state) is a plain buffer.
        for name, t in (("fused_state1", s1), ("fused_state2", s2)):
            if t.numel():
                module.register_slot_buffer(name, t)
            else:
                module.register_buffer(name, t)
        module.register_buffer("fused_step", torch.zeros((), dtype=torch.int64, device=dev))
        self._module_ref = weakref.ref(module)
        # BlockSparseBase._lookup sees it and runs dsl::fused_lookup with this id, whose backward
        # reaches step_from_backward through dsl::fused_step_ (an opaque op: compile-safe).
        self.hook_id = hooks.register(self)
        module.fused_optimizer = self
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
        self.hook_id = hooks.register(self)  # a copy is another optimizer

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
            module.unregister_slot_buffer(name)
        module.fused_optimizer = None
        self._module_ref = None

    def _on_call(self, module, args):
        self._call_id += 1

    def _on_load(self, module, incompatible_keys):
        self._step = int(module.fused_step)
        self._last_call = self._call_id  # no step increment for a pending call

    def with_plan(self, backend: str, values: Tensor, mode: int) -> bool:
        """Whether ``backend`` emits the backward's plan in the forward for this pool and mode
        (the ``fused_lookup`` registry op, cpu sum/mean today)."""
        if not (has_impl(backend, "fused_lookup") and has_impl(backend, "fused_apply")):
            return False
        supports = getattr(implementation(backend, "fused_lookup"), "supports", None)
        return supports is None or bool(supports(values, mode))

    # ------------------------------------------------------------------ update
    @property
    def step_count(self) -> int:
        return self._step

    def step_from_backward(self, values: Tensor, grad_out: Tensor, row_ptr: Tensor,
                           row_slots: Tensor, row_mask: Tensor, indices: Tensor,
                           offsets: Tensor, psw: Optional[Tensor], max_idx: Tensor,
                           frozen: Optional[Tensor], plan: Tensor, plan_scale: Tensor,
                           num_blocks: int, mode: int, padding_idx: int, psw_grad: bool,
                           backend: str) -> Tensor:
        """One optimizer step from the backward of a lookup (called by ``dsl::fused_step_``):
        updates ``values`` and the state in place; returns the fp32 gradient of ``psw`` (empty
        unless ``psw_grad``), formed from the values before the update as the unfused path
        does. The first backward after a module call counts one step (shared by the table
        groups of a collection call, so lazy Adam's bias correction matches SparseAdam)."""
        module = self.module
        grad_psw = grad_out.new_empty((0,), dtype=torch.float32)
        if psw_grad:
            grad_psw = per_sample_weights_grad(grad_out, values.detach(), row_ptr, row_slots,
                                               row_mask, indices, offsets, num_blocks,
                                               padding_idx, backend)
        if self._call_id != self._last_call:
            self._last_call = self._call_id
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
            v = values.detach()
            if self.with_plan(backend, v, mode):  # the forward's decision, made again
                skipped = implementation(backend, "fused_apply")(
                    grad_out, v, module.fused_state1, module.fused_state2, plan, plan_scale,
                    self.code, self.lr, self.betas[0], self.betas[1], self.eps,
                    self.weight_decay, self._step, policy)
            else:
                skipped = fused_update(grad_out, v, row_ptr, row_slots, row_mask, indices,
                                       offsets, psw, max_idx, frozen, module.fused_state1,
                                       module.fused_state2, num_blocks, mode, padding_idx,
                                       self.code, self.lr, self.betas[0], self.betas[1],
                                       self.eps, self.weight_decay, self._step, policy, backend)
        if policy == NAN_RAISE and int(skipped) > 0:
            raise FloatingPointError(f"{int(skipped)} slot updates were non-finite and skipped "
                                     "(the other touched slots were updated)")
        # Accumulated on device; read on demand (no host sync per step).
        self._skipped = skipped if self._skipped is None else self._skipped + skipped
        return grad_psw

    def set_learning_rate(self, lr: float) -> None:
        """FBGEMM's spelling of ``self.lr = lr`` (checked)."""
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be a non-negative number, got {lr!r}")
        self.lr = float(lr)

    def get_learning_rate(self) -> float:
        return self.lr

    def split_optimizer_states(self) -> Tuple[Tensor, ...]:
        """The per-slot state tensors (as FBGEMM's method of that name; one pool, so one
        entry per state, rows = slots): Adagrad ``(sum,)``, row-wise Adagrad ``(sum[C],)``,
        Adam/AdamW ``(exp_avg, exp_avg_sq)``, SGD ``()``."""
        module = self.module
        return tuple(t for t in (module.fused_state1, module.fused_state2) if t.numel())

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
        # dsl::fill_rows_ (cpu: rows prefetched ahead; reference: index_fill_), not index_put.
        backend = module.backend_for()
        if module.fused_state1.numel():
            fill_rows_(module.fused_state1, slots, init, backend)
        if module.fused_state2.numel():
            fill_rows_(module.fused_state2, slots, 0.0, backend)

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
