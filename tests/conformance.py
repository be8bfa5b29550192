"""The conformance check every backend must pass: a module on backend X equals
``F.embedding_bag`` on its ``to_dense()`` image, forward and backward.

Used by ``test_conformance.py`` (all backends over the full grid) and by backend-specific test
files (reduced grids where a backend is slow, e.g. Triton under the interpreter).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from dsl_kernels import SparseEmbeddingBag

# (atol, rtol) of the forward output and of values.grad, per value dtype. The oracle is
# F.embedding_bag on the fp32 image (the kernels accumulate in fp32 and round once at the end).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

MODES = ("sum", "mean", "max")
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)


def full_grid():
    """Every combination of mode x psw x include_last_offset x padding x 1-D/2-D x index dtype x
    value dtype (psw only with sum; include_last_offset only with 1-D)."""
    for mode, psw, ilo, pad, two_d, idt, vdt in itertools.product(
            MODES, (False, True), (False, True), (False, True), (False, True), INDEX_DTYPES,
            VALUE_DTYPES):
        if psw and mode != "sum":
            continue
        if ilo and two_d:
            continue
        yield dict(mode=mode, psw=psw, include_last_offset=ilo, padding=pad, two_d=two_d,
                   index_dtype=idt, value_dtype=vdt)


def make_batch(N, num_bags, gen, two_d, padding_idx, device, index_dtype, bag_len=4):
    """Bags with empty bags, repeated indices and padding entries mixed in."""
    if two_d:
        idx = torch.randint(0, N, (num_bags, bag_len), generator=gen)
        idx[0, 1] = idx[0, 0]  # repeated index within a bag
        if padding_idx is not None:
            idx[1::3, 0] = padding_idx
            idx[2] = padding_idx  # a bag of padding only
        return idx.to(device=device, dtype=index_dtype), None
    lengths = torch.randint(0, 2 * bag_len, (num_bags,), generator=gen)
    lengths[0] = 0  # empty bags at the start, middle and end
    lengths[num_bags // 2] = 0
    lengths[-1] = 0
    L = int(lengths.sum())
    idx = torch.randint(0, N, (L,), generator=gen)
    if L > 3:
        idx[1] = idx[0]
        idx[3] = idx[0]
    if padding_idx is not None and L:
        idx[::5] = padding_idx
    offsets = torch.zeros(num_bags, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)[:-1]
    return idx.to(device=device, dtype=index_dtype), offsets.to(device=device, dtype=index_dtype)


def check_case(backend, device, mode, psw, include_last_offset, padding, two_d, index_dtype,
               value_dtype, N=40, D=16, block_size=4, density=0.3, num_bags=9, seed=0,
               deterministic=False):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    padding_idx = 5 if padding else None
    emb = SparseEmbeddingBag(N, D, mode=mode, density=density, block_size=block_size,
                             padding_idx=padding_idx, include_last_offset=include_last_offset,
                             dtype=value_dtype, device=device, backend=backend,
                             deterministic=deterministic)
    idx, offsets = make_batch(N, num_bags, gen, two_d, padding_idx, device, index_dtype)
    ref_offsets = offsets
    if include_last_offset and offsets is not None:
        end = torch.tensor([idx.numel()], dtype=offsets.dtype, device=device)
        offsets = torch.cat([offsets, end])
        ref_offsets = offsets
    w = None
    if psw:
        w = torch.randn(idx.shape, generator=gen).to(device=device, dtype=value_dtype)
        w.requires_grad_(True)
    out = emb(idx, offsets, w)
    assert out.dtype == value_dtype, (out.dtype, value_dtype)

    dense = emb.to_dense().float().detach().requires_grad_(True)
    w_ref = None if w is None else w.detach().float().requires_grad_(True)
    ref = F.embedding_bag(idx.long(), dense, None if ref_offsets is None else ref_offsets.long(),
                          mode=mode, per_sample_weights=w_ref,
                          include_last_offset=include_last_offset, padding_idx=padding_idx)
    atol, rtol = TOL[value_dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)

    g = torch.randn(out.shape, generator=gen).to(device=device, dtype=value_dtype)
    out.backward(g)
    ref.backward(g.float())
    # The gradient of every active block sits in its slot; nothing else is stored.
    coord = emb.coord
    act = coord >= 0
    dense_blocks = dense.grad.view(-1, block_size)
    expect = torch.zeros_like(emb.values, dtype=torch.float32)
    expect[act] = dense_blocks[coord[act]]
    torch.testing.assert_close(emb.values.grad.float(), expect, atol=atol * 4, rtol=rtol * 4)
    if padding_idx is not None:
        pad_slots = (coord // emb.num_blocks) == padding_idx
        assert not bool(emb.values.grad[pad_slots & act].any())
    if w is not None:
        torch.testing.assert_close(w.grad.float(), w_ref.grad, atol=atol * 8, rtol=rtol * 8)
    return emb
