"""Threefry bits: ``jax.random.bits`` for threefry keys, unrolled so that XLA fuses it into the consumer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdrop._typing import KeyLike
from jdrop._validation import canonical_key
from jdrop.masks import _lowering
from jdrop.masks._index import flat_index

__all__ = ["Layout", "bits_at", "random_bits", "threefry2x32", "threefry_layout"]

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotate_left(v: jax.Array, distance: int) -> jax.Array:
    return (v << np.uint32(distance)) | (v >> np.uint32(32 - distance))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), unrolled in ``jnp`` uint32 ops.

    Bit-identical to ``jax.random``'s threefry primitive; written out so that XLA can fuse it
    into the consumers of the bits on every backend.
    """
    k2 = k0 ^ k1 ^ np.uint32(0x1BD11BDA)
    schedule = (k0, k1, k2)
    x0 = x0 + k0
    x1 = x1 + k1
    for block in range(5):
        for rotation in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, rotation)
            x1 = x1 ^ x0
        x0 = x0 + schedule[(block + 1) % 3]
        x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


class Layout(NamedTuple):
    """Where ``jax.random.bits(key, shape, dtype)`` of a threefry key takes each element's word from.

    - ``partitionable`` (``jax_threefry_partitionable=True``, JAX's default): element ``i`` (row-major)
      is ``t0 ^ t1`` (32-bit words) or ``t0 << 32 | t1`` (64-bit) of ``threefry2x32(key, (i >> 32, i & 0xffffffff))``.
    - original (``False``): JAX hashes the counters ``0 .. m-1`` of the whole array's ``m`` words
      (``m = size`` for 32-bit words, ``2 size`` for 64-bit) in two halves, pairing counter ``j`` with
      ``j + ceil(m / 2)``: word ``j < m/2`` is ``t0`` of ``threefry2x32(key, (j, j + m/2))``, word ``j >= m/2``
      is ``t1`` of ``(j - m/2, j)`` (the last pair of an odd ``m`` takes 0 as its second counter). A 64-bit element
      ``i`` is words ``i`` (high) and ``size + i`` (low): ``t0 << 32 | t1`` of ``(i, size + i)``. Either way one
      threefry call per element, as many as the partitionable layout makes, so the fused draw costs the same;
      it depends on the array's ``size``.

    ``size`` may be a traced ``uint32`` scalar (a tiled draw that carries it as an operand).
    """

    partitionable: bool
    size: Any
    wide: bool  # 64-bit words (the uniforms of a float64 bernoulli under jax_enable_x64)


def threefry_layout(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.uint32) -> Layout | None:
    """The layout of ``jax.random.bits(key, shape, dtype)`` now, if jdrop's unrolled threefry computes it exactly.

    None (use JAX's own draw) for a key of another implementation (rbg, unsafe_rbg, philox, a user's), and
    for arrays past the layouts written here: ``2**32`` elements or more (partitionable), or ``2**32 - 1``
    words or more (the original layout splits the key into blocks there). Read when a function is traced:
    ``jax_threefry_partitionable`` is a global config.
    """
    if str(jax.random.key_impl(key)) != "threefry2x32":
        return None
    size = math.prod(int(d) for d in shape)
    wide = np.dtype(dtype) == np.uint64
    if jax.config.jax_threefry_partitionable:  # type: ignore[attr-defined]
        return Layout(True, size, wide) if size < 2**32 else None
    return Layout(False, size, wide) if size * (2 if wide else 1) < 2**32 - 1 else None


def random_bits(key: KeyLike, shape: Sequence[int], *, broadcast_to: Sequence[int] | None = None,
                dtype: Any = jnp.uint32) -> jax.Array:
    """Uniform bits, equal to ``jax.random.bits(key, shape, dtype)`` (``uint32`` or ``uint64``) in every config.

    For threefry keys the bits are computed by a fusible unrolled threefry (see :mod:`jdrop.masks`,
    "How the bits are drawn"), in the counter layout JAX uses under the current
    ``jax_threefry_partitionable`` (:class:`Layout`); XLA then computes them inside whatever consumes
    them, so they are never stored. Every other key implementation, and threefry arrays past
    :func:`threefry_layout`'s limits, draw with ``jax.random.bits`` itself. When the caller broadcasts
    the bits to a larger shape (``broadcast_to``), they are drawn with JAX's own lowering and
    materialised at ``shape`` (see the comment in the code). :func:`jdrop.masks.set_bits_lowering`
    chooses JAX's lowering everywhere or on some backends.

    Args:
      key: a single PRNG key (typed, or raw of the default implementation).
      shape: the shape of the bits.
      broadcast_to: the shape of the consumer the bits are broadcast into, if any.
      dtype: ``jnp.uint32`` (default) or ``jnp.uint64`` (under ``jax_enable_x64``).

    Returns:
      ``dtype`` array of ``shape``.
    """
    key = canonical_key(key)
    shape = tuple(int(d) for d in shape)
    dtype = np.dtype(dtype)
    layout = threefry_layout(key, shape, dtype)
    # Compile hazard: fused into a consumer that broadcasts them, the 20 unrolled rounds can be
    # invariant in the consumer's inner loop, where LLVM's vectorizer may run for hours (AVX-512).
    broadcast = broadcast_to is not None and tuple(int(d) for d in broadcast_to) != shape
    if layout is None or broadcast:
        return jax.random.bits(key, shape, dtype)
    data = jax.random.key_data(key)
    table = _lowering.current()
    lowerings = set(table.values())
    if lowerings == {"fused"}:
        return _threefry_bits(data, shape, layout)
    if lowerings == {"jax"}:
        return jax.random.bits(key, shape, dtype)
    branches = {
        platform: partial(_threefry_bits if lowering == "fused" else _jax_bits, shape=shape, layout=layout)
        for platform, lowering in table.items()
    }
    return lax.platform_dependent(data, **branches)


def _jax_bits(data: jax.Array, shape: tuple[int, ...], layout: Layout) -> jax.Array:
    dtype = jnp.uint64 if layout.wide else jnp.uint32
    return jax.random.bits(jax.random.wrap_key_data(data, impl="threefry2x32"), shape, dtype)


@partial(jax.jit, static_argnums=(1, 2))
def _threefry_bits(data: jax.Array, shape: tuple[int, ...], layout: Layout) -> jax.Array:
    """The bits of :func:`random_bits` for threefry key data ``data`` (``uint32[2]``).

    A nested ``jit``: it is traced once per shape and layout and lowered once per program, however many
    layers (forward and backward) draw bits of that shape, which keeps tracing and lowering
    time flat in depth. XLA inlines the call before fusion, so the bits still fuse into their
    consumers.
    """
    return bits_at(data, jnp.zeros(shape, jnp.uint32), flat_index(shape), layout)


def bits_at(key_data: jax.Array, index_hi: jax.Array, index_lo: jax.Array, layout: Layout | None = None) -> jax.Array:
    """The bits of ``jax.random.bits(key, shape, dtype)`` at flat indices ``index_hi * 2**32 + index_lo``.

    With the default ``layout`` (None: partitionable, ``uint32``), element ``i`` (row-major) of any shape
    is the word ``t0 ^ t1`` of ``threefry2x32(key, (i >> 32, i & 0xffffffff))``: it depends on the key and
    ``i`` only, not on the shape. So a tiled computation can draw each tile's bits by global index
    and together the tiles hold exactly the bits of the whole array (this is how
    :func:`jdrop.dot_product_attention` draws flax's ``(B, H, Tq, Tk)`` dropout mask block by block).
    The original layout (``jax_threefry_partitionable=False``) and 64-bit words are :class:`Layout`'s:
    one threefry call per element too, by global index and the array's size.

    Args:
      key_data: a threefry key's data, ``uint32[2]`` (``jax.random.key_data(key)``).
      index_hi: ``uint32`` high words of the indices (zero below ``2**32`` elements; zero in the original layout).
      index_lo: ``uint32`` low words, broadcastable against ``index_hi``.
      layout: the counter layout and word width (:func:`threefry_layout`).

    Returns:
      ``uint32`` (``uint64`` for a wide layout) bits of the broadcast shape of the indices.
    """
    k0, k1 = key_data[0], key_data[1]
    if layout is None or layout.partitionable:
        t0, t1 = threefry2x32(k0, k1, index_hi, index_lo)
        return _join(t0, t1) if layout is not None and layout.wide else t0 ^ t1
    size = layout.size if isinstance(layout.size, jax.Array) else np.uint32(layout.size)
    if layout.wide:  # words i (high) and size + i (low): one counter pair
        return _join(*threefry2x32(k0, k1, index_lo, index_lo + size))
    half = (size >> np.uint32(1)) + (size & np.uint32(1))  # ceil(size / 2) counters in each half
    first = index_lo < half
    partner = index_lo + half
    x0 = jnp.where(first, index_lo, index_lo - half)
    x1 = jnp.where(first, jnp.where(partner < size, partner, np.uint32(0)), index_lo)
    t0, t1 = threefry2x32(k0, k1, x0, x1)
    return jnp.where(first, t0, t1)


def _join(high: jax.Array, low: jax.Array) -> jax.Array:
    """``high << 32 | low`` as ``uint64`` (JAX's 64-bit threefry words)."""
    return (high.astype(jnp.uint64) << np.uint64(32)) | low.astype(jnp.uint64)
