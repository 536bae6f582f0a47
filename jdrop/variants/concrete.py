"""Concrete dropout: a relaxed Bernoulli mask whose rate is learned by gradient descent."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jdrop import masks
from jdrop._typing import KeyLike
from jdrop._validation import check_deterministic, check_float_input, check_nonnegative, int_at_least, require_key

__all__ = ["concrete_dropout", "concrete_dropout_regulariser"]

_EPS = 1e-7  # the reference implementation's K.epsilon()


def _check_logit(rate_logit: ArrayLike) -> jax.Array:
    """``rate_logit`` as a floating array (a Python float becomes float32), or ``TypeError``."""
    if isinstance(rate_logit, numbers.Real) and not isinstance(rate_logit, (bool, np.bool_)):
        return jnp.asarray(rate_logit, jnp.float32)
    return check_float_input(rate_logit, name="rate_logit")


def concrete_dropout(
    key: KeyLike | None,
    x: ArrayLike,
    rate_logit: ArrayLike,
    *,
    temperature: float = 0.1,
    deterministic: bool = False,
) -> jax.Array:
    """Concrete dropout (Gal, Hron & Kendall 2017): dropout with a continuous relaxation of the mask.

    The rate ``p = sigmoid(rate_logit)`` is a parameter: the relaxed ("concrete") drop mask is
    differentiable in ``p``. With ``u ~ Uniform[0, 1)`` per element and ``t = temperature``::

        z      = sigmoid((log p - log(1 - p) + log u - log(1 - u)) / t)     (relaxed drop indicator)
        train  y = x * (1 - z) / (1 - p)                                     eval  y = x

    (``eps = 1e-7`` inside every log, as the reference Keras/PyTorch implementation). As ``t -> 0``,
    ``z`` tends to a ``Bernoulli(p)`` drop mask and ``y`` to inverted dropout. Train ``rate_logit``
    together with the weights, adding :func:`concrete_dropout_regulariser` to the loss.
    ``u = jdrop.masks.uniform_from_bits(jdrop.masks.random_bits(key, x.shape))`` (that is,
    ``jax.random.uniform(key, x.shape)``), redrawn from the key in the backward pass rather than stored.

    Args:
      key: PRNG key (may be None when ``deterministic``).
      x: floating array; computed in at least float32, returned in ``x``'s dtype.
      rate_logit: logit of the drop rate, a scalar or an array broadcastable to ``x`` (e.g. per feature).
      temperature: relaxation temperature, > 0 (the paper uses 0.1).
      deterministic: evaluation mode (identity).

    Returns:
      Array of ``x``'s shape and dtype; differentiable in ``x`` and ``rate_logit``.
    """
    x = check_float_input(x)
    deterministic = check_deterministic(deterministic)
    rate_logit = _check_logit(rate_logit)
    check_nonnegative(temperature, name="temperature", positive=True)
    if deterministic:
        return x
    key = require_key(key, what="concrete_dropout")
    dtype = jnp.promote_types(x.dtype, jnp.float32)

    @jax.checkpoint  # the backward pass redraws u from the key rather than keeping the relaxed mask
    def relaxed(key: jax.Array, x: jax.Array, rate_logit: jax.Array, temperature: Any) -> jax.Array:
        p = jax.nn.sigmoid(rate_logit)
        u = masks.uniform_from_bits(masks.random_bits(key, x.shape)).astype(x.dtype)
        logit = jnp.log(p + _EPS) - jnp.log(1 - p + _EPS) + jnp.log(u + _EPS) - jnp.log(1 - u + _EPS)
        drop = jax.nn.sigmoid(logit / temperature)
        return x * (1 - drop) / (1 - p)

    return relaxed(key, x.astype(dtype), rate_logit.astype(dtype), temperature).astype(x.dtype)


def concrete_dropout_regulariser(
    rate_logit: ArrayLike,
    kernel: ArrayLike,
    input_dim: int,
    *,
    weight_regulariser: float,
    dropout_regulariser: float,
) -> jax.Array:
    """The concrete dropout regulariser of the layer that follows the dropout (Gal et al. 2017, eq. 3).

    With ``p = sigmoid(rate_logit)`` and ``K`` the layer's weight matrix::

        R = weight_regulariser * sum(K**2) / (1 - p)
            + dropout_regulariser * input_dim * (p log p + (1 - p) log(1 - p))

    The second term is minus the entropy of ``Bernoulli(p)``, so it pulls ``p`` towards 1/2; the
    first penalises large weights more as ``p`` grows. The reference implementation sets
    ``weight_regulariser = l**2 / N`` (``l`` a prior length scale) and ``dropout_regulariser = 2 / N``
    for ``N`` training points, and ``input_dim`` the number of features being dropped.

    Args:
      rate_logit: the scalar logit of the layer's drop rate.
      kernel: the weights of the layer that the dropped features feed.
      input_dim: the number of dropped features.
      weight_regulariser: the weight decay coefficient, >= 0.
      dropout_regulariser: the entropy coefficient, >= 0.

    Returns:
      The scalar regulariser, differentiable in ``rate_logit`` and ``kernel``.
    """
    rate_logit = _check_logit(rate_logit)
    if rate_logit.ndim:
        raise ValueError(f"`rate_logit` must be a scalar (one rate per layer), got shape {rate_logit.shape}.")
    kernel = check_float_input(kernel, name="kernel")
    input_dim = int_at_least(input_dim, 0, name="input_dim")
    check_nonnegative(weight_regulariser, name="weight_regulariser")
    check_nonnegative(dropout_regulariser, name="dropout_regulariser")
    p = jax.nn.sigmoid(rate_logit)
    # log p and log(1 - p) from the logit: stable where p rounds to 0 or 1.
    negative_entropy = p * jax.nn.log_sigmoid(rate_logit) + (1 - p) * jax.nn.log_sigmoid(-rate_logit)
    weights = weight_regulariser * jnp.sum(jnp.square(kernel)) / (1 - p)
    return weights + dropout_regulariser * input_dim * negative_entropy
