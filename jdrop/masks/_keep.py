"""How bits become a keep decision: thresholds, realised keep probabilities, mask shapes, the keep mask."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jdrop._typing import KeyLike
from jdrop._validation import canonical_axis, keep_probability
from jdrop.masks._bits import random_bits

__all__ = ["THRESHOLD_BITS", "broadcast_shape", "keep_from_bits", "keep_mask", "keep_threshold", "realised_keep"]

THRESHOLD_BITS = 23
"""Resolution of the keep test: keep iff ``(bits >> 9) < ceil(keep * 2**23)`` (bernoulli's rule)."""

_THRESHOLD_ONE = float(2**THRESHOLD_BITS)


def keep_threshold(keep: jax.Array) -> jax.Array:
    """``ceil(keep * 2**23)`` as ``uint32``: the integer threshold of the keep test.

    ``keep`` must already be a float32 array in [0, 1] (the public functions check it).
    """
    return jnp.ceil(jnp.asarray(keep, jnp.float32) * _THRESHOLD_ONE).astype(jnp.uint32)


def realised_keep(threshold: jax.Array) -> jax.Array:
    """The exact keep probability of the test with this threshold: ``threshold / 2**23``."""
    return threshold.astype(jnp.float32) / _THRESHOLD_ONE


def keep_from_bits(bits: jax.Array, threshold: jax.Array) -> jax.Array:
    """Bool keep decision: ``(bits >> 9) < threshold`` (the rule of ``jax.random.bernoulli``)."""
    return (bits >> np.uint32(32 - THRESHOLD_BITS)) < threshold


def broadcast_shape(shape: Sequence[int], broadcast_dims: Sequence[int] = ()) -> tuple[int, ...]:
    """Shape of the drawn mask: ``shape`` with every dim in ``broadcast_dims`` set to 1.

    A mask shared along those dims (as in flax's ``broadcast_dims``) is drawn once at this shape
    and broadcast. Negative dims count from the end.

    Raises:
      ValueError: if a dim is out of range for ``len(shape)`` or repeated.
      TypeError: if a dim is not an int.
    """
    shape = tuple(shape)
    ndim = len(shape)
    if isinstance(broadcast_dims, (int, np.integer)):
        broadcast_dims = (int(broadcast_dims),)
    seen = set()
    for dim in broadcast_dims:
        canonical = canonical_axis(dim, ndim, name="broadcast_dims")
        if canonical in seen:
            raise ValueError(f"`broadcast_dims` names dim {canonical} twice: {tuple(broadcast_dims)}.")
        seen.add(canonical)
    return tuple(1 if axis in seen else size for axis, size in enumerate(shape))


def keep_mask(key: KeyLike, shape: Sequence[int], rate: ArrayLike, *, broadcast_dims: Sequence[int] = ()) -> jax.Array:
    """The exact bool keep mask that :func:`jdrop.dropout` uses for this key, shape and rate.

    ``m_i = [u_i < 1 - rate]`` with ``u`` uniform on the 2**-23 grid drawn from ``key``; equal to
    ``jax.random.bernoulli(key, 1 - rate, mask_shape)`` broadcast to ``shape``, where
    ``mask_shape`` has size 1 along ``broadcast_dims`` (the mask is shared along those dims).
    ``P(m_i = 1) = ceil((1 - rate) * 2**23) / 2**23``.

    Args:
      key: a PRNG key.
      shape: shape of the mask.
      rate: drop probability in [0, 1], a Python float or a traced scalar.
      broadcast_dims: dims along which the mask is shared.

    Returns:
      bool array of ``shape``.
    """
    shape = tuple(int(d) for d in shape)
    mask_shape = broadcast_shape(shape, broadcast_dims)
    threshold = keep_threshold(keep_probability(rate))
    return jnp.broadcast_to(keep_from_bits(random_bits(key, mask_shape, broadcast_to=shape), threshold), shape)
