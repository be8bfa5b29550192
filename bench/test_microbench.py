"""The CPU microbenchmarks under pytest-benchmark (``python -m pytest bench --benchmark-only``);
``python -m bench.cpu_step`` / ``python -m bench.kernels`` stay for the tables and plots.

One table of ``DSL_BENCH_ROWS`` (default 1e6) x 64 fp32, 4,096 bags x 20 Zipf(1.05) indices
(the workload of bench/cpu_step.py), ``torch.get_num_threads()`` threads (set
``OMP_NUM_THREADS``): the full training step of every variant of bench.cpu_step (FBGEMM rows
when fbgemm_gpu imports), and the forward alone of the dsl ``cpu`` lookup, ``nn.EmbeddingBag``
and FBGEMM. Compare with ``--benchmark-group-by=group``. Not part of ``tests/`` (CI never times
anything).
"""
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench.cpu_step import POOLING, variant_builders, zipf_batches  # noqa: E402
from bench.peers import fbgemm_tbe, to_fbgemm_inputs  # noqa: E402
from dsl_kernels import SparseEmbeddingBag  # noqa: E402

N = int(float(os.environ.get("DSL_BENCH_ROWS", "1e6")))
D, BAGS, DENSITY = 64, 4096, 0.1
BATCHES = zipf_batches(N, BAGS, POOLING, n=4)
STEPS = dict(variant_builders(N, D, DENSITY, with_dense=False))


def _cycle(fn):
    state = {"k": 0}

    def run():
        idx, off = BATCHES[state["k"] % len(BATCHES)]
        state["k"] += 1
        fn(idx, off)
    return run


@pytest.mark.parametrize("variant", list(STEPS))
def test_training_step(benchmark, variant):
    benchmark.group = f"step N={N:.0e} bags={BAGS} threads={torch.get_num_threads()}"
    step = STEPS[variant]()  # allocate this variant's table only
    benchmark.pedantic(_cycle(step), rounds=10, warmup_rounds=2)


def _forwards():
    out = {}
    emb = SparseEmbeddingBag(N, D, mode="sum", density=DENSITY, block_size=8, backend="cpu")
    out["dsl cpu lookup"] = lambda i, o: emb(i, o)
    bag = torch.nn.EmbeddingBag(N, D, mode="sum")
    out["nn.EmbeddingBag"] = lambda i, o: bag(i, o)
    tbe = fbgemm_tbe(N, D, "sgd")
    if tbe is not None:
        out["FBGEMM TBE"] = lambda i, o: tbe(*to_fbgemm_inputs(i, o))
    return out


@pytest.mark.parametrize("name", ["dsl cpu lookup", "nn.EmbeddingBag", "FBGEMM TBE"])
def test_forward(benchmark, name):
    benchmark.group = f"forward N={N:.0e} bags={BAGS} threads={torch.get_num_threads()}"
    fwd = _forwards().get(name)
    if fwd is None:
        pytest.skip(f"{name} is not available here")
    with torch.no_grad():
        benchmark.pedantic(_cycle(fwd), rounds=20, warmup_rounds=2)
