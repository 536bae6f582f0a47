"""Stochastic depth ("drop path"): a residual branch dropped for a whole example."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jdrop._batching import AUTO, BatchAxis, resolve_batch_axis
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
    batch_axis: BatchAxis = AUTO,
    deterministic: bool = False,
    residual: Residual | None = None,
) -> jax.Array:
    """Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth"), timm's ``drop_path``.

    Apply it to a residual branch, ``h + drop_path(key, f(h), rate)``. One ``m ~ Bernoulli(keep)``
    per example (a sample of the batch, timm's mask of shape ``(B, 1, 1, ...)``), shared by all of
    its elements::

        scale="inverted" (default):   train  y[b] = m[b] * x[b] / keep     eval  y = x
        scale="classic":              train  y[b] = m[b] * x[b]            eval  y = keep * x
        scale_by_keep=False (timm):   train  y[b] = m[b] * x[b]            eval  y = x

    ``scale="inverted"`` is ``timm.layers.drop_path`` with its default ``scale_by_keep=True`` (and
    ``torchvision.ops.stochastic_depth(mode="row")``); ``scale="classic"`` is the original paper's
    rule, the branch scaled by its survival probability at test time. ``scale_by_keep`` is timm's
    spelling, accepted as is for code ported from timm: ``True`` is ``scale="inverted"``, and
    ``False`` is timm's unscaled branch, whose evaluation output stays unscaled (biased by ``keep``,
    as in timm). Runs through the core :func:`jdrop.dropout`.

    Which axis holds the examples, right without an argument in both of jdrop's settings: by
    default (``batch_axis="auto"``) inside a one-example ``apply_fn`` run by :func:`jdrop.train_step`,
    :func:`jdrop.train.per_example`, :func:`jdrop.mc_predict` or :func:`jdrop.rdrop_loss` the whole
    input is one example (one draw for a ``(T, C)`` sequence: stochastic depth, not per-token
    dropout), and elsewhere axis 0 is the batch (one draw per sample, as timm). jdrop's tools mark
    the one-example trace with a ``jax.make_user_context`` rather than guessing from vmap axis names
    (a ``shard_map`` over a mesh axis named ``"batch"`` holds a batch, not an example). Pass
    ``batch_axis=None`` under your own ``jax.vmap`` over examples, and ``batch_axis=0`` to force a
    leading batch axis everywhere (the default before ``"auto"``: inside ``train_step`` it drops
    tokens of a sequence independently).

    Args:
      key: PRNG key (may be None when ``deterministic``).
      x: floating array, examples along ``batch_axis``.
      rate: probability of dropping an example's branch, in [0, 1]; may be traced.
      scale: ``"inverted"`` or ``"classic"``, as in :func:`jdrop.dropout`.
      scale_by_keep: timm's alias (a Python bool), instead of ``scale``; None (default) defers to ``scale``.
      batch_axis: the example axis; None: the whole input is one example; ``"auto"`` (default): None
        while jdrop runs a one-example ``apply_fn`` (``train_step``, ``per_example``, ``mc_predict``), else 0.
      deterministic: evaluation mode.
      residual: the core's residual policy.

    Returns:
      Array of ``x``'s shape and dtype.
    """
    x = check_float_input(x)
    chosen: Scale = check_scale(scale)
    batch_axis = resolve_batch_axis(batch_axis)
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


def drop_path_rates(max_rate: ArrayLike, depth: int) -> tuple[Any, ...]:
    """Per-block drop rates for stochastic depth, rising linearly from 0 to ``max_rate`` with depth.

    ``rates[l] = max_rate * l / (depth - 1)`` for ``l = 0..depth-1``, as timm builds them
    (``torch.linspace(0, drop_path_rate, depth)``) and as Huang et al. 2016's linear decay rule
    (survival ``1 - l / L * (1 - p_L)``) prescribes.

    A tuple of Python floats (computed in float64), so timm's idiom
    ``Block(drop_path=float(rates[l]))`` works inside a module traced by ``jax.jit``, and every entry
    is a static rate. A traced ``max_rate`` gives a tuple of traced float32 scalars (valid ``rate``
    arguments, not Python floats).

    Returns:
      ``depth`` rates, ``rates[0] == 0.0`` and ``rates[-1] == max_rate``.

    Example::

      >>> jdrop.drop_path_rates(0.3, 4)
      (0.0, 0.09999999999999999, 0.19999999999999998, 0.3)
    """
    max_rate = check_rate(max_rate, name="max_rate")
    depth = int_at_least(depth, 0, name="depth")
    steps = max(depth - 1, 1)
    if isinstance(max_rate, float):
        return tuple(max_rate * (layer / steps) for layer in range(depth))
    return tuple(max_rate * jnp.float32(layer / steps) for layer in range(depth))
