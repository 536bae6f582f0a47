"""Losses of a training step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["softmax_cross_entropy"]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels: ``mean_i(logsumexp(z_i) - z_i[y_i])``."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
