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

__all__ = [
    "THRESHOLD_BITS",
    "WIDE_THRESHOLD_BITS",
    "bits_dtype",
    "broadcast_shape",
    "keep_from_bits",
    "keep_mask",
    "keep_threshold",
    "realised_keep",
]

THRESHOLD_BITS = 23
"""Resolution of the keep test: keep iff ``(bits >> 9) < ceil(keep * 2**23)`` (bernoulli's rule in float32)."""
WIDE_THRESHOLD_BITS = 52
"""The same in float64 (``jax_enable_x64``): keep iff ``(bits64 >> 12) < ceil(keep * 2**52)``."""


def keep_threshold(keep: jax.Array) -> jax.Array:
    """``ceil(keep * 2**23)`` as ``uint32`` (float32 ``keep``) or ``ceil(keep * 2**52)`` as ``uint64`` (float64).

    ``keep`` must already be a float array in [0, 1] (the public functions check it); its dtype is the
    dtype of bernoulli's uniforms (:func:`jdrop._validation.keep_probability`): float64 only under
    ``jax_enable_x64``. The threshold's dtype then says which bits the test reads (:func:`bits_dtype`).
    """
    keep = jnp.asarray(keep)
    if keep.dtype == np.float64:
        return jnp.ceil(keep * np.float64(2.0**WIDE_THRESHOLD_BITS)).astype(jnp.uint64)
    return jnp.ceil(keep.astype(jnp.float32) * np.float32(2.0**THRESHOLD_BITS)).astype(jnp.uint32)


def bits_dtype(threshold: jax.Array) -> np.dtype:
    """The words a threshold tests: ``uint32`` (23-bit uniforms) or ``uint64`` (52-bit, under x64)."""
    return np.dtype(np.uint64 if threshold.dtype == np.uint64 else np.uint32)


def realised_keep(threshold: jax.Array) -> jax.Array:
    """The exact keep probability of the test with this threshold: ``threshold / 2**23`` (``/ 2**52`` if wide)."""
    if threshold.dtype == np.uint64:
        return threshold.astype(jnp.float64) / np.float64(2.0**WIDE_THRESHOLD_BITS)
    return threshold.astype(jnp.float32) / np.float32(2.0**THRESHOLD_BITS)


def keep_from_bits(bits: jax.Array, threshold: jax.Array) -> jax.Array:
    """Bool keep decision: ``(bits >> 9) < threshold``, or ``(bits >> 12)`` for 64-bit words (bernoulli's rule)."""
    if bits.dtype == np.uint64:
        return (bits >> np.uint64(64 - WIDE_THRESHOLD_BITS)) < threshold
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

    ``m_i = [u_i < 1 - rate]`` with ``u`` uniform on the 2**-23 grid drawn from ``key`` (the 2**-52 grid, from
    64-bit words, when the rate enters as float64: a Python number or float64 array under ``jax_enable_x64``,
    as bernoulli takes ``1 - rate``); equal to
    ``jax.random.bernoulli(key, 1 - rate, mask_shape)`` for every key implementation and config, broadcast
    to ``shape``, where
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
    bits = random_bits(key, mask_shape, broadcast_to=shape, dtype=bits_dtype(threshold))
    return jnp.broadcast_to(keep_from_bits(bits, threshold), shape)
