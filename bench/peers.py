"""Peer implementations the benchmarks compare against, each behind one small factory so every
benchmark builds them the same way and runs them on the same indices in the same run.

* :func:`fbgemm_tbe` - FBGEMM's table-batched embedding (``fbgemm-gpu-cpu`` on CPU,
  ``fbgemm-gpu`` on CUDA): one dense table, the optimizer fused into ``backward()``
  (``EXACT_ROWWISE_ADAGRAD`` / ``EXACT_SGD``; FBGEMM's CPU mode has no Adam). ``None`` when
  fbgemm_gpu does not import, so benchmarks simply drop the rows.
* :func:`fbgemm_version` - the installed version, for the table headers.

Example::

    >>> import torch
    >>> from bench.peers import fbgemm_tbe, to_fbgemm_inputs
    >>> tbe = fbgemm_tbe(100, 8, "sgd", lr=0.1)      # None without fbgemm_gpu
    >>> idx, off = to_fbgemm_inputs(torch.tensor([1, 2, 3]), torch.tensor([0, 2]))
    >>> off.tolist()
    [0, 2, 3]
    >>> tbe is None or tuple(tbe(idx, off).shape) == (2, 8)
    True
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

# dsl optimizer name -> FBGEMM EmbOptimType member name.
FBGEMM_OPTIMIZERS = {"rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD", "sgd": "EXACT_SGD",
                     "adagrad": "EXACT_ADAGRAD"}


def _fbgemm():
    """``(training ops module, EmbOptimType)`` or None when fbgemm_gpu does not import."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fbgemm_gpu import split_table_batched_embeddings_ops_training as tbe
            from fbgemm_gpu.split_embedding_configs import EmbOptimType
    except Exception:  # not installed, or built for another torch
        return None
    return tbe, EmbOptimType


def fbgemm_version() -> Optional[str]:
    if _fbgemm() is None:
        return None
    import fbgemm_gpu

    return getattr(fbgemm_gpu, "__version__", "?")


def fbgemm_tbe(num_embeddings: int, dim: int, optimizer: str, lr: float = 0.01,
               device: str = "cpu", mode: str = "sum", eps: float = 1e-8):
    """FBGEMM TBE holding one dense ``[num_embeddings, dim]`` fp32 table with the optimizer
    fused into its backward, or None (fbgemm missing, or no such optimizer in FBGEMM).
    Call it as ``tbe(indices, offsets)`` with ``offsets`` of length ``num_bags + 1``
    (:func:`to_fbgemm_inputs`)."""
    mods = _fbgemm()
    if mods is None or optimizer not in FBGEMM_OPTIMIZERS:
        return None
    tbe, EmbOptimType = mods
    if device == "cpu":
        loc, comp = tbe.EmbeddingLocation.HOST, tbe.ComputeDevice.CPU
    else:
        loc, comp = tbe.EmbeddingLocation.DEVICE, tbe.ComputeDevice.CUDA
    pooling = {"sum": tbe.PoolingMode.SUM, "mean": tbe.PoolingMode.MEAN}[mode]
    return tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(num_embeddings, dim, loc, comp)],
        optimizer=getattr(EmbOptimType, FBGEMM_OPTIMIZERS[optimizer]), learning_rate=lr, eps=eps,
        pooling_mode=pooling, device=torch.device(device))


def to_fbgemm_inputs(indices: torch.Tensor, offsets: torch.Tensor):
    """``nn.EmbeddingBag``-style ``(indices, offsets[num_bags])`` -> FBGEMM's ``(indices,
    offsets[num_bags + 1])`` (int64, the same entries)."""
    idx = indices.long()
    end = torch.tensor([idx.numel()], dtype=torch.int64, device=idx.device)
    return idx, torch.cat([offsets.long(), end])
