"""torch.compile(fullgraph=True) of a model using SparseEmbeddingBag matches eager, forward and
backward (CPU inductor here; the same test runs on CUDA when a GPU is present).

The dsl ops are torch.library custom ops with fake impls, so Dynamo/AOTAutograd trace them as
opaque calls; the module's data-dependent input checks are skipped while compiling (they would
otherwise force a graph break), the structural checks still run at trace time.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dsl_kernels import SparseEmbeddingBag

DEVS = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Model(nn.Module):
    def __init__(self, mode, device, backend):
        super().__init__()
        self.emb = SparseEmbeddingBag(120, 16, mode=mode, density=0.3, block_size=4,
                                      padding_idx=3, device=device, backend=backend)
        self.head = nn.Linear(16, 1, device=device)

    def forward(self, idx, off, psw=None):
        return self.head(torch.relu(self.emb(idx, off, psw))).squeeze(1)


def _batch(gen, device, num_bags=7):
    lengths = torch.randint(0, 5, (num_bags,), generator=gen)
    lengths[2] = 0  # an empty bag
    idx = torch.randint(0, 120, (int(lengths.sum()),), generator=gen)
    idx[::4] = 3  # padding entries
    off = torch.zeros(num_bags, dtype=torch.int64)
    off[1:] = torch.cumsum(lengths, 0)[:-1]
    return idx.to(device), off.to(device)


@pytest.mark.parametrize("device", DEVS)
def test_compiled_matches_eager(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    backend = "auto"
    model = Model("sum", device, backend)
    gen = torch.Generator().manual_seed(1)

    def loss_fn(m, idx, off, psw):
        return (m(idx, off, psw) ** 2).mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    for step in range(2):  # two batches of different length: dynamic shapes, no recompile error
        idx, off = _batch(gen, device, num_bags=7 + step)
        psw = torch.rand(idx.shape, generator=gen).to(device).requires_grad_(True)
        model.zero_grad()
        eager = loss_fn(model, idx, off, psw)
        eager.backward()
        g_eager = (model.emb.values.grad.clone(), model.head.weight.grad.clone(), psw.grad.clone())
        model.zero_grad()
        psw.grad = None
        out = compiled(model, idx, off, psw)
        out.backward()
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.emb.values.grad, g_eager[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.head.weight.grad, g_eager[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(psw.grad, g_eager[2], rtol=1e-5, atol=1e-6)
        assert model.emb.values.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVS)
def test_compiled_max_mode_2d_input(device):
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = Model("max", device, "auto")
    idx = torch.randint(0, 120, (5, 3), generator=torch.Generator().manual_seed(3)).to(device)
    fwd = torch.compile(lambda m, i: m.emb(i), fullgraph=True)
    out = fwd(model, idx)
    ref = model.emb(idx)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.sum().backward()
    g = model.emb.values.grad.clone()
    model.zero_grad()
    ref.sum().backward()
    torch.testing.assert_close(g, model.emb.values.grad, rtol=0, atol=0)


def test_structural_checks_still_run_when_compiling():
    torch._dynamo.reset()
    model = Model("sum", "cpu", "auto")
    fwd = torch.compile(lambda m, i, o: m.emb(i, o), fullgraph=True)
    with pytest.raises(Exception, match="int32 or int64"):
        fwd(model, torch.rand(4), torch.tensor([0, 2]))


def _loss(m, idx, off):
    return (m(idx, off) ** 2).mean()


def _eager_and_compiled(build, steps):
    """Train a fresh ``build(backend) -> (model, opt, sched)`` eagerly and compiled
    (fullgraph); ``{"eager" | "compiled": (losses, model, sched)}``."""
    runs = {}
    for name, fn in (("eager", _loss), ("compiled", torch.compile(_loss, fullgraph=True))):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, opt, sched = build()
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            idx, off = _batch(gen, "cpu")
            opt.zero_grad()
            loss = fn(model, idx, off)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            losses.append(float(loss))
        runs[name] = (losses, model, sched)
    assert runs["compiled"][0] == pytest.approx(runs["eager"][0], rel=1e-5)
    torch.testing.assert_close(runs["compiled"][1].emb.values.detach(),
                               runs["eager"][1].emb.values.detach(), rtol=1e-5, atol=1e-6)
    return runs


@pytest.mark.parametrize("skip_stale", [False, True], ids=["dsl", "dsl-skip-stale"])
def test_compiled_with_dsl_scheduler_matches_eager(skip_stale):
    """Growth scores and stale tracking observe the backward through an opaque op, so the
    scheduler attached to the model does not break fullgraph compilation or change results."""
    from dsl_kernels.sparsity import DSLScheduler

    def build():
        model = Model("sum", "cpu", "reference")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = DSLScheduler(model, opt, update_every=2, prune_fraction=0.5, stop_at=20,
                             score_window=2, skip_stale=skip_stale, stale_window=2,
                             target_skip=0.5, keep_rows=False)
        return model, opt, sched

    runs = _eager_and_compiled(build, 6)
    (_, em, es), (_, cm, cs) = runs["eager"], runs["compiled"]
    assert es.stats()["moved_blocks"] > 0
    assert torch.equal(cm.emb.coord, em.emb.coord)
    assert cs.stats() == es.stats()


@pytest.mark.parametrize("backend", ["reference", "cpu"])  # cpu: the forward emits the plan
def test_compiled_with_fused_optimizer_matches_eager(backend):
    """fuse_optimizer: the update runs inside the compiled backward, values.grad stays None."""
    from dsl_kernels.fused import fuse_optimizer

    def build():
        model = Model("sum", "cpu", backend)
        fuse_optimizer(model.emb, "adam", lr=0.05)
        return model, torch.optim.SGD(model.head.parameters(), lr=0.1), None

    for _, model, _ in _eager_and_compiled(build, 4).values():
        assert model.emb.values.grad is None and int(model.emb.fused_step) == 4
