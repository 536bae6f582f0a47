"""Gaussian dropout (multiplicative noise) and Gaussian noise (additive)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jdrop import masks
from jdrop._typing import KeyLike
from jdrop._validation import (
    check_deterministic,
    check_float_input,
    check_nonnegative,
    check_rate,
    nan_unless,
    nonnegative_is_valid,
    poison_invalid,
    rate_is_valid,
    require_key,
)

__all__ = ["gaussian_dropout", "gaussian_noise"]


@jax.checkpoint
def _perturb(key: jax.Array, x: jax.Array, multiplier: jax.Array, addend: jax.Array) -> jax.Array:
    """``x * (1 + multiplier * z) + addend * z`` with ``z = normal_from_bits(random_bits(key, x.shape))``.

    ``jax.checkpoint`` makes the backward pass draw ``z`` again from the key instead of keeping it:
    the residual is the key, as with the core's ``residual="key"``.
    """
    z = masks.normal_from_bits(masks.random_bits(key, x.shape)).astype(x.dtype)
    return x * (1 + multiplier * z) + addend * z


def _noisy(key: KeyLike | None, x: jax.Array, multiplier: Any, addend: Any, valid: Any, what: str) -> jax.Array:
    key = require_key(key, what=what)
    dtype = np.dtype(jnp.promote_types(x.dtype, jnp.float32))
    multiplier, addend = (lax.stop_gradient(jnp.asarray(v, dtype)) for v in (multiplier, addend))
    y = _perturb(key, x.astype(dtype), multiplier, addend)
    if valid is not True:
        y = y * nan_unless(valid, dtype)  # a scalar factor: no per-element residual
    return y.astype(x.dtype)


def gaussian_dropout(key: KeyLike | None, x: ArrayLike, rate: ArrayLike, *, deterministic: bool = False) -> jax.Array:
    """Gaussian dropout: multiplicative ``N(1, rate / (1 - rate))`` noise (Srivastava et al. 2014, sec. 10).

    With ``z ~ N(0, 1)`` per element::

        train  y = x * (1 + sqrt(rate / (1 - rate)) * z)      eval  y = x

    the noise of Bernoulli dropout's inverted mask ``m / keep`` (mean 1, variance
    ``rate / (1 - rate)``) matched by a Gaussian, as ``keras.layers.GaussianDropout``. ``z`` is
    ``jdrop.masks.normal_from_bits(jdrop.masks.random_bits(key, x.shape))``, which equals
    ``jax.random.normal(key, x.shape)``; the backward pass (``dx = dy * (1 + s z)``) draws ``z`` again
    from the key rather than storing it. No gradient flows to ``rate``.

    Unlike Bernoulli dropout the noise variance is infinite at ``rate = 1``, so a static ``rate`` must be
    in [0, 1) (``ValueError`` otherwise, where Keras would divide by zero); a traced one outside [0, 1)
    gives NaN outputs.

    Args:
      key: PRNG key (may be None when ``deterministic``).
      x: floating array; computed in at least float32, returned in ``x``'s dtype.
      rate: in [0, 1); may be traced.
      deterministic: evaluation mode (identity).

    Returns:
      Array of ``x``'s shape and dtype.
    """
    x = check_float_input(x)
    deterministic = check_deterministic(deterministic)
    rate = check_rate(rate)
    if isinstance(rate, float):
        if rate == 1.0:
            raise ValueError(
                "`rate` must be in [0, 1) for Gaussian dropout (its noise variance rate / (1 - rate) is "
                "infinite at 1), got 1.0."
            )
        if deterministic or rate == 0.0:
            return x
        return _noisy(key, x, math.sqrt(rate / (1.0 - rate)), 0.0, True, "gaussian_dropout")
    valid = rate_is_valid(rate, closed=False)
    if deterministic:
        return poison_invalid(x, valid)
    safe = jnp.where(valid, rate, 0.0)
    return _noisy(key, x, jnp.sqrt(safe / (1.0 - safe)), 0.0, valid, "gaussian_dropout")


def gaussian_noise(key: KeyLike | None, x: ArrayLike, stddev: ArrayLike, *, deterministic: bool = False) -> jax.Array:
    """Additive Gaussian noise, ``keras.layers.GaussianNoise``.

    With ``z ~ N(0, 1)`` per element (``jax.random.normal(key, x.shape)``, drawn through
    :mod:`jdrop.masks` and drawn again in the backward pass rather than stored)::

        train  y = x + stddev * z      eval  y = x

    ``dx = dy``; no gradient flows to ``stddev``. A static ``stddev`` must be finite and >= 0
    (``ValueError``); a traced invalid one gives NaN outputs.

    Args:
      key: PRNG key (may be None when ``deterministic``).
      x: floating array; computed in at least float32, returned in ``x``'s dtype.
      stddev: standard deviation of the noise; may be traced.
      deterministic: evaluation mode (identity).

    Returns:
      Array of ``x``'s shape and dtype.
    """
    x = check_float_input(x)
    deterministic = check_deterministic(deterministic)
    stddev = check_nonnegative(stddev, name="stddev")
    if isinstance(stddev, float):
        if deterministic or stddev == 0.0:
            return x
        return _noisy(key, x, 0.0, stddev, True, "gaussian_noise")
    valid = nonnegative_is_valid(stddev)
    if deterministic:
        return poison_invalid(x, valid)
    return _noisy(key, x, 0.0, jnp.where(valid, stddev, 0.0), valid, "gaussian_noise")
