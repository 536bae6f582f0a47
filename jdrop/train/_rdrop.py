"""R-Drop: two dropout passes regularised towards each other by a symmetric KL divergence."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from jdrop import masks
from jdrop._typing import KeyLike
from jdrop._validation import canonical_axis, check_float_input, check_rate
from jdrop.train._per_example import check_apply_fn, per_example

__all__ = ["rdrop_loss", "symmetric_kl"]


def symmetric_kl(logits_a: ArrayLike, logits_b: ArrayLike, *, axis: int = -1) -> jax.Array:
    """The symmetric KL divergence of R-Drop: ``(KL(p_a || p_b) + KL(p_b || p_a)) / 2``.

    With ``p_a = softmax(logits_a)`` and ``p_b = softmax(logits_b)`` along ``axis``, this is
    ``sum((p_a - p_b) * (log p_a - log p_b)) / 2``, computed from log-softmaxes (stable for large logits).

    Args:
      logits_a: floating logits.
      logits_b: floating logits, same shape.
      axis: the class axis.

    Returns:
      The divergence, with ``axis`` reduced.
    """
    logits_a = check_float_input(logits_a, name="logits_a")
    logits_b = check_float_input(logits_b, name="logits_b")
    if logits_a.shape != logits_b.shape:
        raise ValueError(
            f"`logits_a` and `logits_b` must have the same shape, got {logits_a.shape} and {logits_b.shape}."
        )
    axis = canonical_axis(axis, logits_a.ndim, name="axis")
    log_a = jax.nn.log_softmax(logits_a, axis=axis)
    log_b = jax.nn.log_softmax(logits_b, axis=axis)
    return 0.5 * jnp.sum((jnp.exp(log_a) - jnp.exp(log_b)) * (log_a - log_b), axis=axis)


def rdrop_loss(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    x: ArrayLike,
    labels: ArrayLike,
    key: KeyLike,
    *,
    alpha: float = 1.0,
    hparams: Mapping[str, Any] | None = None,
) -> jax.Array:
    """R-Drop (Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks").

    Every example goes through the network twice with independent dropout masks, giving logits
    ``z1`` and ``z2``; the loss is, averaged over the batch::

        L = (CE(z1, y) + CE(z2, y)) / 2 + alpha * (KL(p1 || p2) + KL(p2 || p1)) / 2

    with softmax cross-entropy on integer labels. The two passes are the two halves of a doubled
    batch, as in the paper's implementation: ``apply_fn`` (written for one example, the jdrop
    convention) runs through :func:`jdrop.train.per_example` on ``concat([x, x])``, with keys
    ``jdrop.example_keys(key, 2 B)``, so
    pass 1 of example ``i`` uses key ``i`` and pass 2 key ``B + i``. The official code sums the KL
    over the batch while averaging the cross-entropy; here both are averaged (the paper's per-example
    loss), so its ``alpha`` corresponds to ``alpha * B`` here. Use it as the loss of a
    ``jax.value_and_grad`` training step.

    Args:
      apply_fn: ``apply_fn(params, x_i, *, key, deterministic)`` for one example, returning logits.
      params: the parameters.
      x: a batch ``(B, ...)``.
      labels: integer labels ``(B,)`` (or ``(B, ...)`` matching the logits without the class axis).
      key: the step's PRNG key.
      alpha: weight of the symmetric KL, >= 0.
      hparams: keyword arguments of ``apply_fn`` (arrays, e.g. traced ``rates``), as in a ``TrainState``.

    Returns:
      The scalar loss.
    """
    check_apply_fn(apply_fn)
    if check_rate(alpha, name="alpha", upper=math.inf) == math.inf:
        raise ValueError("`alpha` must be finite and >= 0, got inf.")
    x = jnp.asarray(x)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"`labels` must be integer class indices, got dtype {labels.dtype}.")
    if x.ndim < 1 or labels.ndim < 1 or x.shape[0] != labels.shape[0]:
        raise ValueError(f"`x` and `labels` must share their leading (example) axis, got {x.shape} and {labels.shape}.")
    batch = x.shape[0]
    key = masks.require_key(key, what="jdrop.rdrop_loss", eval_hint="jdrop.eval_step")
    logits = per_example(apply_fn, params, jnp.concatenate([x, x], axis=0), key, hparams=hparams)
    first, second = logits[:batch], logits[batch:]
    cross_entropy = 0.5 * (
        optax.softmax_cross_entropy_with_integer_labels(first, labels)
        + optax.softmax_cross_entropy_with_integer_labels(second, labels)
    )
    return jnp.mean(cross_entropy + alpha * symmetric_kl(first, second))
