"""Optax transformations of dropout training: the max-norm constraint of Srivastava et al. (2014)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

__all__ = ["MaxNormState", "max_norm"]


class MaxNormState(optax.EmptyState):
    """max_norm keeps no state."""


def max_norm(max_value: float, *, axis: int = 0, min_ndim: int = 2) -> optax.GradientTransformation:
    """Max-norm constraint on incoming weight vectors (Srivastava et al. 2014, sec. 5.1).

    After the update, every incoming weight vector ``w`` (the slice along ``axis`` of each
    parameter with at least ``min_ndim`` dims; for ``W`` of shape ``(d_in, d_out)`` and the default
    ``axis=0`` that is the column of unit ``j``) is projected onto the ball ``||w||_2 <= c``::

        w <- w * min(1, c / ||w||_2)

    Chain it after the optimiser: ``optax.chain(optax.sgd(lr), jdrop.max_norm(3.0))``. It rewrites
    the updates so that ``params + updates`` is the projected point; biases are left alone.

    Args:
      max_value: the radius ``c`` (> 0).
      axis: axis (or axes) summed over for the norm.
      min_ndim: parameters with fewer dims (biases) are not constrained.
    """
    if isinstance(max_value, bool) or not isinstance(max_value, (int, float)) or not math.isfinite(max_value) or (
        max_value <= 0
    ):
        raise ValueError(f"`max_value` must be a finite number > 0, got {max_value!r}.")

    def init_fn(params):
        del params
        return MaxNormState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("max_norm needs the parameters: call tx.update(grads, state, params).")

        def project(update, param):
            if param.ndim < min_ndim:
                return update
            new = param + update
            norm = jnp.sqrt(jnp.sum(jnp.square(new), axis=axis, keepdims=True))
            factor = jnp.minimum(1.0, max_value / jnp.maximum(norm, jnp.finfo(new.dtype).tiny))
            return new * factor - param

        return jax.tree_util.tree_map(project, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)
