"""Floats from bits, as ``jax.random.uniform`` and ``jax.random.normal`` make them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdrop.masks._keep import THRESHOLD_BITS

__all__ = ["normal_from_bits", "uniform_from_bits"]


def uniform_from_bits(bits: jax.Array, minval: float = 0.0, maxval: float = 1.0) -> jax.Array:
    """Float32 uniforms on ``[minval, maxval)`` from ``uint32`` bits, as ``jax.random.uniform`` makes them.

    The top 23 bits become the mantissa of a float in [1, 2), so ``u = (bits >> 9) / 2**23`` on
    [0, 1) (the same 23 bits that :func:`keep_from_bits` compares with the threshold), then
    ``max(minval, u * (maxval - minval) + minval)``. With ``bits = random_bits(key, shape)`` this
    equals ``jax.random.uniform(key, shape, jnp.float32, minval, maxval)`` (bit for bit for the
    default range; for others up to XLA's choice of fusing the final multiply-add).
    """
    mantissa = (bits >> np.uint32(32 - THRESHOLD_BITS)) | np.uint32(0x3F800000)
    floats = lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
    low, high = np.float32(minval), np.float32(maxval)
    return lax.max(low, floats * (high - low) + low)


def normal_from_bits(bits: jax.Array) -> jax.Array:
    """Float32 standard normals from ``uint32`` bits, as ``jax.random.normal`` makes them.

    ``z = sqrt(2) * erfinv(u)`` with ``u`` uniform on ``[nextafter(-1, 0), 1)`` from
    :func:`uniform_from_bits`. With ``bits = random_bits(key, shape)`` this equals
    ``jax.random.normal(key, shape, jnp.float32)``.
    """
    low = np.nextafter(np.float32(-1.0), np.float32(0.0))
    return np.float32(np.sqrt(2.0)) * lax.erf_inv(uniform_from_bits(bits, low, 1.0))
