"""No host synchronisation where none is needed: a collection's forward with validate=False and
the stale-skipping tracker in the backward read nothing back from the device (on a GPU every
such read stalls the stream). Counted on the CPU by intercepting the tensor operations that
read data back to the host or produce data-dependent shapes."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dsl_kernels import SparseEmbeddingBagCollection, TableConfig
from dsl_kernels.sparsity import DSLScheduler

_READS = {"__int__", "__bool__", "__float__", "__index__", "item", "tolist", "nonzero",
          "unique", "unique_consecutive", "masked_select", "argwhere"}


class HostSyncCounter(TorchFunctionMode):
    """Records the calls that need the device's data on the host."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _READS:
            self.calls.append(name)
        elif name == "__getitem__" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                           for a in _flat(args[1:])):
            self.calls.append("bool-mask indexing")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and \
                isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor):
            self.calls.append("repeat_interleave without output_size")
        return func(*args, **kwargs)


def _flat(xs):
    for x in xs:
        if isinstance(x, (tuple, list)):
            yield from _flat(x)
        else:
            yield x


def _collection(**kw):
    torch.manual_seed(0)
    return SparseEmbeddingBagCollection(
        [TableConfig("a", 50, 8), TableConfig("b", 40, 16), TableConfig("c", 30, 8, mode="mean")],
        density=0.5, block_size=4, validate=False, **kw)


def test_collection_forward_dict_reads_nothing_back():
    ebc = _collection()
    feats = {"a": (torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 3])),
             "b": (torch.tensor([5, 6]), torch.tensor([0, 1])),
             "c": torch.tensor([[1, 2], [3, 4]])}
    with HostSyncCounter() as c:
        out = ebc(feats)
    assert c.calls == []
    assert {k: tuple(v.shape) for k, v in out.items()} == {"a": (3, 8), "b": (2, 16),
                                                           "c": (2, 8)}


@pytest.mark.parametrize("keys", [["a", "c"], ["b", "a", "c"]], ids=["one-group", "groups"])
def test_collection_forward_jagged_reads_nothing_back_and_matches_dict(keys):
    ebc = _collection()
    g = torch.Generator().manual_seed(1)
    batch = 3
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=g)
    rows = {"a": 50, "b": 40, "c": 30}
    values = torch.cat([torch.randint(0, rows[k], (int(n),), generator=g)
                        for k, n in zip(keys, lengths.view(len(keys), batch).sum(1))])
    with HostSyncCounter() as c:
        out = ebc.forward_jagged(keys, values, lengths)
    assert c.calls == []
    start = 0
    for i, k in enumerate(keys):
        ln = lengths[i * batch:(i + 1) * batch]
        n = int(ln.sum())
        off = torch.cumsum(ln, 0) - ln
        want = ebc({k: (values[start:start + n], off)})[k]
        torch.testing.assert_close(out[k], want)
        start += n


def test_stale_tracking_in_the_backward_reads_nothing_back():
    """What the backward of a lookup hands the stale tracker (pool.notify_lookup, called from
    dsl::observe_lookup; the autograd engine itself runs outside the counting mode)."""
    ebc = _collection(backend="cpu")
    opt = torch.optim.SGD(ebc.parameters(), lr=0.1)
    sched = DSLScheduler(ebc, opt, update_every=5, prune_fraction=0.2, stop_at=100,
                         grow="random", skip_stale=True)
    idx = torch.tensor([1, 2, 3, 4, 2])  # rows of table a (2 blocks per row)
    off = torch.tensor([0, 1, 3, 5])
    grad = torch.ones(3, 8)
    with HostSyncCounter() as c:
        ebc.notify_lookup(grad, idx, off, None, torch.empty(0, dtype=torch.int64), 2, 0, -1)
    assert c.calls == []
    tracker = sched.pools[0].tracker
    active = sum(int((ebc.coord // ebc.num_blocks == r).sum()) for r in idx.tolist())
    assert tracker.touches == active  # read lazily, still exact
