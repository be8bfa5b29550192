"""No step of forward + backward + optimizer builds anything of dense [N, D] size."""
import pytest
import torch

from conftest import available_backends
from dsl_kernels import SparseEmbeddingBag, SparseEmbeddingBagCollection, TableConfig
from memcheck import assert_no_dense_allocation, largest_allocation

N, D = 200_000, 64


def test_memcheck_sees_a_dense_allocation():
    # The checker itself must be able to fail.
    got, _ = largest_allocation(lambda: torch.zeros(N, D).add_(1))
    assert got >= N * D * 4


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "triton"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_train_step_never_allocates_dense(backend, mode):
    torch.manual_seed(0)
    emb = SparseEmbeddingBag(N, D, mode=mode, density=0.05, block_size=8, backend=backend)
    opt = torch.optim.Adam(emb.parameters(), lr=1e-3)
    idx = torch.randint(0, N, (1024, 20))

    def step():
        opt.zero_grad()
        emb(idx).square().mean().backward()
        opt.step()

    step()  # optimizer state is created at the budget on the first step
    assert_no_dense_allocation(step, N, D)


def test_construction_and_from_scratch_mask_never_dense():
    assert_no_dense_allocation(lambda: SparseEmbeddingBag(N, D, density=0.05, block_size=1), N, D)


def test_collection_step_never_dense():
    ebc = SparseEmbeddingBagCollection([TableConfig("a", N, D), TableConfig("b", N // 2, D)],
                                       density=0.05, block_size=8)
    feats = {"a": torch.randint(0, N, (512, 10)), "b": torch.randint(0, N // 2, (512, 10))}
    assert_no_dense_allocation(lambda: sum(o.sum() for o in ebc(feats).values()).backward(), N, D)
