"""DropConnect: dropout on weights, and its Gaussian moment-matching inference."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jdrop import masks
from jdrop._dropout import dropout, keep_and_factor
from jdrop._typing import KeyLike, Residual, Scale
from jdrop._validation import check_callable, check_float_input, check_scale, positive_int, require_key

__all__ = ["DropConnectMoments", "dropconnect", "dropconnect_moments", "dropconnect_predict"]


def dropconnect(
    key: KeyLike | None,
    w: ArrayLike,
    rate: ArrayLike,
    *,
    scale: Scale = "inverted",
    deterministic: bool = False,
    residual: Residual | None = None,
) -> jax.Array:
    """DropConnect (Wan et al. 2013, "Regularization of Neural Networks using DropConnect").

    Drops individual weights rather than activations; use ``x @ dropconnect(key, w, rate)``. With
    ``M ~ Bernoulli(keep)`` per weight::

        scale="inverted":  train  W' = M * W / keep      eval  W' = W
        scale="classic":   train  W' = M * W             eval  W' = keep * W    (the paper's training rule)

    It is :func:`jdrop.dropout` applied to the weights. The paper draws a mask per example: call it
    under ``jax.vmap`` with per-example keys (``jdrop.example_keys``), e.g.
    ``jax.vmap(lambda k, xi: xi @ dropconnect(k, w, rate))(keys, xs)`` (this materialises one dropped
    weight matrix per example in the forward pass; the backward pass regenerates the masks from the
    keys). The paper's inference replaces the averaged network by a Gaussian moment match: see
    :func:`dropconnect_predict`.

    Args:
      key: PRNG key (may be None when ``deterministic``).
      w: floating weight array (any shape).
      rate: probability of dropping a weight, in [0, 1]; may be traced.
      scale: ``"inverted"`` (jdrop's default, also AWD-LSTM's weight drop) or ``"classic"`` (the paper's).
      deterministic: evaluation mode.
      residual: the core's residual policy.

    Returns:
      Array of ``w``'s shape and dtype.
    """
    w = check_float_input(w, name="w")
    return dropout(key, w, rate, deterministic=deterministic, scale=scale, residual=residual)


class DropConnectMoments(NamedTuple):
    """Mean and variance of the pre-activation ``x @ W'`` over DropConnect masks."""

    mean: jax.Array
    variance: jax.Array


def dropconnect_moments(
    x: ArrayLike, w: ArrayLike, rate: ArrayLike, *, bias: ArrayLike | None = None, scale: Scale = "inverted"
) -> DropConnectMoments:
    """Mean and variance of ``u = x @ W' + b`` over DropConnect masks ``W' = s * M * W`` (Wan et al. 2013, sec. 3).

    The units of ``u`` are sums of independent terms, so with ``keep`` the core's realised keep
    probability and ``s = 1 / keep`` (inverted) or 1 (classic)::

        mean      = s * keep * (x @ W) + b
        variance  = s**2 * keep * (1 - keep) * ((x**2) @ (W**2))

    (for ``scale="classic"`` the paper's ``N(p W v, p (1 - p) (W * W)(v * v))``). The bias is not dropped.

    Args:
      x: inputs ``(..., d_in)``.
      w: weights ``(d_in, d_out)``.
      rate: drop probability in [0, 1]; may be traced.
      bias: optional ``(d_out,)``, added to the mean.
      scale: ``"inverted"`` or ``"classic"``, as in :func:`dropconnect`.

    Returns:
      :class:`DropConnectMoments` ``(mean, variance)``, each ``(..., d_out)``.
    """
    x = check_float_input(x)
    w = check_float_input(w, name="w")
    check_scale(scale)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"`x` (..., d_in) and `w` (d_in, d_out) must be compatible, got {x.shape} and {w.shape}.")
    dtype = jnp.result_type(x.dtype, w.dtype)
    keep, factor = keep_and_factor(rate, scale=scale, dtype=dtype)
    mean = factor * keep * (x @ w)
    if bias is not None:
        mean = mean + check_float_input(bias, name="bias")
    variance = factor**2 * keep * (1 - keep) * (jnp.square(x) @ jnp.square(w))
    return DropConnectMoments(mean.astype(dtype), variance.astype(dtype))


def dropconnect_predict(
    key: KeyLike | None,
    x: ArrayLike,
    w: ArrayLike,
    rate: ArrayLike,
    *,
    activation: Callable[[jax.Array], jax.Array],
    num_samples: int,
    bias: ArrayLike | None = None,
    scale: Scale = "inverted",
) -> jax.Array:
    """DropConnect's inference (Wan et al. 2013, Algorithm 2): average the activation over a Gaussian moment match.

    ``u_s ~ N(mean, variance)`` from :func:`dropconnect_moments`, then::

        y = (1 / S) * sum_s activation(u_s),    s = 1..num_samples

    which approximates the activation averaged over all DropConnect masks far more cheaply than
    sampling masks. The normals are ``jax.random.normal(key, (num_samples, *mean.shape))``, drawn
    through :mod:`jdrop.masks`.

    Args:
      key: PRNG key.
      x: inputs ``(..., d_in)``.
      w: weights ``(d_in, d_out)``.
      rate: drop probability in [0, 1]; may be traced.
      activation: elementwise nonlinearity, e.g. ``jax.nn.relu``.
      num_samples: number of Gaussian samples ``S``.
      bias: optional ``(d_out,)``.
      scale: ``"inverted"`` or ``"classic"``, as the network was trained.

    Returns:
      The averaged activation, ``(..., d_out)``.
    """
    num_samples = positive_int(num_samples, name="num_samples")
    check_callable(activation, name="activation")
    mean, variance = dropconnect_moments(x, w, rate, bias=bias, scale=scale)
    key = require_key(key, what="dropconnect_predict")
    z = masks.normal_from_bits(masks.random_bits(key, (num_samples, *mean.shape))).astype(mean.dtype)
    return jnp.mean(activation(mean + jnp.sqrt(variance) * z), axis=0)
