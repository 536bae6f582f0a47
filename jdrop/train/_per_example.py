"""jdrop's per-example convention, in one place.

``apply_fn(params, x, *, key, train, **hparams)`` is written for ONE example. Every training-level
tool (:func:`jdrop.train_step`, :func:`jdrop.mc_predict`, :func:`jdrop.rdrop_loss`) runs it over a
batch through :func:`per_example`: ``jax.vmap`` over the examples, example ``i`` (global index
``offset + i``) keyed by ``jdrop.example_keys(key, B, offset=offset)[i]``. So every example samples
its own sub-network, and its mask depends only on the key and its global index.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.typing import ArrayLike

from jdrop import masks
from jdrop._typing import KeyLike

__all__ = ["per_example"]


def per_example(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    x: ArrayLike,
    key: KeyLike | None,
    *,
    train: bool = True,
    offset: Any = 0,
    hparams: Mapping[str, Any] | None = None,
    axis: int = 0,
) -> jax.Array:
    """``y_i = apply_fn(params, x_i, key=k_i, train=train, **hparams)`` for every example ``x_i`` of a batch.

    ``k_i = jdrop.example_keys(key, B, offset=offset)[i]`` in training; ``key=None`` in evaluation.

    Args:
      apply_fn: the network for one example.
      params: its parameters (shared by all examples).
      x: the batch; examples along ``axis``.
      key: the PRNG key of this batch (None when not ``train``).
      train: training (dropout on) or evaluation.
      offset: global index of the batch's first example (microbatches, shards).
      hparams: keyword arguments of ``apply_fn`` shared by all examples (e.g. traced ``rates``).
      axis: the example axis of ``x``.

    Returns:
      The outputs, stacked along a leading example axis.
    """
    extra = dict(hparams or {})
    if not train:
        return jax.vmap(lambda xi: apply_fn(params, xi, key=None, train=False, **extra), in_axes=axis)(x)
    key = masks.require_key(key, what="apply_fn", eval_hint="train=False")
    keys = masks.example_keys(key, jax.numpy.shape(x)[axis], offset=offset)
    return jax.vmap(lambda xi, ki: apply_fn(params, xi, key=ki, train=True, **extra), in_axes=(axis, 0))(x, keys)
