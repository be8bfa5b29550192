"""Input checks and normalisation of the ``nn.EmbeddingBag`` call convention.

Every check runs before any op touches the pool, so bad input leaves values, index and
optimizer state untouched. The value checks (index range, offsets order) read data and so
synchronise on a GPU: ``validate=False`` on the module skips them, like FBGEMM's bounds-check
mode ``NONE``; the structural checks (dtype, shape, device) are free and always run.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

INDEX_DTYPES = (torch.int32, torch.int64)
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_config(num_embeddings: int, embedding_dim: int, density: float, block_size: int,
                 padding_idx: Optional[int]) -> Optional[int]:
    """Validate constructor arguments; return ``padding_idx`` normalised to ``[0, N)`` or None."""
    if not isinstance(num_embeddings, int) or num_embeddings <= 0:
        raise ValueError(f"num_embeddings must be a positive int, got {num_embeddings!r}")
    if not isinstance(embedding_dim, int) or embedding_dim <= 0:
        raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
    if not isinstance(density, (int, float)) or not (0.0 < float(density) <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if not isinstance(block_size, int) or block_size <= 0 or embedding_dim % block_size:
        raise ValueError(f"block_size must be a positive divisor of embedding_dim={embedding_dim}, "
                         f"got {block_size!r}")
    if padding_idx is not None:
        if not (-num_embeddings <= padding_idx < num_embeddings):
            raise ValueError(f"padding_idx must be within num_embeddings={num_embeddings}, "
                             f"got {padding_idx}")
        padding_idx = padding_idx % num_embeddings
    return padding_idx


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _check_device(name: str, t: Tensor, device: torch.device) -> None:
    if t.device.type != device.type or (device.index is not None and t.device.index is not None
                                        and t.device.index != device.index):
        raise ValueError(f"{name} is on {t.device} but the table is on {device}")


def normalize_bags(input: Tensor, offsets: Optional[Tensor], per_sample_weights: Optional[Tensor],
                   mode: str, include_last_offset: bool, num_embeddings: int,
                   device: torch.device, validate: bool = True
                   ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Turn the ``nn.EmbeddingBag.forward`` arguments into ``(indices 1-D, CSR offsets of
    num_bags + 1 entries, per_sample_weights 1-D or None)``, raising a clear error naming the
    argument for anything torch would reject (and a few things it silently accepts)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    # The value checks read tensor data (.item()), which breaks torch.compile(fullgraph=True);
    # a compiled graph skips them (the structural checks still run at trace time).
    validate = validate and not _compiling()
    if input.dtype not in INDEX_DTYPES:
        raise TypeError(f"input must be int32 or int64, got {input.dtype}")
    _check_device("input", input, device)
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("offsets must be None when input is 2-D (each row is a bag), "
                             f"got a tensor of shape {tuple(offsets.shape)}")
        num_bags, bag_len = input.shape
        indices = input.reshape(-1)
        offsets = torch.arange(0, (num_bags + 1) * bag_len, max(bag_len, 1), dtype=input.dtype,
                               device=input.device)[: num_bags + 1]
        if bag_len == 0:
            offsets = torch.zeros(num_bags + 1, dtype=input.dtype, device=input.device)
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets is required when input is 1-D")
        if not isinstance(offsets, Tensor):
            raise TypeError(f"offsets must be a Tensor, got {type(offsets).__name__}")
        if offsets.dtype not in INDEX_DTYPES:
            raise TypeError(f"offsets must be int32 or int64, got {offsets.dtype}")
        if offsets.dtype != input.dtype:
            raise TypeError(f"offsets dtype {offsets.dtype} does not match input dtype "
                            f"{input.dtype}")
        if offsets.dim() != 1:
            raise ValueError(f"offsets must be 1-D, got shape {tuple(offsets.shape)}")
        _check_device("offsets", offsets, device)
        indices = input
        if include_last_offset:
            if offsets.numel() == 0:
                raise ValueError("offsets must have at least one entry with include_last_offset=True")
        else:
            # No offsets means no bags (torch then ignores input): the CSR end is 0, not len(input).
            # new_full fills on the device: a torch.tensor([...], device=cuda) would be a
            # host-to-device copy, which synchronises (and cannot be captured in a CUDA graph).
            end = offsets.new_full((1,), indices.numel() if offsets.numel() else 0)
            offsets = torch.cat([offsets, end])
        if validate and offsets.numel():
            if int(offsets[0]) != 0:
                raise ValueError(f"offsets must start at 0, got offsets[0]={int(offsets[0])}")
            # Past-the-end first: otherwise the appended end (len(input)) would make an offset
            # past the end look like a decreasing pair.
            if int(offsets.max()) > indices.numel():
                raise ValueError(f"offsets point past the end of input: offset "
                                 f"{int(offsets.max())} > input length {indices.numel()}")
            if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
                raise ValueError("offsets must be non-decreasing")
    else:
        raise ValueError(f"input must be 1-D (with offsets) or 2-D (fixed-size bags), got "
                         f"{input.dim()}-D of shape {tuple(input.shape)}")

    if per_sample_weights is not None:
        if not isinstance(per_sample_weights, Tensor):
            raise TypeError("per_sample_weights must be a Tensor")
        if mode != "sum":
            raise ValueError(f"per_sample_weights is only supported with mode='sum', got "
                             f"mode={mode!r}")
        if per_sample_weights.shape != input.shape:
            raise ValueError(f"per_sample_weights must have the shape of input "
                             f"{tuple(input.shape)}, got {tuple(per_sample_weights.shape)}")
        if not per_sample_weights.is_floating_point():
            raise TypeError(f"per_sample_weights must be floating point, got "
                            f"{per_sample_weights.dtype}")
        _check_device("per_sample_weights", per_sample_weights, device)
        per_sample_weights = per_sample_weights.reshape(-1)

    if validate and indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0:
            raise IndexError(f"input contains a negative index ({lo})")
        if hi >= num_embeddings:
            raise IndexError(f"input contains index {hi}, out of range for num_embeddings="
                             f"{num_embeddings}")
    return indices.contiguous(), offsets.contiguous(), per_sample_weights
