"""Global element indices: the counters that make a tile's bits the whole array's bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["flat_index", "index_words"]


def flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major element index as uint32, built from broadcasted iotas (partitionable)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        if shape[axis] > 1:
            index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    return index


def index_words(
    row: jax.Array, col: jax.Array, n_cols: int, *, n_rows: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """The ``(high, low)`` ``uint32`` words of the row-major flat index ``row * n_cols + col``, in 64 bits.

    With :func:`bits_at` this draws the bits of element ``(row, col)`` of a ``(n_rows, n_cols)`` array
    (any array, flattened to two dims: ``row`` may itself combine leading indices) by its global
    index, so a tile anywhere in the array gets exactly that array's bits: ``bits_at(key_data,
    *index_words(row, col, n_cols))`` equals ``jax.random.bits(key, (n_rows, n_cols))[row, col]``. The
    product is computed exactly in 64 bits from 16-bit halves (uint32 arithmetic only, so it runs on
    every backend without x64); when the static ``n_rows`` shows every index below ``2**32``, the high
    word is a constant 0 and the low word one multiply-add.

    Args:
      row: ``uint32`` row indices, ``< 2**32``.
      col: ``uint32`` column indices, ``< n_cols``, broadcastable against ``row``.
      n_cols: the array's number of columns (static, ``1 <= n_cols < 2**32``).
      n_rows: the array's number of rows, if known statically (enables the one-word form).

    Returns:
      ``(high, low)``: ``uint32`` words of the broadcast shape (``high`` a 0-d zero in the one-word form).
    """
    if n_rows is not None and n_rows * n_cols < 2**32:
        return jnp.zeros((), jnp.uint32), row * np.uint32(n_cols) + col
    high, low = _wide_product(row, n_cols)
    low = low + col
    return high + (low < col).astype(jnp.uint32), low  # the carry of the low word


def _wide_product(a: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
    """``a * c`` as (high, low) ``uint32`` words, for ``uint32`` ``a`` and a static ``c < 2**32``."""
    a0, a1 = a & np.uint32(0xFFFF), a >> np.uint32(16)
    c0, c1 = np.uint32(c & 0xFFFF), np.uint32(c >> 16)
    p00, p01, p10, p11 = a0 * c0, a0 * c1, a1 * c0, a1 * c1
    middle = (p00 >> np.uint32(16)) + (p01 & np.uint32(0xFFFF)) + (p10 & np.uint32(0xFFFF))
    low = (p00 & np.uint32(0xFFFF)) | (middle << np.uint32(16))
    high = p11 + (p01 >> np.uint32(16)) + (p10 >> np.uint32(16)) + (middle >> np.uint32(16))
    return high, low
