"""``dropout_mask="hash8"``: one threefry call per group of four rows and tile, then 2 integer ops per weight.

The mask of a ``(rows, n_cols)`` dropout array (flax's mask viewed as ``(B * H * Tq, Tk)``, or ``(Tq, Tk)``
broadcast) is a function of the key and the global ``(row, column)`` index only, so every tiling, both paths and
any device count draw the same mask. Rows come in groups of four, ``SUBLANES`` rows apart, exactly as the fast
masks' groups (:mod:`jdrop.attention._dropout_mask`): in each block of 32 rows starting at a multiple of 32, rows
``8 s + r`` (``s < 4``, ``r < 8``) form group ``r``, whose counter row ``R`` is its first (``s = 0``) row, and
row ``8 s + r`` is the group's member ``s``. Then, with uint32 arithmetic (wrapping):

- per group: ``(a, b) = threefry2x32(key, (0x68617368, R))`` and ``b |= 1`` (an odd multiplier), the one strong
  hash, shared by every column of the group's four rows;
- per column ``c``: ``y = c * 0x9E3779B9``;
- per group and column (one 32-bit word for four weights): ``x = (a ^ y) * b``; ``x ^= x >> 16``;
- per weight (member ``s``): keep iff ``x * K[s] <= T``, with odd constants
  ``K = (0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F)`` and ``T = ceil(keep * 256) * 2**24 - 1``: the top
  8 bits of the product are the member's uniform byte, ``x * K[s] <= T`` iff that byte is below
  ``ceil(keep * 256)``.

So the realised keep probability is ``ceil(keep * 256) / 256`` (the fast8 mask's), and kept weights are scaled
by its inverse (unbiased). At keep 1 (rate 0), ``T`` wraps to ``2**32 - 1`` and every weight is kept; at keep 0
(rate 1) it wraps the same way, and the factor, 0, drops everything.

Cost, counted per weight over a tile: 2 ops (the multiply and the compare), 1 op (four per word), and the group's
threefry call (about 120 ops) shared by the tile's columns: 120 / (4 * block_k). Rows of different groups draw
from different threefry outputs (as independent as threefry's outputs); within a group, the words of different
columns and the four members' bytes of one word come from the cheap mix, whose quality the tests check.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdrop import masks

__all__ = ["COLUMN_MULTIPLIER", "COUNTER_HIGH", "MEMBERS", "MULTIPLIERS", "SUBLANES", "threshold", "tile_keep"]

SUBLANES = 8
"""Rows between the members of a group (one (8, 128) vector tile of 32-bit values on TPU)."""
MEMBERS = 4
"""Rows per group: the four 8-bit uniforms of one 32-bit word."""
COUNTER_HIGH = 0x68617368
"""High word of every group's threefry counter (``"hash"`` in ASCII): no flat index of the exact mask uses it."""
COLUMN_MULTIPLIER = 0x9E3779B9
"""``floor(2**32 / golden ratio)``: spreads column indices over the word's bits."""
MULTIPLIERS = (0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F)
"""Member ``s``'s odd multiplier: its uniform byte is the top byte of ``x * MULTIPLIERS[s]``."""


def threshold(keep: jax.Array) -> jax.Array:
    """``ceil(keep * 256) * 2**24 - 1`` as uint32 (wrapping to ``2**32 - 1`` at keep 0 and 1): the keep test's bound."""
    levels = jnp.ceil(jnp.asarray(keep, jnp.float32) * np.float32(256)).astype(jnp.uint32)
    return (levels << np.uint32(24)) - np.uint32(1)


def _member_multipliers() -> jax.Array:
    """``MULTIPLIERS`` as a ``(4, 1, 1)`` uint32 array, built from an iota (a Pallas kernel captures no arrays)."""
    member = lax.broadcasted_iota(jnp.int32, (MEMBERS, 1, 1), 0)
    out = jnp.full((MEMBERS, 1, 1), np.uint32(MULTIPLIERS[-1]))
    for s in reversed(range(MEMBERS - 1)):
        out = jnp.where(member == s, np.uint32(MULTIPLIERS[s]), out)
    return out


def tile_keep(key_data: Any, rows: jax.Array, cols: jax.Array, bound: jax.Array) -> jax.Array:
    """Keep decisions of a tile: ``(..., 4 * n, m)`` bool from its groups' counter rows and its columns.

    Args:
      key_data: a threefry key's two uint32 words.
      rows: uint32 ``(..., n, 1)``: the global rows of the tile's groups (its first rows), block-major as
        ``first_rows`` orders them (``n`` a multiple of 8).
      cols: uint32 ``(1, m)``: the tile's global columns.
      bound: the uint32 bound ``T`` of :func:`threshold`.

    Returns:
      bool ``(..., 4 * n, m)``: row ``32 g + 8 s + r`` of the tile is member ``s`` of group ``8 g + r``.
    """
    a, b = masks.threefry2x32(key_data[0], key_data[1], np.uint32(COUNTER_HIGH), rows)
    y = cols * np.uint32(COLUMN_MULTIPLIER)
    x = (a ^ y) * (b | np.uint32(1))
    x = x ^ (x >> np.uint32(16))
    *lead, n, m = x.shape
    # The reshapes move whole (8, m) slabs of 32-bit values (whole vector tiles on TPU), not booleans.
    words = x.reshape(*lead, n // SUBLANES, 1, SUBLANES, m) * _member_multipliers()
    return (words <= bound).reshape(*lead, n * MEMBERS, m)
