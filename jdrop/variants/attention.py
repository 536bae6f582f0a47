"""Dropout on attention probabilities, with an O(1) residual."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.typing import ArrayLike

from jdrop._dropout import dropout
from jdrop._typing import KeyLike, Residual, Scale
from jdrop._validation import check_float_input

__all__ = ["attention_dropout"]


def attention_dropout(
    key: KeyLike | None,
    probs: ArrayLike,
    rate: ArrayLike,
    *,
    broadcast_dims: Sequence[int] = (),
    deterministic: bool = False,
    scale: Scale = "inverted",
    residual: Residual | None = None,
) -> jax.Array:
    """Dropout on attention weights (Vaswani et al. 2017) whose backward pass keeps no mask.

    With ``m ~ Bernoulli(keep)`` per attention weight (shared along ``broadcast_dims``)::

        scale="inverted":  train  P' = m * P / keep      eval  P' = P
        scale="classic":   train  P' = m * P             eval  P' = keep * P

    as ``flax.linen.MultiHeadDotProductAttention`` (``dropout_rate``), ``torch.nn.MultiheadAttention``
    and ``F.scaled_dot_product_attention(dropout_p=...)`` do. It is :func:`jdrop.dropout`; with the
    default ``residual="key"`` the backward pass regenerates the mask from the key inside the fusion
    that consumes the cotangent, so the ``(B, H, L, L)`` mask is never stored: the training step's
    temporary memory is that of attention without dropout, where ``flax.linen.Dropout`` (or
    ``jax.random.bernoulli`` + ``where``) keeps the mask and the random bits alive. For flax's
    ``broadcast_dropout=True`` (one mask for all batch rows and heads) pass ``broadcast_dims=(0, 1)``.

    This is for probabilities you compute yourself. For standard softmax attention use
    :func:`jdrop.dot_product_attention`: it fuses the softmax, this dropout (the same mask for the
    same key) and the products blockwise, so the ``(B, H, L, L)`` probabilities are never stored
    either, and the training step's memory grows linearly in ``L`` instead of quadratically.

    Args:
      key: PRNG key (may be None when ``deterministic``).
      probs: attention probabilities, e.g. ``(B, H, L_q, L_k)``, floating.
      rate: drop probability in [0, 1]; may be traced.
      broadcast_dims: dims along which one mask value is shared.
      deterministic: evaluation mode.
      scale: ``"inverted"`` (default) or ``"classic"``, as in :func:`jdrop.dropout`.
      residual: the core's residual policy (``"key"`` keeps nothing per element).

    Returns:
      Array of ``probs``'s shape and dtype.
    """
    probs = check_float_input(probs, name="probs")
    return dropout(key, probs, rate, deterministic=deterministic, broadcast_dims=broadcast_dims, scale=scale,
                   residual=residual)
