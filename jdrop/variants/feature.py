"""Feature (channel, "spatial") dropout: whole channels dropped per example."""

from __future__ import annotations

from typing import Any

import jax
from jax.typing import ArrayLike

from jdrop._batching import AUTO, BatchAxis, resolve_batch_axis
from jdrop._dropout import dropout
from jdrop._typing import KeyLike, Residual, Scale
from jdrop._validation import check_channel_and_batch_axes, check_float_input, check_rank_at_least

__all__ = ["feature_dropout"]


def _feature_broadcast_dims(x: jax.Array, *, channel_axis: Any, batch_axis: Any) -> tuple[int, ...]:
    """The dims a per-(example, channel) mask is shared along: all but ``batch_axis`` and ``channel_axis``.

    ``batch_axis=None`` means the input is one example (e.g. inside ``jax.vmap``); ``"auto"`` is
    resolved by :func:`jdrop._batching.resolve_batch_axis`.
    """
    check_rank_at_least(x, 1, name="x", why="it has a channel axis")
    batch_axis = resolve_batch_axis(batch_axis)
    kept = check_channel_and_batch_axes(x.ndim, channel_axis=channel_axis, batch_axis=batch_axis)
    return tuple(axis for axis in range(x.ndim) if axis not in kept)


def feature_dropout(
    key: KeyLike | None,
    x: ArrayLike,
    rate: ArrayLike,
    *,
    channel_axis: int = -1,
    batch_axis: BatchAxis = AUTO,
    deterministic: bool = False,
    scale: Scale = "inverted",
    residual: Residual | None = None,
) -> jax.Array:
    """Drops whole channels (feature maps) of each example (Tompson et al. 2015, "spatial dropout").

    One ``m ~ Bernoulli(keep)`` per (example, channel), shared along every other axis::

        scale="inverted":  train  y[b, ..., c] = m[b, c] * x[b, ..., c] / keep      eval  y = x
        scale="classic":   train  y[b, ..., c] = m[b, c] * x[b, ..., c]             eval  y = keep * x

    The mask is ``jdrop.keep_mask(key, x.shape, rate, broadcast_dims=<all other axes>)`` and the
    op is :func:`jdrop.dropout` with those ``broadcast_dims``, so keys, residual policies, traced
    rates, ``rate = 1`` and dtypes behave as in the core.

    Works for any rank: ``(B, L, C)`` is ``torch.nn.Dropout1d`` / ``keras.layers.SpatialDropout1D``,
    ``(B, H, W, C)`` is ``Dropout2d`` / ``SpatialDropout2D``, ``(B, D, H, W, C)`` is ``Dropout3d`` /
    ``SpatialDropout3D``. jdrop is channels-last by default (as Keras); for PyTorch's layout
    ``(B, C, ...)`` pass ``channel_axis=1``. Inside a one-example
    ``apply_fn`` run by :func:`jdrop.train_step` (or ``per_example``, ``mc_predict``) the default
    ``batch_axis="auto"`` treats the input as one example; under your own ``jax.vmap`` over examples
    pass ``batch_axis=None``.

    Args:
      key: PRNG key (may be None when ``deterministic``).
      x: floating array with a channel axis (and a batch axis unless it is one example).
      rate: probability of dropping a channel, in [0, 1]; may be traced.
      channel_axis: the channel axis.
      batch_axis: the example axis; None: the whole input is one example; ``"auto"`` (default): None
        while jdrop runs a one-example ``apply_fn`` (``train_step``, ``per_example``, ``mc_predict``), else 0.
      deterministic: evaluation mode.
      scale: ``"inverted"`` (default) or ``"classic"``, as in :func:`jdrop.dropout`.
      residual: the core's residual policy (``"key"``, ``"bits"`` or ``"mask"``).

    Returns:
      Array of ``x``'s shape and dtype.

    Example::

      >>> y = feature_dropout(jax.random.key(0), jnp.ones((8, 32, 32, 16)), 0.1)  # (B, H, W, C)
    """
    x = check_float_input(x)
    dims = _feature_broadcast_dims(x, channel_axis=channel_axis, batch_axis=batch_axis)
    return dropout(key, x, rate, deterministic=deterministic, broadcast_dims=dims, scale=scale, residual=residual)
