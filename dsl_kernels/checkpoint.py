"""Crash-safe, verified, bit-exact checkpoints of a model with sparse tables, its optimizer and
its (sparsity or LR) scheduler.

``save`` writes atomically: the bytes go to a temporary file in the destination directory, are
flushed and ``fsync``-ed, and only then ``os.replace`` puts the file in place (and the directory
is ``fsync``-ed) — a crash at any moment leaves either the old checkpoint or the new one, never a
torn file.

``load`` verifies before it modifies anything: the file's magic, format version, length and
SHA-256 (a truncated or corrupted file is reported as such), then that the checkpoint fits the
model (same state-dict keys, shapes and dtypes; the same sparse-pool metadata: budget,
block_size, num_rows, num_blocks, tables), that every pool's ``coord`` is valid (range, no block
twice, each block inside its table) and that the derived row index rebuilt from it is
consistent, and that the optimizer state fits the optimizer's parameters. Only then are model,
optimizer, scheduler and RNG states committed; if anything still fails while committing, the
previous states are put back, so a failed load never leaves a half-loaded model.

File layout (version 1)::

    b"DSLCKPT\\n"                                   8-byte magic
    {"format_version": 1, "payload_bytes": n,
     "sha256": "..."}\\n                            one JSON header line
    <n bytes: torch.save of the payload dict>

The payload holds ``model`` (state_dict), ``pools`` (metadata per sparse module), ``optimizer``,
``scheduler``, ``rng`` (torch CPU and CUDA, Python ``random``, NumPy) and ``extra`` (the user's
keyword arguments, e.g. ``step=...``). :func:`read_payload` returns it for inspection.

Example::

    >>> import os, tempfile, torch, dsl_kernels
    >>> emb = dsl_kernels.SparseEmbeddingBag(100, 16, density=0.25, block_size=4)
    >>> opt = torch.optim.Adam(emb.parameters(), lr=0.01)
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.dsl")
    >>> dsl_kernels.save(path, emb, opt, step=10)
    >>> emb2 = dsl_kernels.SparseEmbeddingBag(100, 16, density=0.25, block_size=4)
    >>> opt2 = torch.optim.Adam(emb2.parameters(), lr=0.01)
    >>> dsl_kernels.load(path, emb2, opt2)["step"]
    10
    >>> torch.equal(emb2.to_dense(), emb.to_dense())
    True
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import random
import tempfile
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .pool import BlockSparseBase

MAGIC = b"DSLCKPT\n"
FORMAT_VERSION = 1
_MAX_HEADER = 4096

__all__ = ["save", "load", "read_payload", "verify", "CheckpointError", "FORMAT_VERSION"]


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated, of an unknown format, or does not fit the
    model/optimizer it is loaded into. Nothing was modified when this is raised."""


# ------------------------------------------------------------------------------ metadata


def _pool_meta(m: BlockSparseBase) -> Dict[str, Any]:
    return {
        "class": type(m).__name__,
        "budget": int(m.budget),
        "block_size": int(m.block_size),
        "num_rows": int(m.num_rows),
        "num_blocks": int(m.num_blocks),
        "dtype": str(m.values.dtype),
        "tables": [[t.name, int(t.row_start), int(t.num_rows), int(t.num_blocks), t.mode,
                    t.padding_idx] for t in m.tables],
    }


def _pools(model: nn.Module) -> Dict[str, BlockSparseBase]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BlockSparseBase)}


def _rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        st = np.random.get_state(legacy=False)
        if st.get("bit_generator") == "MT19937":
            # Stored as torch/python types so the file loads with weights_only=True.
            state["numpy"] = {"key": torch.from_numpy(st["state"]["key"].astype("int64")),
                              "pos": int(st["state"]["pos"]), "has_gauss": int(st["has_gauss"]),
                              "gauss": float(st["gauss"])}
    except ImportError:
        pass
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state:
        if torch.cuda.is_available():
            cuda = list(state["cuda"])
            n = torch.cuda.device_count()
            if len(cuda) != n:
                warnings.warn(f"checkpoint holds CUDA RNG states of {len(cuda)} devices, this "
                              f"process sees {n}: restoring the first {min(n, len(cuda))}")
            for i, s in enumerate(cuda[:n]):
                torch.cuda.set_rng_state(s, i)
        else:
            warnings.warn("checkpoint holds CUDA RNG states but CUDA is not available here; "
                          "they were not restored")
    if "numpy" in state:
        try:
            import numpy as np

            st = state["numpy"]
            np.random.set_state(("MT19937", st["key"].numpy().astype("uint32"), st["pos"],
                                 st["has_gauss"], st["gauss"]))
        except ImportError:
            warnings.warn("checkpoint holds a NumPy RNG state but NumPy is not installed")


# ---------------------------------------------------------------------------------- save


def save(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
         scheduler: Any = None, **extra: Any) -> None:
    """Write ``model`` (+ ``optimizer``, ``scheduler``, RNG states and ``extra``) to ``path``
    atomically.

    ``scheduler`` is anything with ``state_dict()`` / ``load_state_dict()`` (the sparsity
    scheduler, a torch LR scheduler). ``extra`` keyword values (step counters, config) are
    stored as-is and returned by :func:`load`; keep them to tensors, numbers, strings, lists,
    tuples and dicts so the file loads with ``weights_only=True``.

    >>> import os, tempfile, dsl_kernels
    >>> emb = dsl_kernels.SparseEmbeddingBag(10, 4, density=0.5, block_size=2)
    >>> dsl_kernels.save(os.path.join(tempfile.mkdtemp(), "c.dsl"), emb, epoch=1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if scheduler is not None and not hasattr(scheduler, "state_dict"):
        raise TypeError(f"scheduler must have state_dict()/load_state_dict(), got "
                        f"{type(scheduler).__name__}")
    payload = {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "pools": {name: _pool_meta(m) for name, m in _pools(model).items()},
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": _rng_state(),
        "extra": dict(extra),
        "versions": {"torch": str(torch.__version__), "dsl_kernels": str(_version())},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    header = json.dumps({"format_version": FORMAT_VERSION, "payload_bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest()}).encode() + b"\n"
    _atomic_write(os.fspath(path), [MAGIC, header, data])


def _version() -> str:
    from . import __version__

    return __version__


def _atomic_write(path: str, chunks: List[Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# ---------------------------------------------------------------------------------- read


def read_payload(path: str, weights_only: bool = True) -> Dict[str, Any]:
    """Read and integrity-check a checkpoint file; return its payload dict (CPU tensors).

    Raises :class:`CheckpointError` for a missing magic, unknown format version, truncated or
    corrupted bytes. ``weights_only=False`` allows arbitrary pickled objects in the scheduler
    state or ``extra`` (only for files you trust)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r} does not exist") from None
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"{path!r} is not a dsl_kernels checkpoint (bad magic bytes; "
                              f"was it written by dsl_kernels.save?)")
    nl = raw.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER)
    if nl < 0:
        raise CheckpointError(f"{path!r}: checkpoint header is truncated or corrupt")
    try:
        header = json.loads(raw[len(MAGIC):nl].decode())
        version = int(header["format_version"])
        n = int(header["payload_bytes"])
        digest = str(header["sha256"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{path!r}: checkpoint header is corrupt") from None
    if version > FORMAT_VERSION or version < 1:
        raise CheckpointError(f"{path!r}: checkpoint format version {version} is not supported "
                              f"by this dsl_kernels (reads versions 1..{FORMAT_VERSION})")
    data = memoryview(raw)[nl + 1:]
    if len(data) < n:
        raise CheckpointError(f"{path!r} is truncated: {len(data)} of {n} payload bytes present")
    if len(data) > n:
        raise CheckpointError(f"{path!r} has {len(data) - n} unexpected trailing bytes")
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path!r} is corrupt: SHA-256 of the payload does not match")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
    except Exception as e:
        hint = (" (pass weights_only=False to load arbitrary objects from a trusted file)"
                if weights_only else "")
        raise CheckpointError(f"{path!r}: payload could not be unpickled: {e}{hint}") from e
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{path!r}: payload is not a dsl_kernels checkpoint")
    return payload


# -------------------------------------------------------------------------------- verify


def _check_coord(name: str, coord: Tensor, m: BlockSparseBase, budget: int) -> None:
    if coord.dtype != torch.int64 or coord.dim() != 1 or coord.numel() != budget:
        raise CheckpointError(f"{name}.coord must be int64[{budget}], got "
                              f"{coord.dtype}{list(coord.shape)}")
    total = m.num_rows * m.num_blocks
    if coord.numel() and (int(coord.min()) < -1 or int(coord.max()) >= total):
        raise CheckpointError(f"{name}.coord holds a block id outside [-1, {total}) "
                              f"(num_rows={m.num_rows} x num_blocks={m.num_blocks})")
    act = coord[coord >= 0]
    if torch.unique(act).numel() != act.numel():
        raise CheckpointError(f"{name}.coord names the same block in two slots")
    row = torch.div(act, m.num_blocks, rounding_mode="floor")
    col = act - row * m.num_blocks
    for t in m.tables:  # in a collection, table t only owns columns j < NB_t
        mine = (row >= t.row_start) & (row < t.row_start + t.num_rows)
        if bool((col[mine] >= t.num_blocks).any()):
            raise CheckpointError(f"{name}.coord holds a block past the last column block of "
                                  f"table {t.name!r} (num_blocks={t.num_blocks})")
    # Index consistency: the derived CSR index rebuilt from this coord must describe it.
    from .backends.reference.rebuild_index import rebuild_index
    from .format import popcount64

    row_ptr, row_slots, row_mask = rebuild_index(coord, m.num_rows, m.num_blocks)
    n_act = act.numel()
    if int(row_ptr[-1]) != n_act or not bool((row_slots[n_act:] == -1).all()):
        raise CheckpointError(f"{name}: the row index rebuilt from coord is inconsistent")
    if int(popcount64(row_mask).sum()) != n_act:
        raise CheckpointError(f"{name}: the row mask rebuilt from coord is inconsistent")
    slots = row_slots[:n_act].long()
    if n_act and not bool((torch.sort(act).values == coord[slots]).all()):
        raise CheckpointError(f"{name}: row_slots rebuilt from coord is inconsistent")


def _verify_model(payload: Dict[str, Any], model: nn.Module, resize_pools: bool = False
                  ) -> Dict[str, int]:
    """Checks the model part; returns ``{pool name: saved budget}`` of the pools to resize."""
    saved, current = payload["model"], model.state_dict()
    pools, metas = _pools(model), payload.get("pools", {})
    if not isinstance(metas, dict) or set(pools) != set(metas):
        raise CheckpointError(f"checkpoint has sparse modules {sorted(metas)}, the model has "
                              f"{sorted(pools)}")
    resize: Dict[str, int] = {}
    expect = {k: tuple(v.shape) for k, v in current.items() if isinstance(v, Tensor)}
    for name, m in pools.items():
        want = metas[name].get("budget")
        if resize_pools and isinstance(want, int) and want > 0 and want != m.budget:
            resize[name] = want
            prefix = name + "." if name else ""
            for key, shape in m.slot_state_shapes(want).items():
                expect[prefix + key] = shape
    for name, m in pools.items():
        want, have = metas[name], _pool_meta(m)
        if name in resize:
            have["budget"] = resize[name]
        for field in ("class", "block_size", "num_rows", "num_blocks", "dtype", "tables",
                      "budget"):
            if want.get(field) != have[field]:
                label = name or "<model>"
                hint = (" (resuming dense-to-sparse training after the pool shrank? pass "
                        "resize_pools=True)" if field == "budget" else "")
                raise CheckpointError(f"sparse module {label!r}: checkpoint has {field}="
                                      f"{want.get(field)!r}, the model has {have[field]!r}"
                                      f"{hint}")
    if not isinstance(saved, dict):
        raise CheckpointError("checkpoint model state is not a dict")
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model: missing keys {missing[:8]}, "
                              f"unexpected keys {unexpected[:8]}")
    for k, cur in current.items():
        s = saved[k]
        if isinstance(cur, Tensor):
            if not isinstance(s, Tensor):
                raise CheckpointError(f"checkpoint entry {k!r} is not a tensor")
            if tuple(s.shape) != expect[k]:
                raise CheckpointError(f"checkpoint entry {k!r} has shape {tuple(s.shape)}, the "
                                      f"model's is {expect[k]}")
            if s.dtype != cur.dtype:
                raise CheckpointError(f"checkpoint entry {k!r} has dtype {s.dtype}, the model's "
                                      f"is {cur.dtype}")
    for name, m in pools.items():
        prefix = name + "." if name else ""
        _check_coord(name or "<model>", saved[prefix + "coord"], m, resize.get(name, m.budget))
    return resize


def _verify_optimizer(saved: Any, optimizer: torch.optim.Optimizer,
                      new_shapes: Dict[int, Tuple[int, ...]]) -> None:
    """``new_shapes``: ``{id(param): shape}`` of parameters whose shape the load changes."""
    if not isinstance(saved, dict) or "param_groups" not in saved or "state" not in saved:
        raise CheckpointError("checkpoint optimizer state is malformed")
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        raise CheckpointError(f"checkpoint optimizer has {len(saved['param_groups'])} param "
                              f"groups, the optimizer has {len(groups)}")
    id_to_param = {}
    for i, (sg, g) in enumerate(zip(saved["param_groups"], groups)):
        if len(sg["params"]) != len(g["params"]):
            raise CheckpointError(f"optimizer param group {i}: checkpoint has "
                                  f"{len(sg['params'])} parameters, the optimizer has "
                                  f"{len(g['params'])}")
        id_to_param.update(zip(sg["params"], g["params"]))
    cur_state = optimizer.state
    for pid, st in saved["state"].items():
        if pid not in id_to_param:
            raise CheckpointError(f"checkpoint optimizer state names parameter {pid!r}, which no "
                                  f"param group holds")
        p = id_to_param[pid]
        pshape = new_shapes.get(id(p), tuple(p.shape))
        cur = {} if id(p) in new_shapes else cur_state.get(p, {})
        for k, v in st.items():
            if not isinstance(v, Tensor):
                continue
            c = cur.get(k)
            if isinstance(c, Tensor) and tuple(c.shape) != tuple(v.shape):
                raise CheckpointError(f"optimizer state {k!r} of a parameter of shape "
                                      f"{pshape} has shape {tuple(v.shape)} in the "
                                      f"checkpoint but {tuple(c.shape)} here")
            if c is None and v.dim() == len(pshape) and v.dim() > 0 and tuple(v.shape) != pshape:
                raise CheckpointError(f"optimizer state {k!r} has shape {tuple(v.shape)} in the "
                                      f"checkpoint, its parameter has shape {pshape}")


def verify(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
           scheduler: Any = None, weights_only: bool = True, resize_pools: bool = False
           ) -> Dict[str, Any]:
    """Every check :func:`load` does, without loading; returns the payload (with the pools to
    resize under ``"_resize"``)."""
    payload = read_payload(path, weights_only)
    resize = _verify_model(payload, model, resize_pools)
    payload["_resize"] = resize
    if optimizer is not None:
        if payload.get("optimizer") is None:
            raise CheckpointError("checkpoint holds no optimizer state but an optimizer was given")
        pools = _pools(model)
        new_shapes = {id(pools[n].values): (b, pools[n].block_size) for n, b in resize.items()}
        _verify_optimizer(payload["optimizer"], optimizer, new_shapes)
    if scheduler is not None:
        if payload.get("scheduler") is None:
            raise CheckpointError("checkpoint holds no scheduler state but a scheduler was given")
        if not hasattr(scheduler, "load_state_dict"):
            raise TypeError(f"scheduler must have load_state_dict(), got "
                            f"{type(scheduler).__name__}")
    return payload


# ---------------------------------------------------------------------------------- load


def load(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
         scheduler: Any = None, restore_rng: bool = True, weights_only: bool = True,
         resize_pools: Optional[bool] = None) -> Dict[str, Any]:
    """Verify ``path`` against ``model`` (+ ``optimizer``, ``scheduler``), then load all of them
    (and the RNG states, unless ``restore_rng=False``). Returns the ``extra`` dict given to
    :func:`save`.

    Raises :class:`CheckpointError` (a ``ValueError``) for a corrupt, truncated or mismatched
    file; in that case model, optimizer, scheduler and RNG are exactly as before the call.
    The index of every sparse module is rebuilt on its own device. ``resize_pools=True``
    accepts a checkpoint whose pool budget differs from the module's (dense-to-sparse training
    shrinks the pool) and resizes the pool in place (the ``values`` Parameter object is kept,
    so optimizers built on it stay valid); otherwise a budget mismatch is an error. The default
    (``None``) resizes only when ``scheduler`` is a dense-to-sparse one
    (``scheduler.schedule == "dense_to_sparse"``).

    >>> import os, tempfile, torch, dsl_kernels
    >>> emb = dsl_kernels.SparseEmbeddingBag(10, 4, density=0.5, block_size=2)
    >>> p = os.path.join(tempfile.mkdtemp(), "c.dsl")
    >>> dsl_kernels.save(p, emb, step=3)
    >>> dsl_kernels.load(p, dsl_kernels.SparseEmbeddingBag(10, 4, density=0.5, block_size=2))
    {'step': 3}
    """
    if resize_pools is None:
        resize_pools = getattr(scheduler, "schedule", None) == "dense_to_sparse"
    payload = verify(path, model, optimizer, scheduler, weights_only, resize_pools)
    resize = payload.pop("_resize")
    pools = _pools(model)

    # Back up what the commit overwrites, so a failure half-way can be rolled back.
    backup_pools = {n: pools[n].pool_tensors() for n in resize}
    backup_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    backup_opt = None if optimizer is None else copy.deepcopy(optimizer.state_dict())
    backup_sched = None if scheduler is None else copy.deepcopy(scheduler.state_dict())
    backup_sched_vars = (dict(vars(scheduler)) if scheduler is not None
                         and hasattr(scheduler, "__dict__") else None)
    backup_rng = _rng_state() if restore_rng else None
    try:
        for n, budget in resize.items():
            pools[n].resize_pool_(budget)
        model.load_state_dict(payload["model"], strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(payload["scheduler"])
        if restore_rng:
            _set_rng_state(payload.get("rng", {}))
    except Exception as e:
        for n, saved_pool in backup_pools.items():
            pools[n].restore_pool_tensors(saved_pool)
        model.load_state_dict(backup_model, strict=True)
        if backup_opt is not None:
            optimizer.load_state_dict(backup_opt)
        if backup_sched is not None:
            try:
                scheduler.load_state_dict(backup_sched)
            except Exception:
                # The scheduler refuses its own state: put its attributes back as they were.
                if backup_sched_vars is not None:
                    vars(scheduler).clear()
                    vars(scheduler).update(backup_sched_vars)
        if backup_rng is not None:
            _set_rng_state(backup_rng)
        raise CheckpointError(f"loading {os.fspath(path)!r} failed and was rolled back: "
                              f"{type(e).__name__}: {e}") from e
    return payload.get("extra", {})
