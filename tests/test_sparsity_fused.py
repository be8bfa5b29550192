"""The sparsity engine on pools trained by the fused backward+optimizer (dsl_kernels.fused):
no torch optimizer, module-held state reset / compacted / resized, frozen slots skipped by the
fused update itself."""
import io

import pytest
import torch

from dsl_kernels import SparseEmbeddingBag, SparseEmbeddingBagCollection, TableConfig

fused = pytest.importorskip("dsl_kernels.fused")
from dsl_kernels.sparsity import DSLScheduler, load_checkpoint  # noqa: E402


def _emb(density=0.3, seed=0):
    torch.manual_seed(seed)
    return SparseEmbeddingBag(60, 8, mode="sum", density=density, block_size=2,
                              backend="reference")


def _step(emb, sched, g):
    emb(torch.randint(0, 60, (16, 3), generator=g)).pow(2).sum().backward()
    sched.step()


def test_fused_adam_state_of_reassigned_slots_reset():
    emb = _emb()
    fused.fuse_optimizer(emb, "adam", lr=0.05)
    sched = DSLScheduler(emb, None, update_every=3, prune_fraction=0.5, stop_at=100,
                         score_window=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        _step(emb, sched, g)
    s1, s2, c0 = emb.fused_state1.clone(), emb.fused_state2.clone(), emb.coord.clone()
    emb(torch.randint(0, 60, (16, 3), generator=g)).pow(2).sum().backward()
    s1b, s2b = emb.fused_state1.clone(), emb.fused_state2.clone()  # after the 3rd fused step
    sched.step()  # the update
    moved = torch.nonzero(emb.coord != c0).squeeze(1)
    assert moved.numel() > 0 and emb.num_active_blocks == emb.budget
    assert torch.all(emb.fused_state1[moved] == 0) and torch.all(emb.fused_state2[moved] == 0)
    keep = torch.ones(emb.budget, dtype=torch.bool)
    keep[moved] = False
    assert torch.equal(emb.fused_state1[keep], s1b[keep])
    assert torch.equal(emb.fused_state2[keep], s2b[keep])
    assert (s1[moved] != 0).any() or (s1b[moved] != 0).any()


def test_fused_dense_to_sparse_shrinks_state_and_resumes_bit_exactly():
    cfg = dict(update_every=2, schedule="dense_to_sparse", t_start=0, t_end=8,
               target_density=0.25, adapt_every=3, score_window=2)

    def build(seed):
        emb = _emb(density=1.0, seed=seed)
        fused.fuse_optimizer(emb, "adagrad", lr=0.1, initial_accumulator_value=0.1)
        return emb, DSLScheduler(emb, None, **cfg)

    def run(emb, sched, a, b):
        for step in range(a, b):
            g = torch.Generator().manual_seed(step)
            _step(emb, sched, g)

    emb, sched = build(0)
    run(emb, sched, 0, 14)
    assert emb.budget == 60 * 4 // 4 and emb.fused_state1.shape[0] == emb.budget
    assert sched.stats()["moved_blocks"] > 0

    emb1, sched1 = build(0)
    run(emb1, sched1, 0, 5)
    buf = io.BytesIO()
    torch.save({"model": emb1.state_dict(), "optimizer": None,
                "scheduler": sched1.state_dict()}, buf)
    buf.seek(0)
    emb2, sched2 = build(7)
    load_checkpoint(torch.load(buf, weights_only=False), emb2, None, sched2)
    run(emb2, sched2, 5, 14)
    assert torch.equal(emb.coord, emb2.coord) and torch.equal(emb.values, emb2.values)
    assert torch.equal(emb.fused_state1, emb2.fused_state1)


def test_fused_update_skips_frozen_slots():
    emb = _emb(density=1.0)
    fused.fuse_optimizer(emb, "adam", lr=0.1)
    sched = DSLScheduler(emb, None, update_every=10 ** 6, stop_at=10 ** 6, skip_stale=True,
                         stale_window=10 ** 6)
    idx = torch.arange(60).view(-1, 1)
    emb(idx).pow(2).sum().backward()
    sched.step()
    frozen = torch.tensor([1, 4, 9])
    sched.pools[0].tracker._set_frozen(frozen, torch.zeros(3, dtype=torch.int64))
    v0, s0 = emb.values.detach().clone(), emb.fused_state1.clone()
    emb(idx).pow(2).sum().backward()
    sched.step()
    assert torch.equal(emb.values[frozen], v0[frozen])
    assert torch.equal(emb.fused_state1[frozen], s0[frozen])
    others = torch.ones(emb.budget, dtype=torch.bool)
    others[frozen] = False
    assert not torch.equal(emb.values[others], v0[others])
    assert sched.stats()["skipped_update_ratio"] > 0


def test_collection_with_fused_and_torch_optimizer_for_dense_params():
    torch.manual_seed(0)
    # 2 of 4 blocks per row: keep_rows (the default) leaves one of them prunable.
    ebc = SparseEmbeddingBagCollection([TableConfig("a", 40, 8), TableConfig("b", 40, 8)],
                                       density=0.5, block_size=2, backend="reference")
    fused.fuse_optimizer(ebc, "sgd", lr=0.5)
    head = torch.nn.Linear(8, 1)
    opt = torch.optim.Adam(head.parameters(), lr=0.01)  # does not hold ebc.values: fine
    sched = DSLScheduler(ebc, opt, update_every=2, prune_fraction=0.5, stop_at=50)
    for _ in range(8):
        out = ebc({"a": torch.randint(0, 40, (8, 2)), "b": torch.randint(0, 40, (8, 2))})
        (head(out["a"]).sum() - out["b"].sum()).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert ebc.num_active_blocks == ebc.budget and sched.stats()["moved_blocks"] > 0
