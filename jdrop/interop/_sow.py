"""flax's ``sow_weights`` for :func:`jdrop.dot_product_attention`: the attention weights, sown into a flax module.

Imported by the attention function only when it is given a ``module``, so the attention core never
imports flax.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["sow_attention_weights"]


def sow_attention_weights(module: Any, query: jax.Array, key: jax.Array, bias: Any, mask: Any,
                          is_causal: bool) -> None:
    """Sows flax's attention weights (softmax before dropout) into ``module``, built in full as flax does.

    ``weights = softmax(q k^T / sqrt(D) + bias)`` (masked entries ``finfo.min``), ``(batch..., Hq, Tq, Tk)``,
    as ``"attention_weights"`` in ``"intermediates"`` (linen) or as an ``nnx.Intermediate`` (nnx).
    """
    group = query.shape[-2] // key.shape[-2]
    key = jnp.repeat(key, group, axis=-2)
    logits = jnp.einsum("...qhd,...khd->...hqk", query / jnp.sqrt(query.shape[-1]).astype(query.dtype), key,
                        preferred_element_type=jnp.promote_types(query.dtype, jnp.float32))
    if bias is not None:
        logits = logits + bias
    allowed = None if mask is None else jnp.asarray(mask).astype(bool)
    if is_causal:
        causal = jnp.tril(jnp.ones(logits.shape[-2:], bool))
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits).astype(query.dtype)
    from flax import nnx  # only a flax module asks to sow

    if isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, "attention_weights", weights)
    else:
        module.sow("intermediates", "attention_weights", weights)
