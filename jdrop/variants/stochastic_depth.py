"""Stochastic depth ("drop path"): a residual branch dropped for a whole example."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jdrop._dropout import dropout
from jdrop._typing import KeyLike, Residual, Scale
from jdrop._validation import (
    canonical_axis,
    check_alias,
    check_deterministic,
    check_float_input,
    check_rate,
    check_scale,
    int_at_least,
    static_bool,
)

__all__ = ["drop_path", "drop_path_rates"]


def drop_path(
    key: KeyLike | None,
    x: ArrayLike,
    rate: ArrayLike,
    *,
    scale: Scale = "inverted",
    scale_by_keep: bool | None = None,
    batch_axis: int | None = 0,
    deterministic: bool = False,
    residual: Residual | None = None,
) -> jax.Array:
    """Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth"), timm's ``drop_path``.

    Apply it to a residual branch, ``h + drop_path(key, f(h), rate)``. One ``m ~ Bernoulli(keep)``
    per example, shared by all of its elements::

        scale="inverted" (default):   train  y[b] = m[b] * x[b] / keep     eval  y = x
        scale="classic":              train  y[b] = m[b] * x[b]            eval  y = keep * x
        scale_by_keep=False (timm):   train  y[b] = m[b] * x[b]            eval  y = x

    ``scale="inverted"`` is ``timm.layers.drop_path`` with its default ``scale_by_keep=True`` (and
    ``torchvision.ops.stochastic_depth(mode="row")``); ``scale="classic"`` is the original paper's
    rule, the branch scaled by its survival probability at test time. ``scale_by_keep`` is timm's
    spelling, accepted as is for code ported from timm: ``True`` is ``scale="inverted"``, and
    ``False`` is timm's unscaled branch, whose evaluation output stays unscaled (biased by ``keep``,
    as in timm). Runs through the core :func:`jdrop.dropout`.

    Args:
      key: PRNG key (may be None when ``deterministic``).
      x: floating array, examples along ``batch_axis``.
      rate: probability of dropping an example's branch, in [0, 1]; may be traced.
      scale: ``"inverted"`` or ``"classic"``, as in :func:`jdrop.dropout`.
      scale_by_keep: timm's alias (a Python bool), instead of ``scale``; None (default) defers to ``scale``.
      batch_axis: the example axis, or None for one example (inside ``jax.vmap``): one draw for all of ``x``.
      deterministic: evaluation mode.
      residual: the core's residual policy.

    Returns:
      Array of ``x``'s shape and dtype.
    """
    x = check_float_input(x)
    chosen: Scale = check_scale(scale)
    if batch_axis is None:
        dims = tuple(range(x.ndim))
    else:
        batch = canonical_axis(batch_axis, x.ndim, name="batch_axis")
        dims = tuple(axis for axis in range(x.ndim) if axis != batch)
    if scale_by_keep is not None:
        check_alias("scale", chosen, "inverted", alias="scale_by_keep", alias_value=scale_by_keep)
        if not static_bool(scale_by_keep, name="scale_by_keep") and check_deterministic(deterministic):
            return dropout(None, x, rate, deterministic=True, residual=residual)
        if not scale_by_keep:
            chosen = "classic"  # timm's unscaled branch: classic training, but the identity at evaluation
    return dropout(key, x, rate, deterministic=deterministic, broadcast_dims=dims, scale=chosen, residual=residual)


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
