"""No step of forward + backward + optimizer builds anything of dense [N, D] size."""
import pytest
import torch

from conftest import available_backends
from dsl_kernels import SparseEmbeddingBag, SparseEmbeddingBagCollection, TableConfig
from dsl_kernels.fused import fuse_optimizer
from memcheck import assert_sparse_sized, largest_allocation

N, D = 200_000, 64


def test_memcheck_sees_a_dense_allocation():
    # The checker itself must be able to fail.
    got, _ = largest_allocation(lambda: torch.zeros(N, D).add_(1))
    assert got >= N * D * 4


@pytest.mark.parametrize("fused", [False, True], ids=["adam", "fused-adam"])
@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_train_step_never_allocates_dense(backend, mode, fused):
    """Forward + backward + optimizer (torch Adam, or the fused update inside the backward) on
    every backend, Triton included (interpreter: a small batch)."""
    torch.manual_seed(0)
    emb = SparseEmbeddingBag(N, D, mode=mode, density=0.05, block_size=8, backend=backend)
    if fused:
        fuse_optimizer(emb, "adam", lr=1e-3)
        opt = None
    else:
        opt = torch.optim.Adam(emb.parameters(), lr=1e-3)
    idx = torch.randint(0, N, (16, 4) if backend == "triton" else (1024, 20))

    def step():
        if opt is not None:
            opt.zero_grad()
        emb(idx).square().mean().backward()
        if opt is not None:
            opt.step()

    step()  # optimizer state is created at the budget on the first step
    assert_sparse_sized(step, pool_bytes=emb.values.numel() * 4, batch_bytes=idx.numel() * D * 4,
                        dense_bytes=N * D * 4)


def test_construction_and_from_scratch_mask_never_dense():
    # At block_size 1 the largest legitimate tensor is coord (int64, one per slot).
    budget = int(round(0.05 * N * D))
    assert_sparse_sized(lambda: SparseEmbeddingBag(N, D, density=0.05, block_size=1),
                        pool_bytes=budget * 8, batch_bytes=0, dense_bytes=N * D * 4)


def test_collection_step_never_dense():
    ebc = SparseEmbeddingBagCollection([TableConfig("a", N, D), TableConfig("b", N // 2, D)],
                                       density=0.05, block_size=8)
    feats = {"a": torch.randint(0, N, (512, 10)), "b": torch.randint(0, N // 2, (512, 10))}
    assert_sparse_sized(lambda: sum(o.sum() for o in ebc(feats).values()).backward(),
                        pool_bytes=ebc.values.numel() * 4, batch_bytes=2 * 512 * 10 * D * 4,
                        dense_bytes=int(1.5 * N) * D * 4)
