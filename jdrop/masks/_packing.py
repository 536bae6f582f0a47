"""Bit packing: a bool mask kept 8 elements a byte (the ``"bits"`` residual)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["pack_bits", "unpack_bits"]


def pack_bits(mask: jax.Array) -> jax.Array:
    """Packs a bool array into ``uint8``, 8 elements a byte (little-endian within each byte).

    Element ``i`` (row-major) is bit ``i % 8`` of byte ``i // 8``; the last byte is padded with
    zeros. The result has shape ``(ceil(mask.size / 8),)``; :func:`unpack_bits` inverts it.
    """
    flat = jnp.ravel(mask).astype(jnp.uint8)
    pad = (-flat.size) % 8
    flat = jnp.pad(flat, (0, pad)).reshape(-1, 8)
    weights = jnp.asarray(1 << np.arange(8), jnp.uint8)
    return jnp.sum(flat * weights, axis=1, dtype=jnp.uint8)


def unpack_bits(packed: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Inverse of :func:`pack_bits`: the bool array of ``shape`` packed into ``packed``."""
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    bits = (packed[:, None] >> jnp.arange(8, dtype=jnp.uint8)) & np.uint8(1)
    return bits.reshape(-1)[:size].reshape(shape).astype(bool)
