"""Alpha dropout for self-normalising (SELU) networks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jdrop._batching import AUTO, BatchAxis
from jdrop._dropout import dropout, keep_and_factor
from jdrop._typing import KeyLike, Residual
from jdrop._validation import check_deterministic, check_float_input, check_rate
from jdrop.variants.feature import _feature_broadcast_dims

__all__ = ["SELU_ALPHA", "SELU_SCALE", "alpha_dropout", "feature_alpha_dropout"]

SELU_ALPHA = 1.6732632423543772848170429916717
"""SELU's ``alpha`` (Klambauer et al. 2017)."""
SELU_SCALE = 1.0507009873554804934193349852946
"""SELU's ``lambda`` (Klambauer et al. 2017)."""
_SATURATION = -SELU_SCALE * SELU_ALPHA  # alpha' = -lambda * alpha, SELU's limit at -inf


def _alpha_dropout(
    key: KeyLike | None,
    x: ArrayLike,
    rate: ArrayLike,
    broadcast_dims: Sequence[int],
    deterministic: Any,
    residual: Residual | None,
) -> jax.Array:
    x = check_float_input(x)
    deterministic = check_deterministic(deterministic)
    checked = check_rate(rate)
    if deterministic or (isinstance(checked, float) and checked == 0.0):
        return dropout(None, x, rate, deterministic=True)  # the identity (NaN for an invalid traced rate)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    keep, _ = keep_and_factor(checked, dtype=dtype)
    # c = a * keep = sqrt(keep / (1 + alpha'^2 (1 - keep))) stays finite (0) at keep = 0, where a is infinite.
    c = jnp.sqrt(keep / (1.0 + _SATURATION**2 * (1.0 - keep)))
    # a (m x + (1 - m) alpha') + b  =  c (m (x - alpha') / keep + alpha'): the core's inverted dropout of x - alpha'.
    shifted = x.astype(dtype) - np.asarray(_SATURATION, dtype)
    dropped = dropout(key, shifted, rate, broadcast_dims=broadcast_dims, residual=residual)
    return (c * (dropped + np.asarray(_SATURATION, dtype))).astype(x.dtype)


def alpha_dropout(
    key: KeyLike | None,
    x: ArrayLike,
    rate: ArrayLike,
    *,
    broadcast_dims: Sequence[int] = (),
    deterministic: bool = False,
    residual: Residual | None = None,
) -> jax.Array:
    """Alpha dropout (Klambauer et al. 2017, "Self-Normalizing Neural Networks"), for SELU networks.

    Dropped units are set to SELU's saturation value ``alpha' = -lambda * alpha`` (about -1.7581)
    instead of 0, then an affine map restores zero mean and unit variance. With
    ``m ~ Bernoulli(keep)`` per element (shared along ``broadcast_dims``)::

        train  y = a * (m * x + (1 - m) * alpha') + b
               a = (keep + alpha'^2 * keep * (1 - keep)) ** -0.5,   b = -a * alpha' * (1 - keep)
        eval   y = x

    so for ``x ~ N(0, 1)`` the output has mean 0 and variance 1 again. This is exactly
    ``torch.nn.functional.alpha_dropout`` and ``keras.layers.AlphaDropout`` (``rate = 1`` gives
    zeros, as in PyTorch; gradients are then zero). It runs through the core :func:`jdrop.dropout`
    as ``y = a * keep * (dropout(x - alpha') + alpha')``, where ``keep`` is the core's realised keep
    probability (within 2**-23 of ``1 - rate``), so the mean and variance are preserved exactly and
    the gradient ``dx = a * m * dy`` comes from the core's backward pass. No gradient flows to ``rate``.

    Args:
      key: PRNG key (may be None when ``deterministic``).
      x: floating array; computed in at least float32, returned in ``x``'s dtype.
      rate: drop probability in [0, 1]; may be traced.
      broadcast_dims: dims along which one mask value is shared.
      deterministic: evaluation mode (identity).
      residual: the core's residual policy.

    Returns:
      Array of ``x``'s shape and dtype.
    """
    return _alpha_dropout(key, x, rate, broadcast_dims, deterministic, residual)


def feature_alpha_dropout(
    key: KeyLike | None,
    x: ArrayLike,
    rate: ArrayLike,
    *,
    channel_axis: int = -1,
    batch_axis: BatchAxis = AUTO,
    deterministic: bool = False,
    residual: Residual | None = None,
) -> jax.Array:
    """Alpha dropout of whole channels: :func:`alpha_dropout` with one mask value per (example, channel).

    The formula of :func:`alpha_dropout` with ``m[b, c]`` shared along every other axis, as
    ``torch.nn.functional.feature_alpha_dropout`` (``torch.nn.FeatureAlphaDropout``), which is
    channels-first: pass ``channel_axis=1`` for PyTorch's layout. Eval: identity. The default
    ``batch_axis="auto"`` is one example inside :func:`jdrop.train_step`'s ``apply_fn``, else axis 0
    (as :func:`jdrop.feature_dropout`); under your own ``jax.vmap`` over examples pass ``batch_axis=None``.

    Args:
      key: PRNG key (may be None when ``deterministic``).
      x: floating array with a channel axis.
      rate: probability of dropping a channel, in [0, 1]; may be traced.
      channel_axis: the channel axis.
      batch_axis: the example axis; None: the whole input is one example; ``"auto"`` (default): None
        while jdrop runs a one-example ``apply_fn`` (``train_step``, ``per_example``, ``mc_predict``), else 0.
      deterministic: evaluation mode (identity).
      residual: the core's residual policy.

    Returns:
      Array of ``x``'s shape and dtype.
    """
    x = check_float_input(x)
    dims = _feature_broadcast_dims(x, channel_axis=channel_axis, batch_axis=batch_axis)
    return _alpha_dropout(key, x, rate, dims, deterministic, residual)
