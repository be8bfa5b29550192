"""Shape-keyed launch heuristics of the Triton backend (no autotuning: the choice must be cheap,
deterministic and identical run to run, which deterministic mode relies on).

Every kernel works on a tile ``[rows-or-bags, NBT, BP]``: ``NBT`` blocks of the row, ``BP``
columns of each block (``BP = next_pow2(B)`` capped, so a block wider than the cap is split into
``CB`` column chunks). Keeping blocks as their own axis means the bitmask rank (about 20 integer
ops) is computed once per block, not once per column.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import triton

# Widest column tile a program handles: 128 fp32 = 512 bytes per row (four full 128-byte lines).
MAX_TILE = 128
# Elements (G x tile) per program: 8 per thread at 4 warps. Registers per element (~13: the
# fp32 accumulator, the value, a 64-bit address, the slot chain) cap what one SM keeps in
# flight; smaller programs at the same total give more warps to hide gather latency.
# (sm_90 build: ~110-145 registers per thread -> 4 programs of 4 warps per SM.) Override with
# DSL_TRITON_ELEMS to tune on a new GPU.
ELEMS = int(os.environ.get("DSL_TRITON_ELEMS", "1024"))


@dataclass(frozen=True)
class TileConfig:
    NBT: int  # blocks per tile (power of two)
    BP: int  # columns per block in the tile (power of two >= min(B, MAX_TILE))
    CB: int  # column chunks per block (B > BP)
    n_block_tiles: int
    G: int  # bags (lookup) or rows (segment kernels) per program
    num_warps: int

    @property
    def n_col_tiles(self) -> int:
        return self.n_block_tiles * self.CB


def tile_config(num_blocks: int, block_size: int, avg_len: float = 1.0,
                whole_blocks: bool = False, max_g: int = 64) -> TileConfig:
    """Tile for ``D = num_blocks * block_size`` columns.

    ``avg_len`` (entries per bag) picks how many bags share a program: tiny bags need many in
    flight per program to hide the gather latency, long bags already loop long enough.
    ``whole_blocks`` forces a whole block into one tile (growth scores need the block's norm).
    """
    B, NB = block_size, num_blocks
    BP = triton.next_power_of_2(B)
    if not whole_blocks:
        BP = min(BP, MAX_TILE)
    CB = triton.cdiv(B, BP)
    NBT = max(1, min(triton.next_power_of_2(NB), MAX_TILE // BP))
    n_block_tiles = triton.cdiv(NB, NBT)
    tile = NBT * BP
    # About ELEMS elements per program (G bags x tile columns).
    G = max(1, min(max_g, ELEMS // tile))
    if avg_len >= 32:
        G = max(1, min(G, 8))  # long bags: fewer per program, less idle time on uneven lengths
    elems = G * tile
    num_warps = 8 if elems >= 4096 else 4 if elems >= 1024 else 2 if elems >= 256 else 1
    return TileConfig(NBT, BP, CB, n_block_tiles, G, num_warps)
