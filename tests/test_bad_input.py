"""Every bad input raises a clear ValueError / IndexError / TypeError naming the argument, on
every backend, and changes nothing: values, coord, the derived index and the optimizer state are
bit-identical afterwards. Unusual-but-valid inputs (non-contiguous, zero-size) give the
``F.embedding_bag`` answer.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import backend_device_params
from dsl_kernels import SparseEmbedding, SparseEmbeddingBag, SparseEmbeddingBagCollection, TableConfig

PARAMS = backend_device_params()
N, D = 30, 8


def _i(*v, dtype=torch.int64, device="cpu"):
    return torch.tensor(v, dtype=dtype, device=device)


def _setup(backend, device, mode="sum", **kw):
    torch.manual_seed(0)
    emb = SparseEmbeddingBag(N, D, mode=mode, density=0.4, block_size=2, backend=backend,
                             device=device, **kw)
    opt = torch.optim.Adam(emb.parameters(), lr=0.1)
    # One real step, so there is optimizer state to protect.
    emb(_i(1, 2, 3, 4, device=device), _i(0, 2, device=device)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    return emb, opt


def _state(emb, opt):
    st = [emb.values.detach().clone(), emb.coord.clone(), emb.row_ptr.clone(),
          emb.row_slots.clone(), emb.row_mask.clone()]
    for s in opt.state.values():
        st += [v.clone() for v in s.values() if torch.is_tensor(v)]
    return st


def _unchanged(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


def _bad_calls(dev):
    """(id, mode, kwargs of the module, call args, expected error, regex naming the argument)."""
    i = lambda *v, **k: _i(*v, device=dev, **k)  # noqa: E731
    meta = torch.device("meta")  # stand-in for "another device" that exists everywhere
    return [
        ("index_out_of_range", "sum", {}, (i(1, N), i(0, 1)), IndexError, "input.*out of range"),
        ("index_negative", "sum", {}, (i(1, -1), i(0, 1)), IndexError, "input.*negative"),
        ("index_negative_int32", "sum", {},
         (i(-3, 1, dtype=torch.int32), i(0, 1, dtype=torch.int32)), IndexError, "negative"),
        ("offsets_not_from_0", "sum", {}, (i(1, 2, 3), i(1, 2)), ValueError, "offsets.*start at 0"),
        ("offsets_decreasing", "sum", {}, (i(1, 2, 3, 4), i(0, 3, 1)), ValueError,
         "offsets.*non-decreasing"),
        ("offsets_past_end", "sum", {}, (i(1, 2, 3), i(0, 5)), ValueError, "offsets.*past the end"),
        ("offsets_past_end_ilo", "sum", {"include_last_offset": True}, (i(1, 2, 3), i(0, 1, 9)),
         ValueError, "offsets.*past the end"),
        ("float_indices", "sum", {}, (torch.tensor([1.0, 2.0], device=dev), i(0, 1)), TypeError,
         "input must be int32 or int64"),
        ("bool_indices", "sum", {}, (torch.tensor([True], device=dev), i(0)), TypeError, "input"),
        ("index_offset_dtype_mismatch", "sum", {}, (i(1, 2), i(0, 1, dtype=torch.int32)),
         TypeError, "offsets dtype"),
        ("float_offsets", "sum", {}, (i(1, 2), torch.tensor([0.0, 1.0], device=dev)), TypeError,
         "offsets must be int32 or int64"),
        ("offsets_2d", "sum", {}, (i(1, 2), i(0, 1).view(1, 2)), ValueError, "offsets must be 1-D"),
        ("offsets_missing", "sum", {}, (i(1, 2),), ValueError, "offsets is required"),
        ("offsets_not_tensor", "sum", {}, (i(1, 2), [0, 1]), TypeError, "offsets must be a Tensor"),
        ("offsets_with_2d_input", "sum", {}, (i(1, 2, 3, 4).view(2, 2), i(0, 1)), ValueError,
         "offsets must be None"),
        ("ilo_empty_offsets", "sum", {"include_last_offset": True},
         (i(1, 2), torch.zeros(0, dtype=torch.int64, device=dev)), ValueError, "offsets"),
        ("input_3d", "sum", {}, (torch.zeros(2, 2, 2, dtype=torch.int64, device=dev),),
         ValueError, "input must be 1-D.*3-D"),
        ("input_0d", "sum", {}, (torch.tensor(1, device=dev), None), ValueError, "input must be"),
        ("input_not_tensor", "sum", {}, ([1, 2], i(0, 1)), TypeError, "input must be a Tensor"),
        ("psw_wrong_shape", "sum", {}, (i(1, 2, 3), i(0, 1), torch.ones(2, device=dev)),
         ValueError, "per_sample_weights must have the shape"),
        ("psw_mode_mean", "mean", {}, (i(1, 2, 3), i(0, 1), torch.ones(3, device=dev)),
         ValueError, "per_sample_weights.*mode='sum'"),
        ("psw_mode_max", "max", {}, (i(1, 2, 3), i(0, 1), torch.ones(3, device=dev)),
         ValueError, "per_sample_weights.*mode='sum'"),
        ("psw_integer", "sum", {}, (i(1, 2, 3), i(0, 1), i(1, 1, 1)), TypeError,
         "per_sample_weights must be floating"),
        ("input_wrong_device", "sum", {},
         (torch.zeros(3, dtype=torch.int64, device=meta), i(0, 1)), ValueError, "input is on meta"),
        ("offsets_wrong_device", "sum", {},
         (i(1, 2, 3), torch.zeros(2, dtype=torch.int64, device=meta)), ValueError,
         "offsets is on meta"),
        ("psw_wrong_device", "sum", {}, (i(1, 2, 3), i(0, 1), torch.ones(3, device=meta)),
         ValueError, "per_sample_weights is on meta"),
    ]


CASE_IDS = [c[0] for c in _bad_calls("cpu")]


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_forward_input_raises_and_changes_nothing(backend, device, case):
    _, mode, kw, args, exc, match = next(c for c in _bad_calls(device) if c[0] == case)
    emb, opt = _setup(backend, device, mode=mode, **kw)
    before = _state(emb, opt)
    with pytest.raises(exc, match=match):
        emb(*args)
    _unchanged(before, _state(emb, opt))
    # The module still works afterwards and a step still changes it (nothing is stuck).
    emb(_i(1, 2, device=device), _i(0, 1, device=device)).sum().backward()
    opt.step()


@pytest.mark.parametrize("backend,device", PARAMS)
def test_other_device_cpu_tensor_on_cuda_table(backend, device):
    if device != "cuda":
        pytest.skip("needs a CUDA table (the meta-device cases cover CPU tables)")
    emb, opt = _setup(backend, device)
    before = _state(emb, opt)
    with pytest.raises(ValueError, match="input is on cpu"):
        emb(_i(1, 2), _i(0, 1))
    _unchanged(before, _state(emb, opt))


# ------------------------------------------------------------------------ constructor


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(density=0.0), ValueError, "density"),
    (dict(density=-0.1), ValueError, "density"),
    (dict(density=1.5), ValueError, "density"),
    (dict(density=float("nan")), ValueError, "density"),
    (dict(density="0.1"), ValueError, "density"),
    (dict(block_size=3), ValueError, "block_size"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(block_size=16), ValueError, "block_size"),
    (dict(num_embeddings=0), ValueError, "num_embeddings"),
    (dict(num_embeddings=-5), ValueError, "num_embeddings"),
    (dict(num_embeddings=3.5), ValueError, "num_embeddings"),
    (dict(embedding_dim=0), ValueError, "embedding_dim"),
    (dict(padding_idx=N), ValueError, "padding_idx"),
    (dict(padding_idx=-N - 1), ValueError, "padding_idx"),
    (dict(mode="median"), ValueError, "mode"),
    (dict(dtype=torch.int64), TypeError, "dtype"),
    (dict(dtype=torch.float64), TypeError, "dtype"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_constructor_args(kwargs, exc, match):
    args = dict(num_embeddings=N, embedding_dim=D, density=0.5, block_size=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        SparseEmbeddingBag(**args)


def test_bad_collection_args():
    with pytest.raises(ValueError, match="at least one table"):
        SparseEmbeddingBagCollection([])
    with pytest.raises(ValueError, match="unique"):
        SparseEmbeddingBagCollection([TableConfig("a", 5, 4), TableConfig("a", 6, 4)],
                                     block_size=2)
    with pytest.raises(ValueError, match="block_size"):
        SparseEmbeddingBagCollection([TableConfig("a", 5, 4), TableConfig("b", 6, 6)],
                                     block_size=4)
    with pytest.raises(ValueError, match="density"):
        SparseEmbeddingBagCollection([TableConfig("a", 5, 4, density=2.0)], block_size=2)
    with pytest.raises(ValueError, match="output"):
        SparseEmbeddingBagCollection([TableConfig("a", 5, 4)], block_size=2, output="list")


@pytest.mark.parametrize("backend,device", PARAMS)
def test_bad_collection_input_changes_nothing(backend, device):
    torch.manual_seed(0)
    ebc = SparseEmbeddingBagCollection([TableConfig("a", 20, 4), TableConfig("b", 10, 4)],
                                       density=0.5, block_size=2, backend=backend, device=device)
    opt = torch.optim.Adam(ebc.parameters())
    out = ebc({"a": (_i(1, 2, device=device), _i(0, 1, device=device)),
               "b": (_i(3, device=device), _i(0, device=device))})
    (out["a"].sum() + out["b"].sum()).backward()
    opt.step()
    before = _state(ebc, opt)
    good_a = (_i(1, 2, device=device), _i(0, 1, device=device))
    with pytest.raises(IndexError, match="table 'b'.*out of range"):
        ebc({"a": good_a, "b": (_i(10, device=device), _i(0, device=device))})
    with pytest.raises(KeyError, match="unknown tables"):
        ebc({"a": good_a, "zz": good_a})
    with pytest.raises(TypeError, match="features"):
        ebc([good_a])
    with pytest.raises(ValueError, match="lengths"):
        ebc.forward_jagged(["a", "b"], _i(1, 2, 3, device=device), _i(1, 1, 1, device=device))
    with pytest.raises(ValueError, match="lengths sum"):
        ebc.forward_jagged(["a", "b"], _i(1, 2, 3, device=device), _i(1, 1, device=device))
    with pytest.raises(ValueError, match="non-negative"):
        ebc.forward_jagged(["a", "b"], _i(1, device=device), _i(2, -1, device=device))
    _unchanged(before, _state(ebc, opt))


# --------------------------------------------------------- unusual but valid input


def _ref(emb, idx, off, psw=None, mode="sum", ilo=False):
    dense = emb.to_dense().float()
    return F.embedding_bag(idx.long(), dense, None if off is None else off.long(), mode=mode,
                           per_sample_weights=None if psw is None else psw.float(),
                           include_last_offset=ilo, padding_idx=emb.padding_idx)


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_non_contiguous_inputs(backend, device, mode):
    emb, _ = _setup(backend, device, mode=mode)
    big = torch.randint(0, N, (24,), generator=torch.Generator().manual_seed(1)).to(device)
    idx = big[::2]  # stride 2
    assert not idx.is_contiguous()
    off = _i(0, 0, 2, 3, 3, 4, 6, device=device)  # 7 bags over 12 indices, empty ones included
    off_nc = torch.stack([off, off], dim=1)[:, 0]  # stride 2
    assert not off_nc.is_contiguous()
    psw = None
    if mode == "sum":
        psw = torch.rand(24, device=device)[::2]
        assert not psw.is_contiguous()
    out = emb(idx, off_nc, psw)
    ref = _ref(emb, idx, off_nc, psw, mode)
    torch.testing.assert_close(out.float(), ref, atol=1e-5, rtol=1e-5)
    two_d = big.view(6, 4).t()  # non-contiguous 2-D input: 4 bags of 6
    assert not two_d.is_contiguous()
    torch.testing.assert_close(emb(two_d).float(), _ref(emb, two_d, None, None, mode),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_zero_size_inputs(backend, device, mode):
    emb, opt = _setup(backend, device, mode=mode)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    cases = [
        (empty, empty),  # no bags at all
        (empty, _i(0, 0, 0, device=device)),  # three empty bags
        (_i(1, 2, device=device), empty),  # no bags: torch ignores the input
        (torch.zeros(0, 4, dtype=torch.int64, device=device), None),  # 2-D, no bags
    ]
    for idx, off in cases:
        before = _state(emb, opt)
        out = emb(idx, off)
        if off is not None and off.numel() == 0:
            # Zero bags. (F.embedding_bag itself segfaults here in max mode with a non-empty
            # input, torch 2.13, so the oracle is written out.)
            ref = torch.zeros(0, D, device=device)
        else:
            ref = _ref(emb, idx, off, None, mode)
        torch.testing.assert_close(out.float(), ref)
        out.sum().backward()  # gradient of nothing: zeros, no crash
        assert not bool(emb.values.grad.any())
        emb.values.grad = None
        _unchanged(before, _state(emb, opt))
    # Fixed-size bags of length 0 (torch itself fails here): empty bags read as zeros.
    out = emb(torch.zeros(3, 0, dtype=torch.int64, device=device))
    assert out.shape == (3, D) and not bool(out.any())


@pytest.mark.parametrize("backend,device", PARAMS)
def test_sparse_embedding_bad_input(backend, device):
    emb = SparseEmbedding(N, D, density=0.5, block_size=2, backend=backend, device=device)
    before = emb.values.detach().clone()
    with pytest.raises(IndexError, match="out of range"):
        emb(_i(1, N, device=device).view(1, 2))
    with pytest.raises(TypeError, match="input"):
        emb(torch.ones(2, 2, device=device))
    assert torch.equal(emb.values.detach(), before)
    assert emb(torch.zeros(0, 3, dtype=torch.int64, device=device)).shape == (0, 3, D)
