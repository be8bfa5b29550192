"""``dsl::update_index_``: the row index brought up to date in place after a mask update equals
``rebuild_index(coord)`` bit for bit (cpu kernel and reference), whatever moved where; bad input
raises naming the argument and leaves the index untouched; nothing is written outside the
index tensors."""
import pytest
import torch

import dsl_kernels
from dsl_kernels import ops
from dsl_kernels.backends.reference.rebuild_index import rebuild_index as rebuild_ref
from dsl_kernels.backends.reference.prune_regrow import prune_regrow_reference

BACKENDS = ["reference"] + (["cpu"] if dsl_kernels.backends.has_impl("cpu", "update_index_")
                            else [])


def _pool(N: int, NB: int, C: int, active: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    coord = torch.full((C,), -1, dtype=torch.int64)
    pos = torch.randperm(C, generator=g)[:active]
    coord[pos] = torch.randperm(N * NB, generator=g)[:active]
    return coord


def _change(coord: torch.Tensor, N: int, NB: int, n: int, seed: int, kind: str):
    """Slots to change, their old keys, and coord rewritten (in place)."""
    g = torch.Generator().manual_seed(seed)
    C = coord.numel()
    slots = torch.randperm(C, generator=g)[:n]
    if kind == "ascending":
        slots = slots.sort().values
    old = coord[slots].clone()
    held = set(coord.tolist())
    free = [key for key in torch.randperm(N * NB, generator=g).tolist() if key not in held]
    new = torch.tensor(free[:n], dtype=torch.int64)
    if kind == "ascending":
        new = new.sort().values
    elif kind == "mixed":  # some slots freed, some blocks moved between changed slots
        new[: n // 4] = -1
        active_old = old[old >= 0]
        m = min(n // 4, active_old.numel())
        new[n // 4: n // 4 + m] = active_old[torch.randperm(active_old.numel(), generator=g)[:m]]
    coord[slots] = new
    return slots, old


def _index(coord, N, NB):
    return [t.clone() for t in rebuild_ref(coord, N, NB)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,NB,C,active", [(50, 8, 100, 80), (40, 3, 120, 60), (30, 70, 400, 350),
                                            (200, 8, 160, 160), (1, 8, 8, 5)])
@pytest.mark.parametrize("kind", ["ascending", "random", "mixed"])
@pytest.mark.parametrize("seed", range(3))
def test_matches_a_full_rebuild(backend, N, NB, C, active, kind, seed):
    coord = _pool(N, NB, C, active, seed)
    rp, rs, rm = _index(coord, N, NB)
    n = max(1, min(active, N * NB - active) // 2)
    slots, old = _change(coord, N, NB, n, seed + 7, kind)
    ops.update_index_(rp, rs, rm, coord, slots, old, NB, backend)
    for got, exp in zip((rp, rs, rm), rebuild_ref(coord, N, NB)):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_shifts(backend):
    """All grown blocks in the first rows, all pruned ones in the last: every row_slots segment
    between them moves by up to k places (the in-place sweep's right-to-left chains)."""
    N, NB = 400, 8
    coord = torch.arange(0, N * NB, 4, dtype=torch.int64)  # every row holds columns 0 and 4
    rp, rs, rm = _index(coord, N, NB)
    tail = torch.nonzero(coord >= (N - 30) * NB).squeeze(1)   # 60 blocks of the last 30 rows
    old = coord[tail].clone()
    coord[tail] = torch.tensor([r * NB + c for r in range(10) for c in (1, 2, 3, 5, 6, 7)])
    ops.update_index_(rp, rs, rm, coord, tail, old, NB, backend)
    for got, exp in zip((rp, rs, rm), rebuild_ref(coord, N, NB)):
        assert torch.equal(got, exp)
    # ... and back: every segment moves left.
    back = coord[tail].clone()
    coord[tail] = old
    ops.update_index_(rp, rs, rm, coord, tail, back, NB, backend)
    for got, exp in zip((rp, rs, rm), rebuild_ref(coord, N, NB)):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_after_prune_regrow(backend):
    torch.manual_seed(0)
    emb = dsl_kernels.SparseEmbeddingBag(3000, 64, mode="sum", density=0.1, block_size=8,
                                         backend="reference", mask_init="random")
    NB = emb.num_blocks
    keys = torch.randperm(3000 * NB)[:5000].sort().values
    with torch.no_grad():
        slots, pruned = prune_regrow_reference(emb.values, emb.coord, emb.row_mask, keys,
                                               torch.rand(keys.numel()), 400, NB, None)
    rp, rs, rm = emb.row_ptr.clone(), emb.row_slots.clone(), emb.row_mask.clone()
    ops.update_index_(rp, rs, rm, emb.coord, slots, pruned, NB, backend)
    for got, exp in zip((rp, rs, rm), rebuild_ref(emb.coord, 3000, NB)):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument_and_writes_nothing(backend):
    N, NB, C = 20, 8, 40
    coord = _pool(N, NB, C, 30, 0)
    idx = _index(coord, N, NB)
    before = [t.clone() for t in idx]
    act = torch.nonzero(coord >= 0).squeeze(1)
    free_slot = int(torch.nonzero(coord < 0)[0])
    held = set(coord.tolist())
    inactive = next(k for k in range(N * NB) if k not in held)

    def call(slots, old, new=None):
        c = coord.clone()
        if new is not None:
            c[slots] = new
        ops.update_index_(*idx, c, slots, old, NB, backend)

    s = act[:2]
    with pytest.raises(IndexError, match="slots"):
        call(torch.tensor([C]), torch.tensor([-1]))
    with pytest.raises(ValueError, match="twice"):
        call(torch.tensor([int(s[0]), int(s[0])]), coord[[int(s[0])] * 2], torch.tensor([-1, -1]))
    with pytest.raises(ValueError, match="old_keys|not active"):  # old key not active
        call(torch.tensor([free_slot]), torch.tensor([inactive]), torch.tensor([-1]))
    with pytest.raises(ValueError, match="already holds"):  # new key held by an unchanged slot
        call(s[:1], coord[s[:1]], coord[act[5:6]])
    with pytest.raises(IndexError, match="old_keys|coord"):
        call(s[:1], torch.tensor([N * NB]), torch.tensor([-1]))
    for got, exp in zip(idx, before):
        assert torch.equal(got, exp)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_no_write_outside_the_index():
    N, NB, C = 60, 8, 120
    coord = _pool(N, NB, C, 100, 3)
    rp, rs, rm = rebuild_ref(coord, N, NB)
    bufs = [torch.full((t.numel() + 16,), 77, dtype=t.dtype) for t in (rp, rs, rm)]
    views = []
    for b, t in zip(bufs, (rp, rs, rm)):
        b[8:8 + t.numel()] = t.reshape(-1)
        views.append(b[8:8 + t.numel()].view(t.shape))
    slots, old = _change(coord, N, NB, 40, 4, "mixed")
    ops.update_index_(*views, coord, slots, old, NB, "cpu")
    for b, t, exp in zip(bufs, views, rebuild_ref(coord, N, NB)):
        assert torch.equal(t, exp)
        assert (b[:8] == 77).all() and (b[-8:] == 77).all()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("grow", ["gradient", "random"])
@pytest.mark.parametrize("distribution", ["global", "per_table"])
def test_scheduler_updates_match_the_reference_backend(grow, distribution):
    """Whole mask updates (prune_regrow_ + in-place index update on cpu, full rebuild on the
    reference backend): identical pools, indices and optimizer state after several updates."""
    from dsl_kernels import SparseEmbeddingBagCollection, TableConfig
    from dsl_kernels.sparsity import DSLScheduler

    runs = []
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        ebc = SparseEmbeddingBagCollection(
            [TableConfig("a", 300, 32), TableConfig("b", 200, 16)], density=0.2, block_size=4,
            backend=backend, mask_init="random")
        opt = torch.optim.Adam(ebc.parameters(), lr=0.01)
        sched = DSLScheduler(ebc, opt, update_every=2, prune_fraction=0.3, stop_at=100,
                             grow=grow, distribution=distribution, score_window=2)
        g = torch.Generator().manual_seed(1)
        for _ in range(8):
            batch = {"a": torch.randint(0, 300, (32, 4), generator=g),
                     "b": torch.randint(0, 200, (32, 4), generator=g)}
            opt.zero_grad()
            sum(v.pow(2).sum() for v in ebc(batch).values()).backward()
            opt.step()
            sched.step()
        assert sched.stats()["moved_blocks"] > 0
        runs.append((ebc, opt))
    (a, oa), (b, ob) = runs
    for name in ("values", "coord", "row_ptr", "row_slots", "row_mask"):
        assert torch.equal(getattr(a, name).detach(), getattr(b, name).detach()), name
    sa, sb = oa.state[a.values], ob.state[b.values]
    assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq"))
