"""Threefry bits: ``jax.random.bits`` for threefry keys, unrolled so that XLA fuses it into the consumer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdrop._typing import KeyLike
from jdrop._validation import canonical_key
from jdrop.masks import _lowering
from jdrop.masks._index import flat_index

__all__ = ["bits_at", "random_bits", "threefry2x32"]

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


def random_bits(key: KeyLike, shape: Sequence[int], *, broadcast_to: Sequence[int] | None = None) -> jax.Array:
    """Uniform ``uint32`` bits, equal to ``jax.random.bits(key, shape, jnp.uint32)``.

    For threefry keys the bits are computed by a fusible unrolled threefry (see :mod:`jdrop.masks`,
    "How the bits are drawn"); XLA then computes them inside whatever consumes them, so they are never stored.
    When the caller broadcasts the bits to a larger shape (``broadcast_to``), they are drawn with
    JAX's own lowering instead and materialised at ``shape`` (see the comment in the code).
    :func:`jdrop.masks.set_bits_lowering` chooses JAX's lowering everywhere or on some backends.

    Args:
      key: a single PRNG key (typed or legacy raw).
      shape: the shape of the bits.
      broadcast_to: the shape of the consumer the bits are broadcast into, if any.

    Returns:
      ``uint32`` array of ``shape``.
    """
    key = canonical_key(key)
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    # Compile hazard: fused into a consumer that broadcasts them, the 20 unrolled rounds can be
    # invariant in the consumer's inner loop, where LLVM's vectorizer may run for hours (AVX-512).
    broadcast = broadcast_to is not None and tuple(int(d) for d in broadcast_to) != shape
    if str(jax.random.key_impl(key)) != "threefry2x32" or size >= 2**32 or broadcast:
        # Other generators are already fused or fast on their backend; >= 2**32 elements need
        # JAX's two-word counter, whose bits we then take as they are.
        return jax.random.bits(key, shape, jnp.uint32)
    data = jax.random.key_data(key)
    table = _lowering.current()
    lowerings = set(table.values())
    if lowerings == {"fused"}:
        return _threefry_bits(data, shape)
    if lowerings == {"jax"}:
        return jax.random.bits(key, shape, jnp.uint32)
    branches = {
        platform: (partial(_threefry_bits, shape=shape) if lowering == "fused" else partial(_jax_bits, shape=shape))
        for platform, lowering in table.items()
    }
    return lax.platform_dependent(data, **branches)


def _jax_bits(data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.bits(jax.random.wrap_key_data(data), shape, jnp.uint32)


@partial(jax.jit, static_argnums=(1,))
def _threefry_bits(data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The bits of :func:`random_bits` for threefry key data ``data`` (``uint32[2]``).

    A nested ``jit``: it is traced once per shape and lowered once per program, however many
    layers (forward and backward) draw bits of that shape, which keeps tracing and lowering
    time flat in depth. XLA inlines the call before fusion, so the bits still fuse into their
    consumers.
    """
    t0, t1 = threefry2x32(data[0], data[1], jnp.zeros(shape, jnp.uint32), flat_index(shape))
    return t0 ^ t1


def bits_at(key_data: jax.Array, index_hi: jax.Array, index_lo: jax.Array) -> jax.Array:
    """The bits of ``jax.random.bits(key, shape, jnp.uint32)`` at flat indices ``index_hi * 2**32 + index_lo``.

    JAX's partitionable threefry gives element ``i`` (row-major) of any shape the word
    ``t0 ^ t1`` of ``threefry2x32(key, (i >> 32, i & 0xffffffff))``: it depends on the key and
    ``i`` only, not on the shape. So a tiled computation can draw each tile's bits by global index
    and together the tiles hold exactly the bits of the whole array (this is how
    :func:`jdrop.dot_product_attention` draws flax's ``(B, H, Tq, Tk)`` dropout mask block by block).

    Args:
      key_data: a threefry key's data, ``uint32[2]`` (``jax.random.key_data(key)``).
      index_hi: ``uint32`` high words of the indices (zero below ``2**32`` elements).
      index_lo: ``uint32`` low words, broadcastable against ``index_hi``.

    Returns:
      ``uint32`` bits of the broadcast shape of the indices.
    """
    t0, t1 = threefry2x32(key_data[0], key_data[1], index_hi, index_lo)
    return t0 ^ t1
