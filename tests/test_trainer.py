"""dsl-train: loaders, synthetic generators, metrics and the memory report (fast unit tests).

End-to-end runs of every model and method are in test_trainer_e2e.py.
"""
import gzip
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

from dsl_train import data as D  # noqa: E402
from dsl_train.methods import MethodConfig, make_collection, make_table, prune_to_sparse  # noqa: E402
from dsl_train.metrics import auc, log_loss, ranking_metrics, to_csr  # noqa: E402
from dsl_train.models import DLRM, MF, LightGCN, normalized_adjacency  # noqa: E402
from dsl_train.report import memory_report, optimizer_state_bytes  # noqa: E402

import dsl_kernels  # noqa: E402


# ----------------------------------------------------------------------------- LightGCN text


def _write(path, text, gz=False):
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        with open(path, "w") as f:
            f.write(text)
    return str(path)


def test_lightgcn_loader_plain_and_gz(tmp_path):
    _write(tmp_path / "train.txt", "0 0 1 1\n1 2\n\n2 0 3\n")  # duplicate (0,1), blank line
    _write(tmp_path / "test.txt.gz", "0 2\n1 3\n2\n", gz=True)  # user 2 has no test items
    d = D.load_lightgcn(str(tmp_path))
    assert (d.num_users, d.num_items) == (3, 4)
    assert d.num_train == 5 and d.num_test == 2
    pairs = set(zip(d.train_users.tolist(), d.train_items.tolist()))
    assert pairs == {(0, 0), (0, 1), (1, 2), (2, 0), (2, 3)}
    # A path to the train file works as well as the folder.
    assert D.load_lightgcn(str(tmp_path / "train.txt")).num_train == 5


def test_lightgcn_loader_malformed_names_file_and_line(tmp_path):
    _write(tmp_path / "train.txt", "0 0 1\n1 2 x3\n")
    _write(tmp_path / "test.txt", "0 2\n")
    with pytest.raises(D.DataError, match=r"train\.txt, line 2: .*'x3'"):
        D.load_lightgcn(str(tmp_path))
    _write(tmp_path / "train.txt", "0 0 1\n1 -2\n")
    with pytest.raises(D.DataError, match=r"train\.txt, line 2: ids must be non-negative"):
        D.load_lightgcn(str(tmp_path))


def test_lightgcn_loader_missing_and_empty(tmp_path):
    with pytest.raises(D.DataError, match="train.txt"):
        D.load_lightgcn(str(tmp_path))
    with pytest.raises(D.DataError, match="no such file"):
        D.load_lightgcn(str(tmp_path / "nope"))
    _write(tmp_path / "train.txt", "\n")
    _write(tmp_path / "test.txt", "")
    with pytest.raises(D.DataError, match="no interactions"):
        D.load_lightgcn(str(tmp_path))


# ----------------------------------------------------------------------------- RecBole .inter

INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         "u1\ti9\t3\t30\nu2\ti8\t4\t10\nu1\ti8\t5\t20\nu3\ti7\t1\t40\n")


def test_inter_loader_orders_by_time_and_maps_tokens(tmp_path):
    p = _write(tmp_path / "x.inter.gz", INTER, gz=True)
    s = D.load_inter(str(tmp_path))  # folder -> finds the .inter.gz
    assert len(s) == 4 and s.times.tolist() == [10, 20, 30, 40]
    # ids in order of first appearance in time: u2->0, u1->1, u3->2; i8->0, i9->1, i7->2
    assert s.users.tolist() == [0, 1, 1, 2] and s.items.tolist() == [0, 0, 1, 2]
    assert (s.num_users, s.num_items) == (3, 3)
    w = D.stream_windows(s, 2)
    assert [u.tolist() for u, _ in w] == [[0, 1], [1, 2]]
    with pytest.raises(D.DataError, match="cannot fill"):
        D.stream_windows(s, 5)
    assert D.load_inter(p).users.tolist() == s.users.tolist()


def test_inter_loader_errors(tmp_path):
    bad = INTER.replace("u3\ti7\t1\t40", "u3\ti7\t1")
    with pytest.raises(D.DataError, match=r"bad\.inter, line 5: 3 tab-separated fields"):
        D.load_inter(_write(tmp_path / "bad.inter", bad))
    bad = INTER.replace("\t20\n", "\tyesterday\n")
    with pytest.raises(D.DataError, match=r"line 4: timestamp 'yesterday'"):
        D.load_inter(_write(tmp_path / "bad2.inter", bad))
    with pytest.raises(D.DataError, match=r"line 1: header"):
        D.load_inter(_write(tmp_path / "bad3.inter", "a:token\tb:token\n1\t2\n"))
    with pytest.raises(D.DataError, match="empty file"):
        D.load_inter(_write(tmp_path / "empty.inter", ""))


# ----------------------------------------------------------------------------- Criteo


def _criteo_row(label, ints, cats, sep):
    return sep.join([str(label)] + [str(x) for x in ints] + cats)


def test_criteo_csv_with_header_and_missing_values(tmp_path):
    header = ",".join(["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)])
    rows = [_criteo_row(1, [""] * 12 + [3], ["a"] * 25 + [""], ","),
            _criteo_row(0, [-1] + [0] * 12, ["b"] * 26, ","),
            _criteo_row(1, [math.e - 1] + [1] * 12, ["a"] * 26, ",")]
    d = D.load_criteo(_write(tmp_path / "c.csv", "\n".join([header] + rows) + "\n"))
    assert len(d) == 3 and d.labels.tolist() == [1, 0, 1]
    assert d.dense[0, :12].abs().sum() == 0 and d.dense[0, 12] == pytest.approx(math.log(4))
    assert d.dense[1, 0] == 0  # negative -> clamped to 0 before log1p
    assert d.dense[2, 0] == pytest.approx(1.0)
    assert d.sparse[0, 25] == 0  # missing bucket
    assert d.sparse[0, 0] == d.sparse[2, 0] != d.sparse[1, 0]  # same value, same bucket
    assert ((d.sparse >= 0) & (d.sparse < torch.tensor(d.table_sizes))).all()
    assert d.feature_names[0] == "C1"
    tr, te = d.split(0.34)
    assert len(tr) == 2 and len(te) == 1


def test_criteo_headerless_tsv_and_errors(tmp_path):
    rows = [_criteo_row(0, [1] * 13, ["x"] * 26, "\t") for _ in range(3)]
    d = D.load_criteo(_write(tmp_path / "t.tsv", "\n".join(rows) + "\n"), hash_size=8)
    assert len(d) == 3 and d.table_sizes == [2] * 26
    many = [_criteo_row(0, [1] * 13, [f"v{i}"] * 26, "\t") for i in range(20)]
    h = D.load_criteo(_write(tmp_path / "h.tsv", "\n".join(many) + "\n"), hash_size=8)
    assert h.table_sizes == [8] * 26 and h.sparse.min() >= 1 and h.sparse.max() < 8
    rows[1] = "\t".join(rows[1].split("\t")[:-2])
    with pytest.raises(D.DataError, match=r"t2\.tsv, line 2: 38 fields, expected 40"):
        D.load_criteo(_write(tmp_path / "t2.tsv", "\n".join(rows) + "\n"))
    rows[1] = _criteo_row(2, [1] * 13, ["x"] * 26, "\t")
    with pytest.raises(D.DataError, match=r"t3\.tsv, line 2: label must be 0/1"):
        D.load_criteo(_write(tmp_path / "t3.tsv", "\n".join(rows) + "\n"))


# ----------------------------------------------------------------------------- real data


def test_real_data_loaders(shared_data):
    g = D.load_lightgcn(os.path.join(shared_data, "gowalla"))
    assert (g.num_users, g.num_items) == (29858, 40981)
    assert (g.num_train, g.num_test) == (810128, 217242)
    s = D.load_inter(os.path.join(shared_data, "ml-100k"))
    assert (len(s), s.num_users, s.num_items) == (100000, 943, 1682)
    assert bool((s.times[1:] >= s.times[:-1]).all())
    c = D.load_criteo(os.path.join(shared_data, "criteo-sample"))
    assert len(c) == 200 and c.dense.shape == (200, 13) and c.sparse.shape == (200, 26)
    assert 0 < float(c.labels.mean()) < 1


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_implicit_is_zipf_skewed_and_seeded():
    d = D.synthetic_implicit(400, 300, per_user=10, seed=3)
    assert d.num_train + d.num_test == 4000
    counts = torch.bincount(torch.cat([d.train_items, d.test_items]), minlength=300).sort(
        descending=True).values
    assert counts[:15].sum() > 4 * counts[150:165].sum()  # head items dominate the tail
    d2 = D.synthetic_implicit(400, 300, per_user=10, seed=3)
    assert torch.equal(d.train_items, d2.train_items)
    # no duplicate (user, item) pairs within a window
    key = torch.cat([d.train_users * 300 + d.train_items, d.test_users * 300 + d.test_items])
    assert key.unique().numel() == key.numel()


def test_synthetic_drift_changes_the_distribution():
    def item_hist(s, w):
        return torch.bincount(s.items[s.times == w], minlength=s.num_items).float()

    still = D.synthetic_stream(300, 200, num_windows=3, per_user=10, drift=0.0, seed=1)
    moving = D.synthetic_stream(300, 200, num_windows=3, per_user=10, drift=0.8, seed=1)
    sim = lambda s: float(torch.cosine_similarity(item_hist(s, 0), item_hist(s, 2), dim=0))
    assert sim(moving) < sim(still) - 0.1
    assert bool((moving.times[1:] >= moving.times[:-1]).all())
    with pytest.raises(ValueError, match="drift"):
        D.synthetic_stream(drift=2.0)


def test_synthetic_ctr():
    d = D.synthetic_ctr(5000, num_features=3, cardinality=200, seed=0)
    assert d.sparse.min() >= 1 and d.sparse.max() <= 200
    top = torch.bincount(d.sparse[:, 0]).max()
    assert top > 20 * (5000 / 200) / 4  # the hottest value is far above uniform
    assert 0.05 < float(d.labels.mean()) < 0.95


# ----------------------------------------------------------------------------- metrics


def test_ranking_metrics_hand_computed():
    # 2 users x 5 items. user 0: train {0}, test {1, 4}; user 1: train {}, test {3};
    # user 2: no test items (not counted).
    scores = torch.tensor([[9., 1., 8., 7., 6.],
                           [5., 4., 3., 2., 1.],
                           [1., 1., 1., 1., 1.]])
    train = to_csr(torch.tensor([0]), torch.tensor([0]), 3)
    test = to_csr(torch.tensor([0, 0, 1]), torch.tensor([1, 4, 3]), 3)
    m = ranking_metrics(lambda u: scores[u], train, test, 5, k=3)
    # user 0 ranking w/o item 0: 2, 3, 4, 1 -> top3 = 2,3,4: hit at rank 3 (item 4)
    #   recall 1/2, dcg = 1/log2(4) = 0.5, idcg = 1 + 1/log2(3)
    # user 1 ranking: 0,1,2,3,4 -> top3 misses item 3: recall 0, ndcg 0
    idcg0 = 1 + 1 / math.log2(3)
    assert m["users"] == 2
    assert m["recall"] == pytest.approx((0.5 + 0) / 2)
    assert m["ndcg"] == pytest.approx((0.5 / idcg0 + 0) / 2)
    # user batching does not change the result; k larger than the item count is clipped
    assert ranking_metrics(lambda u: scores[u], train, test, 5, k=3, user_batch=1) == m
    full = ranking_metrics(lambda u: scores[u], train, test, 5, k=50)
    assert full["recall"] == pytest.approx(1.0) and full["ndcg"] < 1.0
    only1 = ranking_metrics(lambda u: scores[u], train, test, 5, k=3, users=torch.tensor([1]))
    assert only1["users"] == 1 and only1["recall"] == 0.0


def test_auc_and_log_loss_against_brute_force():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    y = (torch.rand(60, generator=g) < 0.4).float()
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
    assert auc(s, y) == pytest.approx(float(brute))
    assert math.isnan(auc(s, torch.ones(60)))
    p = torch.tensor([0.9, 0.2, 0.5])
    yy = torch.tensor([1., 0., 1.])
    want = -(math.log(0.9) + math.log(0.8) + math.log(0.5)) / 3
    assert log_loss(p, yy) == pytest.approx(want)
    assert math.isfinite(log_loss(torch.tensor([0., 1.]), torch.tensor([1., 0.])))


# ----------------------------------------------------------------------------- models, memory


def test_normalized_adjacency_is_symmetric_normalised():
    a = normalized_adjacency(2, 3, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])).to_dense()
    assert torch.allclose(a, a.T)
    # user 0 (deg 2) - item 1 (deg 2): 1/2 ; user 1 (deg 1) - item 1: 1/sqrt(2)
    assert a[0, 3].item() == pytest.approx(0.5) and a[1, 3].item() == pytest.approx(2 ** -0.5)
    assert a[0, 4].item() == 0


def _step(model, opt, loss):
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("method", ["dense", "static"])
def test_memory_report_equals_what_the_modules_hold(method):
    cfg = MethodConfig(method, 1.0 if method == "dense" else 0.25, block_size=4)
    emb = make_table(cfg, 50 + 30, 16)
    model = MF(50, 30, emb)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _step(model, opt, model.loss(torch.tensor([0, 1]), torch.tensor([2, 3]),
                                 torch.tensor([4, 5]), 1e-4)[0])
    rep = memory_report(model, opt)
    if method == "dense":
        held = emb.weight.numel() * 4
    else:
        held = emb.memory_bytes()
        assert held < 80 * 16 * 4
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values())
    assert rep["embedding_bytes"] == held
    assert rep["embedding_optimizer_bytes"] == state == optimizer_state_bytes(opt)
    assert rep["embedding_total_bytes"] == held + state
    assert rep["dense_equivalent_embedding_bytes"] == 80 * 16 * 4
    # Adam: 2 fp32 moments per value (+ a scalar step) -> about 2x the dense table
    assert rep["dense_equivalent_optimizer_bytes"] == pytest.approx(2 * 80 * 16 * 4, rel=0.01)
    assert rep["other_param_bytes"] == 0


def test_memory_report_dlrm_separates_mlp_from_tables():
    cfg = MethodConfig("static", 0.2, block_size=4)
    tables = make_collection(cfg, [40, 60], ["C1", "C2"], 8)
    model = DLRM(3, tables, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    out = model(torch.rand(4, 3), torch.tensor([[1, 2], [3, 4], [0, 0], [39, 59]]))
    _step(model, opt, out.sum())
    rep = memory_report(model, opt)
    ebc = tables.collection
    assert rep["embedding_bytes"] == ebc.memory_bytes()
    vstate = sum(t.numel() * t.element_size() for t in opt.state[ebc.values].values())
    assert rep["embedding_optimizer_bytes"] == vstate
    mlp = [p for n, p in model.named_parameters() if not n.startswith("tables.")]
    assert rep["other_param_bytes"] == sum(p.numel() * 4 for p in mlp)
    assert rep["other_optimizer_bytes"] == optimizer_state_bytes(opt) - vstate


def test_magnitude_prune_keeps_the_largest_blocks_globally():
    torch.manual_seed(0)
    cfg = MethodConfig("magnitude", 0.25, block_size=4)
    dense = make_collection(cfg, [10, 30], ["C1", "C2"], 8)
    with torch.no_grad():
        dense.bags[0].weight.mul_(10)  # table C1 dominates: it should get more than its share
    sparse = prune_to_sparse(dense, cfg)
    ebc = sparse.collection
    assert ebc.num_active_blocks == ebc.budget == round(0.25 * 10 * 2) + round(0.25 * 30 * 2)
    norms = torch.cat([b.weight.detach().reshape(-1, 4).norm(dim=1) for b in dense.bags])
    thresh = norms.sort(descending=True).values[ebc.budget - 1]
    for name, bag in zip(["C1", "C2"], dense.bags):
        img = ebc.to_dense(name)
        w = bag.weight.detach()
        keep = w.reshape(-1, 4).norm(dim=1) >= thresh
        assert torch.equal(img.reshape(-1, 4)[keep], w.reshape(-1, 4)[keep])
        assert img.reshape(-1, 4)[~keep].abs().sum() == 0
    assert ebc.table_density()["C1"] > 0.25
    # and the outputs agree with the dense model restricted to the kept blocks
    x = torch.tensor([[1, 2], [3, 29]])
    ref = torch.stack([torch.nn.functional.embedding(x[:, j], ebc.to_dense(n))
                       for j, n in enumerate(["C1", "C2"])], 1)
    assert torch.allclose(sparse(x), ref, atol=1e-6)


def test_lightgcn_sparse_table_matches_its_dense_image():
    torch.manual_seed(0)
    cfg = MethodConfig("static", 0.5, block_size=4)
    emb = make_table(cfg, 5, 8)
    m = LightGCN(2, 3, emb, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]), layers=2)
    dense = torch.nn.Embedding(5, 8)
    with torch.no_grad():
        dense.weight.copy_(emb.to_dense())
    md = LightGCN(2, 3, dense, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]), layers=2)
    u = torch.tensor([0, 1])
    assert torch.allclose(m.score_users(u), md.score_users(u), atol=1e-6)
    assert isinstance(emb, dsl_kernels.SparseEmbedding)


def test_method_config_errors():
    with pytest.raises(ValueError, match="--method"):
        MethodConfig("bogus")
    with pytest.raises(ValueError, match="--density"):
        MethodConfig("dsl", 0.0)
    with pytest.raises(ValueError, match="--density 1.0"):
        MethodConfig("dense", 0.5)
    with pytest.raises(ValueError, match="multiple of --block-size"):
        make_table(MethodConfig("static", 0.5, block_size=8), 10, 12)
    from dsl_train.methods import Controller

    cfg = MethodConfig("magnitude", 0.5, block_size=4)
    model = MF(5, 5, make_table(cfg, 10, 8))
    with pytest.raises(ValueError, match="--epochs >= 2"):
        Controller(cfg, model, lambda m: torch.optim.Adam(m.parameters()), 10, epochs=1)
