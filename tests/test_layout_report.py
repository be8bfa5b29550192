"""dsl_train.layout_report: the columns a prefix layout lets a (user, item) pair share."""
import pytest
import torch

from dsl_train.layout_report import layout_rows, main, shared_columns


def test_shared_columns_is_the_smaller_width_per_pair():
    k = torch.tensor([1, 4, 2, 3, 8])             # users 0, 1; items 0, 1, 2
    users, items = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 2, 0, 1, 2])
    r = shared_columns(k, 2, users, items, 4)
    pair = [4 * min(k[u], k[2 + i]) for u, i in zip(users.tolist(), items.tolist())]
    assert r["per_pair"] == pytest.approx(sum(pair) / len(pair))
    assert r["per_user"] == pytest.approx((sum(pair[:2]) / 2 + sum(pair[2:]) / 3) / 2)
    assert r["values_per_row"] == pytest.approx(4 * k.double().mean().item())
    with pytest.raises(ValueError, match="same shape"):
        shared_columns(k, 2, users, items[:2], 4)


def test_even_layout_shares_all_its_columns_and_skew_shares_fewer():
    """At a whole number of blocks per row an even layout shares every column it holds; a
    skewed one (frequency power 1 on skewed counts) shares fewer per user at the same budget:
    min(k_u, k_i) averaged is largest when the widths are equal."""
    g = torch.Generator().manual_seed(0)
    nu, ni = 200, 300
    counts = torch.cat([torch.randint(1, 5, (nu,), generator=g),
                        (1000 / torch.arange(1, ni + 1).double()).long() + 1])
    users = torch.randint(0, nu, (2000,), generator=g)
    items = torch.randint(0, ni, (2000,), generator=g)
    even, skew = layout_rows(counts, nu, users, items, 64, [8], [0.25], [0.0, 1.0])
    assert even["values_per_row"] == pytest.approx(16.0)
    assert even["per_user"] == pytest.approx(16.0) and even["per_pair"] == pytest.approx(16.0)
    assert skew["values_per_row"] == pytest.approx(16.0)
    assert skew["per_user"] < even["per_user"]
    with pytest.raises(ValueError, match="does not divide"):
        layout_rows(counts, nu, users, items, 64, [5], [0.25], [0.0])


def test_cli_prints_a_table(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("0 0 1 2\n1 1 2\n2 0 3\n")
    (tmp_path / "test.txt").write_text("0 3\n1 0\n2 1\n")
    main(["--data", str(tmp_path), "--dim", "8", "--block-sizes", "4", "--densities", "0.5",
          "--powers", "0", "--val-fraction", "0"])
    out = capsys.readouterr().out
    assert "| 4 | 0.5000 | 0 | 4.0 | 4.0 | 4.0 |" in out
