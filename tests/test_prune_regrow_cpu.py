"""``dsl::prune_regrow_`` on the cpu backend (csrc/cpu/prune_regrow.cpp) against the brute-force
oracle of test_sparsity_ops.py and the reference backend: same slots, same grown keys, same
tie rules; bad input raises naming the argument and writes nothing; nothing is written
outside the pool."""
import pytest
import torch

import dsl_kernels
from dsl_kernels.backends.reference.prune_regrow import prune_regrow_reference
from dsl_kernels.sparsity import prune_regrow_
from test_sparsity_ops import brute_force, random_pool

pytestmark = pytest.mark.skipif(
    not dsl_kernels.backends.has_impl("cpu", "prune_regrow_"),
    reason="the C++ extension (with csrc/cpu/prune_regrow.cpp) is not built")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("subset", [False, True])
def test_matches_brute_force(seed, subset):
    N, NB, B, C = 13, 5, 3, 30
    values, coord, row_mask = random_pool(N, NB, B, C, seed, ties=seed % 2 == 1)
    g = torch.Generator().manual_seed(100 + seed)
    cand_keys = torch.randint(0, N * NB, (25,), generator=g)
    cand_scores = torch.randint(0, 4, (25,), generator=g).float()  # many ties
    cand_scores[0] = float("nan")
    cand_keys[1] = cand_keys[2]  # duplicate key
    if seed == 2:
        values[3, 0] = float("nan")  # a corrupt block is pruned first
    prune_slots = torch.arange(0, C, 2) if subset else None
    exp_slots, exp_grown = brute_force(values, coord, cand_keys, cand_scores, 7, prune_slots)
    c0 = coord.clone()
    slots, pruned = prune_regrow_(values, coord, row_mask, cand_keys, cand_scores, 7, NB,
                                  prune_slots, "cpu")
    assert slots.tolist() == exp_slots
    assert pruned.tolist() == c0[slots].tolist()
    assert coord[slots].tolist() == exp_grown
    assert torch.all(values[slots] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["unique", "duplicates", "subset", "all"])
def test_matches_reference_on_a_pool(dtype, kind):
    torch.manual_seed(0)
    emb = dsl_kernels.SparseEmbeddingBag(2000, 64, mode="sum", density=0.1, block_size=8,
                                         backend="cpu", dtype=dtype)
    with torch.no_grad():
        emb.values.normal_()
        emb.values[3, 0] = float("nan")
    NB, C = emb.num_blocks, emb.budget
    M = 3000
    keys = (torch.randint(0, 2000 * NB, (M,)) if kind == "duplicates"
            else torch.randperm(2000 * NB)[:M].sort().values)
    scores = torch.randn(M).to(dtype)
    scores[::9] = float("inf")  # non-finite scores are never grown
    ps = torch.randperm(C)[:C // 2] if kind == "subset" else None
    k = 10 * C if kind == "all" else C // 10
    outs = []
    for fn in (prune_regrow_reference, torch.ops.dsl_C.prune_regrow_):
        v, c = emb.values.detach().clone(), emb.coord.clone()
        c[::13] = -1  # some free slots: never pruned
        outs.append((*fn(v, c, emb.row_mask, keys, scores, k, NB, ps), v, c))
    for a, b in zip(*outs):
        assert torch.equal(a.nan_to_num(5.0), b.nan_to_num(5.0))


def test_bad_input_names_the_argument_and_writes_nothing():
    values, coord, row_mask = random_pool(13, 5, 3, 30, 0)
    v0, c0 = values.clone(), coord.clone()
    op = torch.ops.dsl_C.prune_regrow_
    keys, scores = torch.tensor([1, 5, 7]), torch.tensor([0.3, 0.2, 0.9])
    with pytest.raises(IndexError, match=r"cand_keys\[1\]"):
        op(values, coord, row_mask, torch.tensor([1, 13 * 5, 7]), scores, 2, 5, None)
    with pytest.raises(IndexError, match=r"prune_slots\[0\]"):
        op(values, coord, row_mask, keys, scores, 2, 5, torch.tensor([30]))
    with pytest.raises(RuntimeError, match="same length"):
        op(values, coord, row_mask, keys, scores[:2], 2, 5, None)
    with pytest.raises(RuntimeError, match="k must be"):
        op(values, coord, row_mask, keys, scores, -1, 5, None)
    with pytest.raises(RuntimeError, match="coord must be"):
        op(values, coord.int(), row_mask, keys, scores, 2, 5, None)
    with pytest.raises(RuntimeError, match="row_mask must be"):
        op(values, coord, row_mask.int(), keys, scores, 2, 5, None)
    with pytest.raises(RuntimeError, match="cand_scores must be floating"):
        op(values, coord, row_mask, keys, keys, 2, 5, None)
    assert torch.equal(values, v0) and torch.equal(coord, c0)


def test_no_write_outside_the_pool():
    values, coord, row_mask = random_pool(13, 5, 3, 30, 1)
    vbuf = torch.full((38, 3), 7.0)
    cbuf = torch.full((38,), -5, dtype=torch.int64)
    vbuf[4:34], cbuf[4:34] = values, coord
    v, c = vbuf[4:34], cbuf[4:34]
    slots, _ = torch.ops.dsl_C.prune_regrow_(v, c, row_mask, torch.arange(13 * 5),
                                             torch.rand(13 * 5), 30, 5, None)
    assert slots.numel() > 0
    assert (vbuf[:4] == 7).all() and (vbuf[34:] == 7).all()
    assert (cbuf[:4] == -5).all() and (cbuf[34:] == -5).all()


def _error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("bad", ["narrow_column", "padding_row", "none"])
def test_table_check_in_the_kernel_matches_the_python_check(bad):
    """The cpu kernel checks the table layout in its pass over the keys (the op skips the Python
    check for it): the same ValueError text as the reference backend's Python check, raised
    before anything is written; valid candidates give identical pools."""
    from dsl_kernels import SparseEmbeddingBagCollection, TableConfig

    ebc = SparseEmbeddingBagCollection(
        [TableConfig("wide", 300, 16), TableConfig("narrow", 200, 8)],
        density=0.3, block_size=4, backend="cpu", mask_init="random")  # NB 4 and 2; pool NB 4
    layout = ebc.table_layout()
    layout[1, 3] = 300 + 5  # a padding row in the narrow table
    NB = ebc.num_blocks
    rows = torch.arange(500).repeat_interleave(NB)
    cols = torch.arange(NB).repeat(500)
    keys = rows * NB + cols
    ok = (rows < 300) | ((cols < 2) & (rows != 300 + 5))
    keys = keys[ok]
    if bad == "narrow_column":
        keys = torch.cat([keys, torch.tensor([(300 + 17) * NB + 3])])  # narrow row, column 3
    elif bad == "padding_row":
        keys = torch.cat([keys, torch.tensor([(300 + 5) * NB + 1])])
    keys = keys.sort().values
    scores = torch.rand(keys.numel())
    outs, errors = [], []
    for backend in ("reference", "cpu"):
        v, c = ebc.values.detach().clone(), ebc.coord.clone()
        res = []
        errors.append(_error(lambda: res.append(prune_regrow_(
            v, c, ebc.row_mask, keys, scores, 200, NB, None, backend, layout))))
        outs.append((v, c, res))
    if bad == "none":
        assert errors == [None, None]
        (v0, c0, r0), (v1, c1, r1) = outs
        assert torch.equal(v0, v1) and torch.equal(c0, c1)
        assert all(torch.equal(a, b) for a, b in zip(r0[0], r1[0]))
    else:
        assert errors[0] is not None and errors[0] == errors[1], errors
        assert "outside table 1" in errors[0]
        for v, c, _ in outs:  # nothing written
            assert torch.equal(v, ebc.values.detach()) and torch.equal(c, ebc.coord)
