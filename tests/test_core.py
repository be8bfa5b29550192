"""Core module behaviour on the reference backend: format invariants, from_dense, state_dict,
optimizer steps, SparseEmbedding, the collection, op registration."""
import pytest
import torch
import torch.nn.functional as F

import dsl_kernels
from dsl_kernels import (SparseEmbedding, SparseEmbeddingBag, SparseEmbeddingBagCollection,
                         TableConfig)
from dsl_kernels import reference as R


def _rows_cols(emb):
    c = emb.coord[emb.coord >= 0]
    return c // emb.num_blocks, c % emb.num_blocks


@pytest.mark.parametrize("N,D,B,density", [(100, 16, 4, 0.1), (37, 64, 1, 0.05), (10, 8, 8, 0.5),
                                           (50, 32, 4, 0.9), (20, 16, 2, 1.0)])
def test_initial_mask_even_and_distinct(N, D, B, density):
    emb = SparseEmbeddingBag(N, D, density=density, block_size=B, padding_idx=3)
    nb = D // B
    assert emb.budget == max(1, round(density * N * nb))
    rows, cols = _rows_cols(emb)
    keys = rows * nb + cols
    assert keys.unique().numel() == keys.numel()  # no block twice
    per_row = torch.bincount(rows, minlength=N)
    assert per_row[3] == 0  # padding row holds nothing
    others = torch.cat([per_row[:3], per_row[4:]])
    assert int(others.max()) - int(others.min()) <= 1  # spread evenly
    assert bool((cols < nb).all())


def test_budget_invariant():
    for N, D, B, d in [(1000, 64, 8, 0.1), (333, 48, 3, 0.07), (10, 4, 1, 1.0)]:
        emb = SparseEmbeddingBag(N, D, density=d, block_size=B)
        n_params = sum(p.numel() for p in emb.parameters())
        assert n_params <= d * N * D + B
        assert [n for n, _ in emb.named_parameters()] == ["values"]


def test_index_matches_coord():
    emb = SparseEmbeddingBag(200, 32, density=0.2, block_size=4)
    rows = torch.arange(200)
    slots = R.resolve_slots(emb.row_ptr, emb.row_slots, emb.row_mask, rows, emb.num_blocks)
    got = torch.full((emb.budget,), -1, dtype=torch.int64)
    r, j = torch.nonzero(slots >= 0, as_tuple=True)
    got[slots[r, j]] = r * emb.num_blocks + j
    assert torch.equal(got, emb.coord)
    assert int(emb.row_ptr[-1]) == emb.num_active_blocks
    assert R.popcount64(emb.row_mask).sum() == emb.num_active_blocks


def test_popcount64_edge_words():
    x = torch.tensor([0, -1, 1, -(2 ** 63), 2 ** 63 - 1, 0x5555555555555555, 12345678901234])
    want = [bin(v & (2 ** 64 - 1)).count("1") for v in x.tolist()]
    assert R.popcount64(x).tolist() == want


def test_from_dense_keeps_largest_blocks():
    torch.manual_seed(0)
    w = torch.randn(30, 12)
    emb = SparseEmbeddingBag.from_dense(w, density=0.2, block_size=3, mode="sum")
    norms = w.view(-1, 3).norm(dim=1)
    k = round(0.2 * 30 * 4)
    assert emb.num_active_blocks == k
    kept = set(emb.coord.tolist())
    assert kept == set(torch.topk(norms, k).indices.tolist())
    dense = emb.to_dense()
    mask = torch.zeros(30 * 4, dtype=torch.bool)
    mask[list(kept)] = True
    assert torch.equal(dense.view(-1, 3)[mask], w.view(-1, 3)[mask])
    assert not dense.view(-1, 3)[~mask].any()


def test_state_dict_roundtrip_and_mismatch():
    a = SparseEmbeddingBag(100, 16, density=0.2, block_size=4)
    b = SparseEmbeddingBag(100, 16, density=0.2, block_size=4)
    assert set(a.state_dict()) == {"values", "coord"}
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.to_dense(), b.to_dense())
    for t in ("row_ptr", "row_slots", "row_mask"):
        assert torch.equal(getattr(a, t), getattr(b, t)), t  # index rebuilt on load
    idx = torch.randint(0, 100, (4, 5))
    assert torch.equal(a(idx), b(idx))
    c = SparseEmbeddingBag(100, 16, density=0.3, block_size=4)
    before = c.to_dense().clone()
    with pytest.raises(ValueError, match="budget"):
        c.load_state_dict(a.state_dict())
    assert torch.equal(c.to_dense(), before)
    bad = a.state_dict()
    bad["coord"] = bad["coord"].clone()
    bad["coord"][1] = bad["coord"][0]
    with pytest.raises(ValueError, match="twice"):
        b.load_state_dict(bad)


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adagrad", "adamw"])
def test_optimizer_step_equals_masked_dense_step(opt_name):
    torch.manual_seed(0)
    emb = SparseEmbeddingBag(60, 16, mode="sum", density=0.25, block_size=4)
    dense = torch.nn.Parameter(emb.to_dense().clone())
    mask = emb.to_dense() != 0
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            "adam": lambda p: torch.optim.Adam(p, lr=0.05),
            "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.0)}[opt_name]
    o1, o2 = make(emb.parameters()), make([dense])
    for step in range(3):
        idx = torch.randint(0, 60, (8, 3))
        target = torch.randn(8, 16)
        for model_out, opt in ((emb(idx), o1), (F.embedding_bag(idx, dense, mode="sum"), o2)):
            opt.zero_grad()
            F.mse_loss(model_out, target).backward()
            if opt is o2:
                dense.grad *= mask  # the dense step restricted to active entries
            opt.step()
        torch.testing.assert_close(emb.to_dense(), dense.detach() * mask, atol=1e-6, rtol=1e-5)


def test_sparse_embedding_matches_embedding():
    torch.manual_seed(0)
    emb = SparseEmbedding(50, 8, density=0.5, block_size=2, padding_idx=0)
    x = torch.randint(0, 50, (3, 4, 5))
    x[0, 0, 0] = 0
    out = emb(x)
    w = emb.to_dense().requires_grad_()
    ref = F.embedding(x, w, padding_idx=0)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    act = emb.coord >= 0
    torch.testing.assert_close(emb.values.grad[act], w.grad.view(-1, 2)[emb.coord[act]])


def _ebc():
    return SparseEmbeddingBagCollection(
        [TableConfig("a", 30, 8, "sum"), TableConfig("b", 50, 8, "sum"),
         TableConfig("c", 20, 16, "mean"), TableConfig("d", 40, 8, "max", density=0.5)],
        density=0.3, block_size=4)


def test_collection_matches_per_table_embedding_bag():
    torch.manual_seed(0)
    ebc = _ebc()
    assert ebc.budget == sum(round(d * n * nb) for d, n, nb in
                             [(0.3, 30, 2), (0.3, 50, 2), (0.3, 20, 4), (0.5, 40, 2)])
    feats = {}
    for t in ebc.tables:
        idx = torch.randint(0, t.num_rows, (11,))
        feats[t.name] = (idx, torch.tensor([0, 3, 3, 7]))
    out = ebc(feats)
    for t in ebc.tables:
        ref = F.embedding_bag(feats[t.name][0], ebc.to_dense(t.name), feats[t.name][1], mode=t.mode)
        torch.testing.assert_close(out[t.name], ref)
    sum(o.sum() for o in out.values()).backward()
    assert ebc.values.grad is not None


def test_collection_jagged_and_concat():
    torch.manual_seed(0)
    ebc = SparseEmbeddingBagCollection([TableConfig("u", 30, 8), TableConfig("i", 60, 8)],
                                       density=0.4, block_size=4, output="concat")
    lengths = torch.tensor([1, 0, 2, 3, 1, 1])  # key-major: u has bags [1,0,2], i has [3,1,1]
    values = torch.cat([torch.randint(0, 30, (3,)), torch.randint(0, 60, (5,))])
    out = ebc.forward_jagged(["u", "i"], values, lengths)
    assert out.shape == (3, 16)
    ref_u = F.embedding_bag(values[:3], ebc.to_dense("u"), torch.tensor([0, 1, 1]), mode="sum")
    ref_i = F.embedding_bag(values[3:], ebc.to_dense("i"), torch.tensor([0, 3, 4]), mode="sum")
    torch.testing.assert_close(out, torch.cat([ref_u, ref_i], 1))


def test_collection_bad_table_name():
    with pytest.raises(KeyError, match="unknown tables"):
        _ebc()({"zzz": (torch.tensor([1]), torch.tensor([0]))})


def test_opcheck_reference_ops():
    torch.manual_seed(0)
    emb = SparseEmbeddingBag(40, 16, mode="sum", density=0.3, block_size=4)
    idx = torch.randint(0, 40, (12,))
    off = torch.tensor([0, 4, 4, 9, 12])
    psw = torch.randn(12)
    for mode in (0, 1, 2):
        w = psw if mode == 0 else None
        args = (emb.values, emb.row_ptr, emb.row_slots, emb.row_mask, idx, off, w, None, 4,
                mode, -1, False, "reference")
        torch.library.opcheck(torch.ops.dsl.lookup.default, args)
        _, max_idx = torch.ops.dsl.lookup(*args)
        g = torch.randn(4, 16)
        torch.library.opcheck(torch.ops.dsl.lookup_backward.default,
                              (g, emb.values.detach(), emb.row_ptr, emb.row_slots, emb.row_mask,
                               idx, off, w, max_idx, None, 4, mode, -1, False, "reference"))
    torch.library.opcheck(torch.ops.dsl.rebuild_index.default, (emb.coord, 40, 4, "reference"))


def test_grow_scores_reference_matches_dense_gradient():
    torch.manual_seed(0)
    emb = SparseEmbeddingBag(30, 12, mode="sum", density=0.3, block_size=3)
    idx = torch.randint(0, 30, (20,))
    off = torch.tensor([0, 5, 12, 20])  # CSR: num_bags + 1 entries
    g = torch.randn(3, 12)
    rows, scores = torch.ops.dsl.grow_scores(g, emb.row_ptr, emb.row_slots, emb.row_mask, idx,
                                             off, None, torch.empty(0, dtype=torch.int64), 4, 0,
                                             -1, "reference")
    w = torch.zeros(30, 12, requires_grad=True)
    F.embedding_bag(idx, w, off[:-1], mode="sum").backward(g)
    dense_norm = w.grad.view(30, 4, 3).norm(dim=2)
    active = emb.to_dense().view(30, 4, 3).ne(0).any(2)
    assert torch.equal(rows, idx.unique())
    torch.testing.assert_close(scores, dense_norm[rows].masked_fill(active[rows], 0))


def test_memory_bytes_counts_what_is_held():
    emb = SparseEmbeddingBag(1000, 64, density=0.1, block_size=8)
    expect = (emb.values.numel() * 4 + emb.coord.numel() * 8 + emb.row_ptr.numel() * 4
              + emb.row_slots.numel() * 4 + emb.row_mask.numel() * 8)
    assert emb.memory_bytes() == expect
    assert emb.memory_bytes() < 0.2 * 1000 * 64 * 4


def test_backends_report():
    rep = dsl_kernels.backends()
    assert rep["reference"]["cpu"] is None
    assert set(rep) == {"reference", "cpu", "cuda", "triton"}
    with pytest.raises(ValueError, match="backend"):
        SparseEmbeddingBag(10, 8, backend="nope")(torch.tensor([[1]]))


def test_a_registered_backend_runs_its_ops_and_falls_back_to_reference(monkeypatch):
    """The registry's extension point: a backend registers the ops it has; the rest run the
    reference; `backends()` and a bad name say why."""
    import dsl_kernels
    from dsl_kernels.backends import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    calls = []
    ref_lookup = registry.implementation("reference", "lookup")

    def counting_lookup(*args):
        calls.append("lookup")
        return ref_lookup(*args)

    dsl_kernels.register_backend("mine", lambda: None, ("cpu",))
    dsl_kernels.register_impl("mine", "lookup")(counting_lookup)
    emb = dsl_kernels.SparseEmbeddingBag(20, 8, mode="sum", density=0.5, block_size=4,
                                         backend="mine")
    ref = dsl_kernels.SparseEmbeddingBag(20, 8, mode="sum", density=0.5, block_size=4,
                                         backend="reference")
    ref.load_state_dict(emb.state_dict())
    idx, off = torch.tensor([1, 2, 3]), torch.tensor([0, 2])
    emb(idx, off).sum().backward()  # lookup_backward: reference fallback
    ref(idx, off).sum().backward()
    assert calls == ["lookup"]
    assert torch.equal(emb.values.grad, ref.values.grad)
    assert dsl_kernels.backends()["mine"] == {"cpu": None,
                                              "cuda": "backend 'mine' does not run on cuda tensors"}
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        dsl_kernels.SparseEmbeddingBag(20, 8, density=0.5, block_size=4, backend="nope")(idx, off)
    with pytest.raises(ValueError, match="unknown op"):
        dsl_kernels.register_impl("mine", "not_an_op")
