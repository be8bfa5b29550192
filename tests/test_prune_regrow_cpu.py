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
