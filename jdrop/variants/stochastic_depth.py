"""Stochastic depth ("drop path"): a residual branch dropped for a whole example."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jdrop._dropout import dropout
from jdrop._typing import KeyLike, Residual, Scale
from jdrop._validation import canonical_axis, check_float_input, check_rate, int_at_least, static_bool

__all__ = ["drop_path", "drop_path_rates"]


def drop_path(
    key: KeyLike | None,
    x: ArrayLike,
    rate: ArrayLike,
    *,
    scale_by_keep: bool = True,
    batch_axis: int | None = 0,
    deterministic: bool = False,
    residual: Residual = "key",
) -> jax.Array:
    """Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth"), timm's ``drop_path``.

    Apply it to a residual branch, ``h + drop_path(key, f(h), rate)``. One ``m ~ Bernoulli(keep)``
    per example, shared by all of its elements::

        scale_by_keep=True:   train  y[b] = m[b] * x[b] / keep     eval  y = x
        scale_by_keep=False:  train  y[b] = m[b] * x[b]            eval  y = x

    These are exactly ``timm.layers.drop_path`` (and ``torchvision.ops.stochastic_depth(mode="row")``
    for ``scale_by_keep=True``); like timm, ``scale_by_keep=False`` leaves the evaluation output
    unscaled (the branch is then biased by ``keep``, as in timm; the original paper instead scales the
    branch by ``keep`` at test time, which is :func:`jdrop.dropout` with ``scale="classic"`` and
    ``broadcast_dims`` all but the batch axis). Runs through the core :func:`jdrop.dropout`.

    Args:
      key: PRNG key (may be None when ``deterministic``).
      x: floating array, examples along ``batch_axis``.
      rate: probability of dropping an example's branch, in [0, 1]; may be traced.
      scale_by_keep: divide kept branches by ``keep`` (timm's default).
      batch_axis: the example axis, or None for one example (inside ``jax.vmap``): one draw for all of ``x``.
      deterministic: evaluation mode (identity).
      residual: the core's residual policy.

    Returns:
      Array of ``x``'s shape and dtype.
    """
    x = check_float_input(x)
    if batch_axis is None:
        dims = tuple(range(x.ndim))
    else:
        batch = canonical_axis(batch_axis, x.ndim, name="batch_axis")
        dims = tuple(axis for axis in range(x.ndim) if axis != batch)
    scale_by_keep = static_bool(scale_by_keep, name="scale_by_keep")
    # timm's evaluation is the identity with either scaling, hence "inverted" for deterministic.
    scale: Scale = "inverted" if scale_by_keep or deterministic else "classic"
    return dropout(key, x, rate, deterministic=deterministic, broadcast_dims=dims, scale=scale, residual=residual)


def drop_path_rates(max_rate: ArrayLike, depth: int) -> jax.Array:
    """Per-block drop rates for stochastic depth, rising linearly from 0 to ``max_rate`` with depth.

    ``rates[l] = max_rate * l / (depth - 1)`` for ``l = 0..depth-1``, as timm builds them
    (``torch.linspace(0, drop_path_rate, depth)``) and as Huang et al. 2016's linear decay rule
    (survival ``1 - l / L * (1 - p_L)``) prescribes. ``max_rate`` may be traced.

    Returns:
      float32 array of shape ``(depth,)``; its entries are valid ``rate`` arguments (a concrete
      entry counts as a static rate).
    """
    max_rate = check_rate(max_rate, name="max_rate")
    depth = int_at_least(depth, 0, name="depth")
    return jnp.linspace(0.0, jnp.asarray(max_rate, jnp.float32), depth, dtype=jnp.float32)
