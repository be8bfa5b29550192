"""SparseEmbeddingBag == F.embedding_bag(to_dense()) on every backend available here."""
import pytest
import torch

from conformance import check_case, full_grid
from conftest import DEVICES, available_backends

# Slow backends (Triton under the interpreter) run their own reduced grid in their own file.
FAST = [(b, d) for d in DEVICES for b in available_backends(d)
        if not (b == "triton" and d == "cpu")]
CASES = list(full_grid())


def _id(c):
    return "-".join([c["mode"], "psw" if c["psw"] else "nopsw", "ilo" if c["include_last_offset"] else "",
                     "pad" if c["padding"] else "", "2d" if c["two_d"] else "1d",
                     str(c["index_dtype"]).split(".")[-1], str(c["value_dtype"]).split(".")[-1]])


@pytest.mark.parametrize("backend,device", FAST, ids=[f"{b}-{d}" for b, d in FAST])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_embedding_bag(backend, device, case):
    check_case(backend, device, **case)


@pytest.mark.parametrize("backend,device", FAST, ids=[f"{b}-{d}" for b, d in FAST])
@pytest.mark.parametrize("block_size", [1, 2, 16])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_block_sizes(backend, device, block_size, mode):
    check_case(backend, device, mode, False, False, True, False, torch.int64, torch.float32,
               block_size=block_size, density=0.5)


@pytest.mark.parametrize("backend,device", FAST, ids=[f"{b}-{d}" for b, d in FAST])
def test_wide_rows_two_mask_words(backend, device):
    # D / B = 130 blocks per row needs three 64-bit mask words.
    for mode in ("sum", "max"):
        check_case(backend, device, mode, False, False, False, False, torch.int64, torch.float32,
                   D=130, block_size=1, density=0.4)


@pytest.mark.parametrize("backend,device", FAST, ids=[f"{b}-{d}" for b, d in FAST])
def test_density_one_equals_dense(backend, device):
    check_case(backend, device, "sum", True, False, False, False, torch.int64, torch.float32,
               density=1.0)
