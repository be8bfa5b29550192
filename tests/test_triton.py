"""Triton backend: conformance vs F.embedding_bag, op-level equality with the reference,
deterministic bit-exactness, opcheck.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest when no GPU is present) on small
shapes; with a GPU the same tests also run on CUDA tensors, with larger shapes.
"""
import os

import pytest
import torch

from conformance import check_case, full_grid
from conftest import DEVICES, backend_ops

triton = pytest.importorskip("triton")

from dsl_kernels import reference  # noqa: E402
from dsl_kernels import dispatch  # noqa: E402

TRITON_DEVICES = [d for d in DEVICES if dispatch._why_not("triton", d) is None]
if not TRITON_DEVICES:
    pytest.skip("Triton backend unavailable here (needs a GPU or TRITON_INTERPRET=1)",
                allow_module_level=True)

from dsl_kernels.backends.triton import _segments  # noqa: E402

tb = backend_ops("triton", TRITON_DEVICES[0])

CASES = list(full_grid())


def _id(c):
    return "-".join([c["mode"], "psw" if c["psw"] else "nopsw",
                     "ilo" if c["include_last_offset"] else "noilo",
                     "pad" if c["padding"] else "nopad", "2d" if c["two_d"] else "1d",
                     str(c["index_dtype"]).split(".")[-1], str(c["value_dtype"]).split(".")[-1]])


def _big(device):
    """Larger shapes on a GPU, interpreter-sized ones on CPU."""
    return device == "cuda"


# ------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_conformance_full_grid(device, case):
    # Under the interpreter the whole grid takes ~10 s, so nothing is sampled away.
    kw = dict(N=3000, D=64, block_size=8, num_bags=300) if _big(device) else {}
    check_case("triton", device, **case, **kw)


DET_CASES = [c for c in CASES if c["value_dtype"] == torch.float32 or c["mode"] == "mean"]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("case", DET_CASES, ids=[_id(c) for c in DET_CASES])
def test_conformance_deterministic(device, case):
    kw = dict(N=3000, D=64, block_size=8, num_bags=300) if _big(device) else {}
    check_case("triton", device, **case, deterministic=True, **kw)


# (D, block_size): power-of-two and odd block sizes, B = D (row sparsity), B = 1 with several
# mask words, and a block wider than one column tile (split into column chunks).
SHAPES = [(16, 1), (16, 2), (16, 16), (24, 3), (48, 6), (130, 1), (64, 64), (256, 256),
          (512, 1), (512, 512), (96, 32)]


# Mean differs from sum only in a per-bag scale: the wide shapes (slow under the interpreter)
# run sum and max.
SHAPE_CASES = [(D, B, m) for D, B in SHAPES for m in ("sum", "mean", "max")
               if not (D >= 256 and m == "mean")]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("D,block_size,mode", SHAPE_CASES,
                         ids=[f"D{d}-B{b}-{m}" for d, b, m in SHAPE_CASES])
def test_shapes(device, D, block_size, mode):
    for det in (False, True):
        check_case("triton", device, mode, mode == "sum", False, True, False, torch.int64,
                   torch.float32, D=D, block_size=block_size, density=0.4, N=30,
                   num_bags=6, deterministic=det)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_density_one_and_tiny(device):
    check_case("triton", device, "sum", True, False, False, False, torch.int64, torch.float32,
               density=1.0)
    check_case("triton", device, "max", False, False, True, False, torch.int32, torch.float16,
               density=0.02)


# ------------------------------------------------------------------------- op level


def _pool(N, NB, B, density, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = N * NB
    C = max(1, int(density * total))
    coord = torch.randperm(total, generator=g)[:C]
    coord = torch.cat([coord, torch.full((3,), -1, dtype=torch.int64)])  # free slots too
    coord = coord[torch.randperm(coord.numel(), generator=g)].to(device)
    values = torch.randn(coord.numel(), B, generator=g).to(device=device, dtype=dtype)
    values[coord < 0] = 0
    row_ptr, row_slots, row_mask = reference.rebuild_index(coord, N, NB)
    return values, coord, row_ptr, row_slots, row_mask


def _zipf_batch(N, num_bags, avg_len, device, idtype=torch.int64, seed=1):
    """Bags of random lengths over Zipf-like rows: hot rows repeat many times."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 2 * avg_len + 1, (num_bags,), generator=g)
    L = int(lengths.sum())
    p = 1.0 / torch.arange(1, N + 1, dtype=torch.float64) ** 1.05
    idx = torch.multinomial(p, L, replacement=True, generator=g)
    offsets = torch.zeros(num_bags + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    psw = torch.randn(L, generator=g)
    return idx.to(device, idtype), offsets.to(device, idtype), psw.to(device)


def _sizes(device):
    # (N, NB, B, num_bags, avg_len)
    return (2000, 16, 8, 512, 20) if _big(device) else (50, 4, 4, 12, 6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("pad", [-1, 0])
def test_ops_match_reference(device, mode, pad, monkeypatch):
    # A tiny segment chunk forces hot rows through the partial + merge path.
    monkeypatch.setattr(_segments, "SEGMENT_CHUNK", 3)
    N, NB, B, num_bags, avg = _sizes(device)
    values, coord, row_ptr, row_slots, row_mask = _pool(N, NB, B, 0.3, device)
    idx, off, psw = _zipf_batch(N, num_bags, avg, device)
    psw = psw if mode == 0 else None
    args = (row_ptr, row_slots, row_mask, idx, off, psw)
    out, mi = tb.lookup(values, *args, NB, mode, pad)
    ref_out, ref_mi = reference.lookup(values, *args, NB, mode, pad)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    if mode == 2:
        assert torch.equal(mi, ref_mi)
    g = torch.randn(out.shape, device=device)
    frozen = torch.zeros(values.shape[0], dtype=torch.bool, device=device)
    frozen[::3] = True
    for fz in (None, frozen):
        want = reference.lookup_backward(g, values, row_ptr, row_slots, row_mask, idx, off, psw,
                                         ref_mi, fz, NB, mode, pad, False)
        for det in (False, True):
            got = tb.lookup_backward(g, values, row_ptr, row_slots, row_mask, idx, off, psw,
                                     mi, fz, NB, mode, pad, det)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
            if fz is not None:
                assert not bool(got[frozen].any())
    rows, scores = tb.grow_scores(g, row_ptr, row_slots, row_mask, idx, off, psw, mi, NB, mode,
                                  pad)
    ref_rows, ref_scores = reference.grow_scores(g, row_ptr, row_slots, row_mask, idx, off, psw,
                                                 ref_mi, NB, mode, pad)
    assert torch.equal(rows, ref_rows)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-5)
    assert bool((scores > 0).any())  # the check is not vacuous


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_deterministic_backward_bit_exact(device):
    N, NB, B, num_bags, avg = _sizes(device)
    values, coord, row_ptr, row_slots, row_mask = _pool(N, NB, B, 0.5, device)
    idx, off, psw = _zipf_batch(N, num_bags * 4, avg, device, seed=3)
    g = torch.randn(off.numel() - 1, NB * B, device=device)
    runs = [tb.lookup_backward(g, values, row_ptr, row_slots, row_mask, idx, off, psw,
                               torch.empty(0, dtype=torch.int64, device=device), None, NB, 0,
                               -1, True) for _ in range(3)]
    assert bool(runs[0].abs().sum() > 0)
    for r in runs[1:]:
        assert torch.equal(r, runs[0])
    # Same through the module and autograd, twice (fp16 pool: one rounding at the end).
    grads = []
    for _ in range(2):
        emb = check_case("triton", device, "mean", False, False, True, False, torch.int64,
                         torch.float16, deterministic=True, seed=7)
        grads.append(emb.values.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("NB", [4, 130])
def test_rebuild_index_matches_reference(device, NB):
    N = 500 if _big(device) else 40
    _, coord, *_ = _pool(N, NB, 1, 0.3, device)
    got = tb.rebuild_index(coord, N, NB)
    want = reference.rebuild_index(coord, N, NB)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    empty = tb.rebuild_index(torch.full((5,), -1, dtype=torch.int64, device=device), N, NB)
    assert int(empty[0][-1]) == 0 and bool((empty[1] == -1).all()) and not bool(empty[2].any())


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_popcount_and_rank_negative_words(device):
    # Words with bit 63 set exercise the arithmetic-shift hazards of the SWAR popcount.
    N, NB, B = 6, 64, 1
    coord = torch.tensor([r * NB + c for r in range(N) for c in range(NB) if (r + c) % (r + 2)
                          or c == 63], device=device)
    row_ptr, row_slots, row_mask = reference.rebuild_index(coord, N, NB)
    assert bool((row_mask < 0).any())
    values = torch.randn(coord.numel(), B, device=device)
    idx = torch.arange(N, device=device)
    off = torch.arange(N + 1, device=device)
    out, _ = tb.lookup(values, row_ptr, row_slots, row_mask, idx, off, None, NB, 0, -1)
    ref, _ = reference.lookup(values, row_ptr, row_slots, row_mask, idx, off, None, NB, 0, -1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_empty_batches(device):
    values, coord, row_ptr, row_slots, row_mask = _pool(10, 2, 4, 0.5, device)
    idx = torch.empty(0, dtype=torch.int64, device=device)
    off = torch.zeros(4, dtype=torch.int64, device=device)  # three empty bags
    for mode in (0, 1, 2):
        out, mi = tb.lookup(values, row_ptr, row_slots, row_mask, idx, off, None, 2, mode, -1)
        assert out.shape == (3, 8) and not bool(out.any())
        if mode == 2:
            assert bool((mi == -1).all())
        for det in (False, True):
            g = tb.lookup_backward(torch.ones(3, 8, device=device), values, row_ptr, row_slots,
                                   row_mask, idx, off, None, mi, None, 2, mode, -1, det)
            assert not bool(g.any())
    rows, scores = tb.grow_scores(torch.ones(3, 8, device=device), row_ptr, row_slots,
                                  row_mask, idx, off, None, mi, 2, 0, -1)
    assert rows.numel() == 0 and scores.shape == (0, 2)


def test_bad_input_names_argument():
    device = TRITON_DEVICES[0]
    values, coord, row_ptr, row_slots, row_mask = _pool(10, 2, 4, 0.5, device)
    idx = torch.tensor([1, 2], device=device)
    with pytest.raises(TypeError, match="offsets"):
        tb.lookup(values, row_ptr, row_slots, row_mask, idx,
                  torch.tensor([0, 2], dtype=torch.int32, device=device), None, 2, 0, -1)
    with pytest.raises(TypeError, match="indices"):
        tb.lookup(values, row_ptr, row_slots, row_mask, idx.float(),
                  torch.tensor([0, 2], device=device), None, 2, 0, -1)
    with pytest.raises(ValueError, match="row_mask"):
        tb.lookup(values, row_ptr, row_slots, row_mask.view(-1), idx,
                  torch.tensor([0, 2], device=device), None, 2, 0, -1)
    with pytest.raises(ValueError, match="grad_out"):
        tb.lookup_backward(torch.ones(2, 8, device=device), values, row_ptr, row_slots,
                           row_mask, idx, torch.tensor([0, 2], device=device), None,
                           torch.empty(0, dtype=torch.int64), None, 2, 0, -1, False)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_opcheck_triton_lookup(device):
    values, coord, row_ptr, row_slots, row_mask = _pool(30, 4, 4, 0.4, device)
    values.requires_grad_(True)
    idx = torch.randint(0, 30, (10,), generator=torch.Generator().manual_seed(0)).to(device)
    off = torch.tensor([0, 3, 3, 7, 10], device=device)
    psw = torch.randn(10, device=device)
    for mode in (0, 2):
        w = psw if mode == 0 else None
        args = (values, row_ptr, row_slots, row_mask, idx, off, w, None, 4, mode, -1, False,
                "triton")
        torch.library.opcheck(torch.ops.dsl.lookup.default, args)
    _, mi = torch.ops.dsl.lookup(values, row_ptr, row_slots, row_mask, idx, off, None, None, 4,
                                 2, -1, False, "triton")
    torch.library.opcheck(torch.ops.dsl.lookup_backward.default,
                          (torch.randn(4, 16, device=device), values.detach(), row_ptr,
                           row_slots, row_mask, idx, off, None, mi, None, 4, 2, -1, True,
                           "triton"))
    torch.library.opcheck(torch.ops.dsl.rebuild_index.default, (coord, 30, 4, "triton"))


def test_bench_kernels_smoke(tmp_path):
    """The benchmark script imports, its bytes model is sane, and ``--smoke`` writes results."""
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import kernels as bk

    assert len(bk.full_grid()) == 2 * 2 * 3 * 2 * 4 * 4
    cfg = bk.Config(1000, 64, 8, 0.1, 20, "zipf", batch=16)
    fwd = bk.bytes_model("fwd", cfg, L=320, A=640, C=800)
    bwd = bk.bytes_model("bwd", cfg, L=320, A=640, C=800)
    assert 0 < fwd < bwd and bk.bytes_model("fwdbwd", cfg, 320, 640, 800) == fwd + bwd
    rc = bk.main(["--smoke", "--no-det", "--ops", "fwd,bwd", "--iters", "1",
                  "--out", str(tmp_path)])
    assert rc == 0
    csvs = list(tmp_path.glob("kernels_*_smoke.csv"))
    assert csvs and "triton" in csvs[0].read_text()
    assert list(tmp_path.glob("kernels_*_smoke.md"))


# The interpreter never compiles, so build the real sm_90 kernels ahead of time (no GPU needed,
# Triton's bundled ptxas) to catch what only the compiler rejects. It runs in a subprocess
# because under TRITON_INTERPRET=1 the kernels are interpreted functions.
_AOT_SCRIPT = r"""
import importlib, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from dsl_kernels.backends.triton._config import tile_config
L = importlib.import_module("dsl_kernels.backends.triton.lookup")
BW = importlib.import_module("dsl_kernels.backends.triton.lookup_backward")
S = importlib.import_module("dsl_kernels.backends.triton._segments")
R = importlib.import_module("dsl_kernels.backends.triton.rebuild_index")

def build(fn, types, consts, num_warps=4):
    names = fn.arg_names
    sig = dict(zip(names, types))
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert k.asm.get("cubin")

ptrs = ["*i32", "*i32", "*i64"]  # row_ptr, row_slots, row_mask
# (D, B, mode, value type, index type)
for D, B, mode, vt, it in [(128, 8, 0, "fp32", "i64"), (128, 1, 2, "bf16", "i32"),
                           (512, 512, 1, "fp16", "i64")]:
    NB = D // B
    W = (NB + 63) // 64
    cfg = tile_config(NB, B, 20)
    common = dict(B=B, NB=NB, W=W, NBT=cfg.NBT, BP=cfg.BP, CB=cfg.CB)
    build(L._lookup_kernel, [f"*{vt}"] + ptrs + [f"*{it}", f"*{it}", f"*{vt}", f"*{vt}", "*i64",
                                                 "i32", "i32", "i64"],
          dict(common, G=cfg.G, MODE=mode, HAS_PSW=mode == 0, SLOT64=False),
          cfg.num_warps)
    build(BW._backward_atomic_kernel,
          [f"*{vt}"] + ptrs + [f"*{it}", f"*{it}", f"*{vt}", "*i64", "*u8", "*fp32", "i32",
                               "i32", "i64"],
          dict(common, G=cfg.G, MODE=mode, HAS_PSW=mode == 0, HAS_FROZEN=True,
               SLOT64=False), cfg.num_warps)
    for epi in (0, 1):
        c = tile_config(NB, B, whole_blocks=epi == 1)
        cc = dict(B=B, NB=NB, W=W, NBT=c.NBT, BP=c.BP, CB=c.CB)
        out_t = "*fp32" if epi else f"*{vt}"
        build(S._items_kernel,
              [f"*{vt}", "*i64", "*i64", "*i64", "*fp32", "*i64", "*i64", "*i64", "*i32",
               "*i64", "*fp32", out_t, "*u8"] + ptrs + ["i64"],
              dict(cc, BE=8, MODE=mode, EPI=epi, HAS_FROZEN=epi == 0), c.num_warps)
        build(S._merge_kernel, ["*fp32", "*i64", "*i64", "*i64", "*i64", out_t, "*u8"] + ptrs
              + ["i64"],
              dict(cc, BI=8, EPI=epi, HAS_FROZEN=epi == 0), c.num_warps)
    build(R._mask_kernel, ["*i64", "*i64", "i64", "i64"], dict(NB=NB, W=W, BLOCK=1024))
print("compiled")
"""


def test_kernels_compile_for_sm90():
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("Triton's ptxas is not available here")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_out_of_range_rows_read_and_write_nothing(device):
    """validate=False or torch.compile skip the index checks: the kernels must mask rows outside
    [0, N) themselves. The row index sits inside larger buffers whose guard rows name real slots,
    so any read at an unchecked row would show up in the results."""
    N, NB, B = 6, 4, 2
    coord = torch.arange(N * NB, device=device)  # every block active
    values = torch.randn(N * NB, B, device=device)
    rp, rs, rm = reference.rebuild_index(coord, N, NB)
    rm_big = torch.full((3 * N, 1), -1, dtype=torch.int64, device=device)  # all bits set
    rm_big[N:2 * N] = rm
    rp_big = torch.zeros(3 * N + 1, dtype=torch.int32, device=device)
    rp_big[N:2 * N + 1] = rp
    rm, rp = rm_big[N:2 * N], rp_big[N:2 * N + 1]
    idx = torch.tensor([N, N + 3, 2 * N - 1, -1, -N], device=device)
    off = torch.arange(idx.numel() + 1, device=device)
    out, _ = tb.lookup(values, rp, rs, rm, idx, off, None, NB, 0, -1)
    assert torch.equal(out, torch.zeros_like(out))
    g = torch.ones(idx.numel(), NB * B, device=device)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    for det in (False, True):
        grad = tb.lookup_backward(g, values, rp, rs, rm, idx, off, None, empty, None, NB, 0, -1,
                                  det)
        assert torch.equal(grad, torch.zeros_like(grad)), det
    before = values.clone()
    s = torch.empty(0, device=device)
    skipped = tb.fused_update(g, values, rp, rs, rm, idx, off, None, empty, None, s, s, NB, 0,
                              -1, 0, 1.0, 0.9, 0.999, 0.0, 0.0, 1, 0)  # SGD, lr 1
    assert torch.equal(values, before) and int(skipped) == 0
