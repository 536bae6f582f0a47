"""``equinox`` Dropout around :func:`jdrop.dropout`: a drop-in replacement for ``equinox.nn.Dropout``.

For attention, :func:`multihead_attention` runs an ``equinox.nn.MultiheadAttention`` through
:func:`jdrop.dot_product_attention`: equinox's masks for the same key, in O(T) memory. equinox's module
has no ``attention_fn`` argument, so the function takes the module (its projections and dropout rate)::

    out = mha(q, k, v, key=key)                                             # equinox: (H, T, T) stored
    out = jdrop.interop.equinox.multihead_attention(mha, q, k, v, key=key)  # same output, blockwise

To train a module with :func:`jdrop.train_step` (every example its own key, so its own dropout masks;
BatchNorm over the whole batch), :func:`train_state` partitions it into a :class:`jdrop.TrainState` and
:func:`combine` turns the trained state back into a module::

    state = jdrop.interop.equinox.train_state(model, optax.adam(1e-3))   # = jdrop.TrainState.from_equinox
    state, metrics = jdrop.train_step(state, batch, key)
    model = jdrop.interop.equinox.combine(state)

:class:`DropPath` is stochastic depth (timm's ``DropPath``) as an equinox module.
"""

from __future__ import annotations

import warnings
from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, PRNGKeyArray

from jdrop._batching import BatchAxis
from jdrop._dropout import Residual, Scale, dropout
from jdrop._validation import check_rate, require_key
from jdrop.attention import dot_product_attention
from jdrop.interop import _check_fields
from jdrop.interop._equinox_train import EquinoxApply, combine, train_state
from jdrop.variants.stochastic_depth import drop_path

__all__ = ["DropPath", "Dropout", "EquinoxApply", "combine", "multihead_attention", "train_state"]


class Dropout(eqx.Module):
    """Dropout (Srivastava et al. 2014) as an ``equinox`` module, computed by :func:`jdrop.dropout`.

    The fields, call signature and errors of ``equinox.nn.Dropout`` (``p``, ``inference``,
    ``key=``, the deprecated ``deterministic``; toggled with ``equinox.nn.inference_mode``), plus
    jdrop's ``scale`` and ``residual``. A missing key in training raises jdrop's error for every
    op, a ``ValueError`` that is also the ``RuntimeError`` equinox raises. The mask is
    ``jdrop.dropout``'s for ``key``, which is equinox's mask (``jax.random.bernoulli(key, 1 - p,
    x.shape)``): same model, same keys, same outputs and gradients (to float rounding). With ``m``
    that mask and ``keep = 1 - p`` (to 2**-23, see :func:`jdrop.dropout`)::

        scale="inverted" (equinox's):  train  y = m * x / keep      inference  y = x
        scale="classic":               train  y = m * x             inference  y = keep * x

    Unlike equinox, the backward pass does not keep the mask unless asked: ``residual="key"``
    regenerates it from the key, ``"bits"`` keeps it packed 1 bit per element, ``"mask"`` keeps
    the bool mask as equinox does. All three give the same gradients, and ``p = 1`` gives zero
    (not NaN) gradients.

    Example::

      >>> import equinox as eqx, jax, jax.numpy as jnp
      >>> from jdrop.interop import equinox as jdrop_eqx
      >>> dropout = jdrop_eqx.Dropout(0.5)
      >>> y = dropout(jnp.ones(8), key=jax.random.key(0))              # train: m * x / 0.5
      >>> y = eqx.nn.inference_mode(dropout)(jnp.ones(8))              # inference: x
    """

    # Not static, as in equinox: one may want to change them with equinox.tree_at.
    p: float
    inference: bool
    # Static: they choose the computation, and are strings (not arrays) in any case.
    scale: Scale = eqx.field(static=True)
    residual: Residual | None = eqx.field(static=True)

    def __init__(
        self,
        p: float = 0.5,
        inference: bool = False,
        *,
        deterministic: bool | None = None,
        scale: Scale = "inverted",
        residual: Residual | None = None,
    ):
        """**Arguments:**

        - `p`: The fraction of entries to set to zero. (On average.)
        - `inference`: Whether to actually apply dropout at all. If `True` then dropout is *not*
            applied. May be toggled with `equinox.nn.inference_mode` or overridden at call time.
        - `deterministic`: Deprecated alternative to `inference` (as in equinox).
        - `scale`: `"inverted"` (default, equinox's) or `"classic"`.
        - `residual`: `"key"`, `"bits"` or `"mask"`: what the backward pass keeps (None: the default
          per key implementation, see `jdrop.dropout`).
        """
        if deterministic is not None:
            inference = deterministic
            warnings.warn("Dropout(deterministic=...) is deprecated in favour of Dropout(inference=...)", stacklevel=2)
        _check_fields(scale, residual)
        check_rate(p, name="p")
        self.p = p
        self.inference = inference
        self.scale = scale
        self.residual = residual

    # Backward compatibility, as in equinox.
    @property
    def deterministic(self) -> bool:
        return self.inference

    def __call__(
        self,
        x: Array,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        deterministic: bool | None = None,
    ) -> Array:
        """**Arguments:**

        - `x`: A floating JAX array of any shape to dropout.
        - `key`: A PRNG key providing the randomness of the mask. (Keyword only argument.)
        - `inference`: If `True` or `False`, takes priority over `self.inference`; if `None`,
            `self.inference` is used.
        - `deterministic`: Deprecated alternative to `inference` (as in equinox).

        **Returns:**

        The dropped-out array, same shape and dtype as `x`.
        """
        if deterministic is not None:
            inference = deterministic
            warnings.warn(
                "Dropout()(deterministic=...) is deprecated in favour of Dropout()(inference=...)", stacklevel=2
            )
        if inference is None:
            inference = self.inference
        p = check_rate(self.p, name="p")  # equinox's name for the rate, also after equinox.tree_at
        if isinstance(p, float) and p == 0:
            inference = True
        with jax.named_scope("jdrop.interop.equinox.Dropout"):
            if inference:
                return dropout(None, x, p, deterministic=True, scale=self.scale, residual=self.residual)
            key = require_key(key, what="jdrop.interop.equinox.Dropout", eval_hint="inference=True")
            return dropout(key, x, p, scale=self.scale, residual=self.residual)


class DropPath(eqx.Module):
    """Stochastic depth (Huang et al. 2016) as an ``equinox`` module, computed by :func:`jdrop.drop_path`.

    timm's ``DropPath`` with ``equinox.nn.Dropout``'s conventions (``p``, ``inference``, ``key=``, toggled
    with ``equinox.nn.inference_mode``): on a residual branch, ``x + drop_path(f(x), key=key)``. With
    ``m ~ Bernoulli(1 - p)`` drawn once per example and shared by all its elements::

        scale="inverted" (timm's):  train  y = m * x / keep      inference  y = x
        scale="classic" (paper's):  train  y = m * x             inference  y = keep * x

    An equinox module sees ONE example (``jax.vmap`` makes the batch, as :meth:`jdrop.TrainState.from_equinox`
    does), so ``batch_axis`` defaults to None: the whole input is one example, one draw. Pass
    ``batch_axis=0`` to call it on a batch (one draw per sample, as timm).

    Example::

      >>> drop_path = jdrop.interop.equinox.DropPath(0.1)
      >>> h = x + drop_path(block(x), key=key)                          # x: one example, (T, C)
      >>> h = x + eqx.nn.inference_mode(drop_path)(block(x))            # inference: identity
    """

    p: float
    inference: bool
    batch_axis: BatchAxis = eqx.field(static=True)
    scale: Scale = eqx.field(static=True)

    def __init__(self, p: float, inference: bool = False, *, batch_axis: BatchAxis = None, scale: Scale = "inverted"):
        """**Arguments:**

        - `p`: The probability of dropping an example's branch.
        - `inference`: Whether to leave the branch as it is. May be toggled with `equinox.nn.inference_mode`
            or overridden at call time.
        - `batch_axis`: The example axis; None (default): the input is one example.
        - `scale`: `"inverted"` (default, timm's) or `"classic"`.
        """
        _check_fields(scale, "key")
        check_rate(p, name="p")
        self.p = p
        self.inference = inference
        self.batch_axis = batch_axis
        self.scale = scale

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None, inference: bool | None = None) -> Array:
        """**Arguments:**

        - `x`: A floating JAX array: the residual branch's output.
        - `key`: A PRNG key providing the randomness of the draw. (Keyword only argument.)
        - `inference`: If `True` or `False`, takes priority over `self.inference`.

        **Returns:**

        The branch, dropped or rescaled; same shape and dtype as `x`.
        """
        inference = self.inference if inference is None else inference
        p = check_rate(self.p, name="p")
        options: dict[str, Any] = dict(batch_axis=self.batch_axis, scale=self.scale)
        if inference or (isinstance(p, float) and p == 0):
            return drop_path(None, x, p, deterministic=True, **options)
        key = require_key(key, what="jdrop.interop.equinox.DropPath", eval_hint="inference=True")
        return drop_path(key, x, p, **options)


def multihead_attention(
    attention: eqx.nn.MultiheadAttention,
    query: Array,
    key_: Array,
    value: Array,
    mask: Array | None = None,
    *,
    key: PRNGKeyArray | None = None,
    inference: bool | None = None,
) -> Array:
    """``attention(query, key_, value, mask, key=key, inference=inference)`` by :func:`jdrop.dot_product_attention`.

    The same computation as calling the ``equinox.nn.MultiheadAttention`` module (its projections,
    ``1/sqrt(D)`` scaling, masking and ``attention.dropout``), the same dropout masks for the same
    ``key`` (head ``h`` drops with ``jax.random.bernoulli(split(key, H)[h], 1 - p, (Tq, Tk))``, as
    equinox draws it), so the same output and gradients to float rounding. With ``P`` the softmax
    probabilities of a head and ``m`` its mask::

        train      out_h = (m * P / keep) @ V_h           inference  out_h = P @ V_h

    but computed blockwise (Rabe & Staats 2021; Dao et al. 2022): no ``(H, Tq, Tk)`` array is stored
    or built, and the backward pass regenerates the masks from the key.

    Args:
      attention: the equinox module (``process_heads`` and ``MultiheadAttention`` subclasses that
        change ``__call__`` are not supported).
      query: ``(Tq, query_size)``; call under ``jax.vmap`` for a batch, as with the module.
      key_: ``(Tk, key_size)``.
      value: ``(Tk, value_size)``.
      mask: bool ``(Tq, Tk)`` or ``(num_heads, Tq, Tk)``; False entries are masked out.
      key: PRNG key of the dropout masks (needed when dropout is on).
      inference: overrides ``attention.dropout.inference`` when not None.

    Returns:
      ``(Tq, output_size)``, as the module returns.

    Example::

      >>> mha = eqx.nn.MultiheadAttention(4, 64, dropout_p=0.1, key=jax.random.key(0))
      >>> x = jnp.ones((128, 64))
      >>> out = jdrop_eqx.multihead_attention(mha, x, x, x, key=jax.random.key(1))
    """
    rate = attention.dropout.p
    inference = attention.dropout.inference if inference is None else inference
    deterministic = bool(inference) or (isinstance(rate, (int, float)) and rate == 0)
    if not deterministic:
        key = require_key(key, what="jdrop.interop.equinox.multihead_attention", eval_hint="inference=True")

    def project(linear: eqx.nn.Linear, x: Array) -> Array:
        return jax.vmap(linear)(x).reshape(x.shape[0], attention.num_heads, -1)

    query_heads = project(attention.query_proj, query)
    key_heads = project(attention.key_proj, key_)
    value_heads = project(attention.value_proj, value)
    keys = None if deterministic or key is None else jax.random.split(key, attention.num_heads)

    def one_head(q: Array, k: Array, v: Array, head_mask: Array | None, head_key: Array | None) -> Array:
        # (T, 1, D) per head with a broadcast (Tq, Tk) mask drawn from the head's key: equinox's mask.
        return dot_product_attention(
            q[:, None], k[:, None], v[:, None], mask=head_mask, dropout_rng=head_key, dropout_rate=rate,
            deterministic=deterministic,
        )[:, 0]

    per_head_mask = mask is not None and mask.ndim == 3
    out = jax.vmap(one_head, in_axes=(1, 1, 1, 0 if per_head_mask else None, None if keys is None else 0),
                   out_axes=1)(query_heads, key_heads, value_heads, mask, keys)
    return jax.vmap(attention.output_proj)(out.reshape(query.shape[0], -1))
