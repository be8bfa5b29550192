"""Stale-embedding skipping (Slipstream, arXiv 2404.04270) on the slot pool.

Every ``window`` steps the tracker

1. measures, for the hot slots snapshotted at the previous check, the relative change
   ``||v_now - v_snap|| / (||v_snap|| + eps)`` over the window;
2. picks a threshold by sampling those changes (access-weighted) so that the frozen slots would
   have received ``target_skip`` of the window's slot updates, optionally capped by
   ``max_change``;
3. freezes the hot slots that changed less than the threshold (``module.frozen``) for
   ``freeze_windows`` windows; slots frozen for that long are unfrozen (re-checked): they train
   for a window, are measured again and stay unfrozen if they drift;
4. snapshots the hottest (most looked-up) unfrozen slots for the next window.

What "frozen" means: the backward op skips the slot (``lookup_backward``'s ``frozen`` mask — the
saved scatter work), and the scheduler holds the slot's values AND optimizer-state rows across
``optimizer.step()`` (snapshot in a step pre-hook, restore in a post-hook), so neither momentum
nor weight decay moves it: a frozen slot is exactly as if its updates were skipped. Stock torch
optimizers still sweep all ``C`` rows, so the optimizer-step time is not saved there (a fused
update kernel that honours ``frozen`` would save it).

Memory: an access counter ``int32[C]`` and a snapshot of at most ``hot_fraction * C`` slots.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from ..format import resolve_slots
from ..pool import BlockSparseBase, LookupRecord


class StaleTracker:
    """Per-pool stale-slot detection; see the module docstring."""

    def __init__(self, module: BlockSparseBase, target_skip: float = 0.2,
                 hot_fraction: float = 0.1, freeze_windows: int = 1,
                 max_change: Optional[float] = None, sample_size: int = 4096,
                 eps: float = 1e-12) -> None:
        self.module = module
        self.target_skip = target_skip
        self.hot_fraction = hot_fraction
        self.freeze_windows = freeze_windows
        self.max_change = max_change
        self.sample_size = sample_size
        self.eps = eps
        C = module.budget
        dev = module.coord.device
        self.counts = torch.zeros(C, dtype=torch.int32, device=dev)
        self.snap_slots = torch.empty(0, dtype=torch.int64, device=dev)
        self.snap_values = module.values.detach().new_empty((0, module.block_size))
        self.age = torch.zeros(0, dtype=torch.int64, device=dev)  # windows each frozen slot sat
        self.frozen_slots = torch.empty(0, dtype=torch.int64, device=dev)
        self.threshold = float("nan")
        # Slot updates seen (lookups of active slots) and of those on frozen slots, all windows
        # and this window: Python ints, plus what the backward added on the device since the
        # last read (int64 [2]: touches, skipped), so observing never reads back to the host.
        self._touches = self._skipped = self._window_touches = self._window_skipped = 0
        self._pending: Optional[Tensor] = None
        self.checks = 0

    def _flush(self) -> None:
        if self._pending is not None:
            n, nf = self._pending.tolist()
            self._pending = None
            self._touches += n
            self._skipped += nf
            self._window_touches += n
            self._window_skipped += nf

    def _counter(name: str):  # noqa: N805  (a property factory used in the class body)
        def get(self) -> int:
            self._flush()
            return getattr(self, name)

        def put(self, value: int) -> None:
            self._flush()
            setattr(self, name, int(value))

        return property(get, put)

    touches = _counter("_touches")
    skipped = _counter("_skipped")
    window_touches = _counter("_window_touches")
    window_skipped = _counter("_window_skipped")
    del _counter

    # ------------------------------------------------------------------ observe
    @torch.no_grad()
    def observe(self, rec: LookupRecord) -> None:
        """Count the slot updates of a backward: every lookup of a row updates each active
        block of the row (padding entries excluded). Batch-sized ``[L, NB]`` work with fixed
        shapes, accumulated on the device: no host synchronisation per backward."""
        m = self.module
        idx = rec.indices.long()
        L = idx.numel()
        if L == 0:
            return
        # Fixed shapes only ([L] and [L, NB]): no data-dependent size, nothing read back.
        keep = (idx >= 0) & (idx < m.num_rows)
        if rec.offsets.numel():  # entries past offsets[-1] belong to no bag
            keep &= torch.arange(L, device=idx.device) < rec.offsets[-1]
        if rec.padding_idx >= 0:
            keep &= idx != rec.padding_idx
        slots = resolve_slots(m.row_ptr, m.row_slots, m.row_mask, idx.clamp(0, m.num_rows - 1),
                              rec.num_blocks)
        hit = (slots >= 0) & keep.unsqueeze(1)
        slots = slots.clamp(min=0)
        self.counts.index_add_(0, slots.view(-1), hit.view(-1).to(torch.int32))
        n = hit.sum()
        nf = (hit & m.frozen[slots]).sum() if m.frozen is not None else torch.zeros_like(n)
        seen = torch.stack([n, nf])
        self._pending = seen if self._pending is None else self._pending + seen

    # ------------------------------------------------------------------ check
    @torch.no_grad()
    def check(self, generator: torch.Generator) -> Dict[str, float]:
        """End of a window: measure, pick the threshold, freeze/unfreeze, snapshot."""
        m = self.module
        C = m.budget
        v = m.values.detach()
        dev = v.device
        self.checks += 1
        # 1. relative change of the slots snapshotted at the last check.
        changed = torch.empty(0, device=dev)
        if self.snap_slots.numel():
            now = v[self.snap_slots].float()
            before = self.snap_values.float()
            changed = (now - before).norm(dim=1) / (before.norm(dim=1) + self.eps)
            changed = torch.where(torch.isfinite(changed), changed,
                                  torch.full_like(changed, float("inf")))
        # 2. threshold by access-weighted sampling.
        total = float(self.counts.sum())
        new_frozen = torch.empty(0, dtype=torch.int64, device=dev)
        if changed.numel() and total > 0 and self.target_skip > 0:
            w = self.counts[self.snap_slots].double()
            n = changed.numel()
            if n > self.sample_size:
                pick = torch.randperm(n, generator=generator)[: self.sample_size].to(dev)
                cs, ws, scale = changed[pick], w[pick], n / self.sample_size
            else:
                cs, ws, scale = changed, w, 1.0
            order = torch.sort(cs, stable=True).indices
            cum = torch.cumsum(ws[order], 0) * scale
            reach = torch.nonzero(cum >= self.target_skip * total)
            i = int(reach[0]) if reach.numel() else order.numel() - 1
            thr = float(cs[order[i]])
            if self.max_change is not None:
                thr = min(thr, self.max_change)
            self.threshold = thr
            new_frozen = self.snap_slots[changed <= thr]
        # 3. frozen set: slots frozen for fewer than freeze_windows windows stay; others are
        # unfrozen (re-checked); the newly stale join with age 0.
        stay = self.age + 1 < self.freeze_windows
        keep_slots = self.frozen_slots[stay]
        keep_age = self.age[stay] + 1
        slots = torch.cat([keep_slots, new_frozen])
        age = torch.cat([keep_age, torch.zeros_like(new_frozen)])
        self._set_frozen(slots, age)
        # 4. snapshot the hottest unfrozen slots for the next window.
        cnt = self.counts.clone()
        if m.frozen is not None:
            cnt[m.frozen] = 0
        n_hot = min(int((cnt > 0).sum()), max(1, int(self.hot_fraction * C)))
        if n_hot:
            hot = torch.topk(cnt, n_hot, sorted=False).indices
            self.snap_slots = torch.sort(hot).values
        else:
            self.snap_slots = torch.empty(0, dtype=torch.int64, device=dev)
        self.snap_values = v[self.snap_slots].clone()
        out = {"threshold": self.threshold, "frozen": int(self.frozen_slots.numel()),
               "window_skip_ratio": self.window_skipped / max(1, self.window_touches)}
        self.counts.zero_()
        self.window_touches = self.window_skipped = 0
        return out

    def _set_frozen(self, slots: Tensor, age: Tensor) -> None:
        m = self.module
        order = torch.sort(slots).indices
        self.frozen_slots, self.age = slots[order], age[order]
        if self.frozen_slots.numel():
            fr = torch.zeros(m.budget, dtype=torch.bool, device=m.coord.device)
            fr[self.frozen_slots] = True
            m.frozen = fr
        else:
            m.frozen = None

    # ------------------------------------------------------------------ mask changes
    def on_reassign(self, slots: Tensor) -> None:
        """Slots handed to new blocks: unfrozen, forgotten by the snapshot and the counter."""
        if slots.numel() == 0:
            return
        gone = torch.isin(self.frozen_slots, slots)
        if bool(gone.any()):
            self._set_frozen(self.frozen_slots[~gone], self.age[~gone])
        keep = ~torch.isin(self.snap_slots, slots)
        self.snap_slots, self.snap_values = self.snap_slots[keep], self.snap_values[keep]
        self.counts[slots] = 0

    def on_compact(self, keep: Tensor) -> None:
        """The pool shrank to ``keep``: renumber everything (slot i of the new pool is keep[i])."""
        C_new = keep.numel()
        new_of_old = torch.full((self.counts.numel(),), -1, dtype=torch.int64,
                                device=keep.device)
        new_of_old[keep] = torch.arange(C_new, device=keep.device)
        self.counts = self.counts[keep]
        ns = new_of_old[self.snap_slots]
        self.snap_slots, self.snap_values = ns[ns >= 0], self.snap_values[ns >= 0]
        nf = new_of_old[self.frozen_slots]
        self.frozen_slots, self.age = nf[nf >= 0], self.age[nf >= 0]
        # compaction already shrank module.frozen consistently with keep.

    # ------------------------------------------------------------------ hold frozen slots
    def hold(self, optimizers: List[torch.optim.Optimizer]):
        """Snapshot of the frozen slots' values and optimizer-state rows (before a step)."""
        from .prune_regrow import row_state_tensors

        s = self.frozen_slots
        if s.numel() == 0:
            return None
        p = self.module.values
        saved = [(p.data, p.data[s].clone())]
        for opt in optimizers:
            for t in row_state_tensors(opt, p).values():
                saved.append((t, t[s].clone()))
        return saved

    @torch.no_grad()
    def restore(self, saved) -> None:
        if saved is None:
            return
        s = self.frozen_slots
        for t, rows in saved:
            t[s] = rows

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"counts": self.counts.clone(), "snap_slots": self.snap_slots.clone(),
                "snap_values": self.snap_values.clone(), "age": self.age.clone(),
                "frozen_slots": self.frozen_slots.clone(), "threshold": self.threshold,
                "touches": self.touches, "skipped": self.skipped,
                "window_touches": self.window_touches, "window_skipped": self.window_skipped,
                "checks": self.checks}

    def load_state_dict(self, sd: dict) -> None:
        dev = self.module.coord.device
        self.counts = sd["counts"].to(dev).clone()
        self.snap_slots = sd["snap_slots"].to(dev).clone()
        self.snap_values = sd["snap_values"].to(dev).clone()
        for k in ("threshold", "touches", "skipped", "window_touches", "window_skipped",
                  "checks"):
            setattr(self, k, sd[k])
        self._set_frozen(sd["frozen_slots"].to(dev).clone(), sd["age"].to(dev).clone())
