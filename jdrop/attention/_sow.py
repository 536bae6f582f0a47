"""The attention weights as a whole ``(batch..., heads, Tq, Tk)`` array, as flax builds them: for ``sow_weights``.

flax's attention modules ask their ``attention_fn`` to sow the weights (the softmax before dropout)
into the module, by passing ``module=self``; :func:`sow_attention_weights` does that for
:func:`jdrop.dot_product_attention`, with flax's dtype and precision. :func:`attention_weights` is
also the whole-matrix formula of complex inputs (see :mod:`jdrop.attention._api`). flax itself is
never imported here: a module object is only ever given by a flax program, which has loaded flax.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["attention_weights", "softmax", "sow_attention_weights"]


def softmax(logits: jax.Array) -> jax.Array:
    """``exp(s) / sum_k exp(s)`` over the last axis, for real or complex ``s`` (``jax.nn.softmax``'s formula).

    The shift that keeps the exponentials finite is the largest real part (for real logits, the max):
    it cancels in the ratio, as in ``jax.nn.softmax``, which flax applies to complex logits too.
    """
    if not jnp.iscomplexobj(logits):
        return jax.nn.softmax(logits)
    shift = jax.lax.stop_gradient(logits.real.max(axis=-1, keepdims=True))
    unnormalized = jnp.exp(logits - shift)
    return unnormalized / unnormalized.sum(axis=-1, keepdims=True)


def attention_weights(query: jax.Array, key: jax.Array, bias: Any, mask: Any, is_causal: bool,
                      precision: Any) -> jax.Array:
    """``softmax(q k^T / sqrt(D) + bias)`` with masked entries ``finfo.min``: ``(batch..., Hq, Tq, Tk)``.

    Built whole, as flax builds it: the product under ``precision`` (as flax's einsum), accumulated in
    at least float32 (complex stays complex), the softmax in that dtype. Key/value heads are repeated
    for grouped queries.
    """
    group = query.shape[-2] // max(key.shape[-2], 1)
    key = jnp.repeat(key, group, axis=-2)
    logits = jnp.einsum("...qhd,...khd->...hqk", query / jnp.sqrt(query.shape[-1]).astype(query.dtype), key,
                        precision=precision, preferred_element_type=jnp.promote_types(query.dtype, jnp.float32))
    if bias is not None:
        logits = logits + bias
    allowed = None if mask is None else jnp.asarray(mask).astype(bool)
    if is_causal:
        causal = jnp.tril(jnp.ones(logits.shape[-2:], bool))
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    return softmax(logits)


def sow_attention_weights(module: Any, query: jax.Array, key: jax.Array, bias: Any, mask: Any, is_causal: bool,
                          *, precision: Any, force_fp32_for_softmax: bool) -> None:
    """Sows flax's attention weights (:func:`attention_weights`) into ``module`` as ``"attention_weights"``.

    In ``query``'s dtype, as flax's modules sow them, except under ``force_fp32_for_softmax`` with a
    dtype other than float32, where flax.linen sows its float32 softmax: float32. Into
    ``"intermediates"`` (a linen module) or as an ``nnx.Intermediate`` (an nnx module).
    """
    weights = attention_weights(query, key, bias, mask, is_causal, precision)
    if force_fp32_for_softmax and query.dtype != jnp.float32:
        weights = weights.astype(jnp.float32)
    else:
        weights = weights.astype(query.dtype)
    nnx = sys.modules.get("flax.nnx")  # loaded by any program that holds an nnx module
    if nnx is not None and isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, "attention_weights", weights)
    else:
        module.sow("intermediates", "attention_weights", weights)
