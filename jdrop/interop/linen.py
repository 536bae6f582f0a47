"""``flax.linen`` Dropout around :func:`jdrop.dropout`: a drop-in replacement for ``flax.linen.Dropout``.

For attention, pass ``attention_fn=jdrop.dot_product_attention`` to ``flax.linen.MultiHeadDotProductAttention``:
the same dropout mask for the same rngs, in O(T) memory (see :func:`jdrop.dot_product_attention`).

A flax transformer gets jdrop's dropout everywhere with two changes, same parameters, same rngs, same
outputs and gradients (to float rounding)::

    Dropout = jdrop.interop.linen.Dropout       # was flax.linen.Dropout: residual and MLP dropout
    nn.MultiHeadDotProductAttention(heads, dropout_rate=0.1, attention_fn=jdrop.dot_product_attention)

flax's attention draws its mask with ``self.make_rng("dropout")`` and passes it as ``dropout_rng`` to
``attention_fn``, which draws ``bernoulli(dropout_rng, 1 - rate, (B, H, Tq, Tk))`` (or ``(1, 1, Tq, Tk)`` with
``broadcast_dropout``) tile by tile, flax's mask. Both work under ``nn.remat``. For a 4-block, width-256
transformer at T=512 this takes a training step from 1.39x the temporary memory of the model without dropout
to 0.62x (see BENCHMARKS.md, "Transformer benchmark").

:class:`DropPath` is stochastic depth (timm's ``DropPath``) as a linen module. To train a linen model with
:func:`jdrop.train_step` (every example its own dropout mask, BatchNorm over the whole batch),
:func:`train_state` builds the :class:`jdrop.TrainState` and :func:`variables` gives the trained variables::

    state = jdrop.interop.linen.train_state(model, variables, optax.adam(1e-3))   # = jdrop.TrainState.from_linen
    state, metrics = jdrop.train_step(state, batch, key)
    variables = jdrop.interop.linen.variables(state)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import PRNGKey

from jdrop._batching import AUTO, BatchAxis
from jdrop._dropout import dropout
from jdrop._typing import Residual, Scale
from jdrop._validation import check_float_input
from jdrop.interop import _check_fields, _concrete_rate, _drop_path_module
from jdrop.interop._linen_train import LinenApply, train_state, variables

__all__ = ["DropPath", "Dropout", "LinenApply", "train_state", "variables"]


class Dropout(nn.Dropout):
    """Dropout (Srivastava et al. 2014) as a ``flax.linen`` module, computed by :func:`jdrop.dropout`.

    A subclass of ``flax.linen.Dropout`` with its fields, call signature, rng handling and errors:
    the key is ``rng`` if given, else ``self.make_rng(rng_collection)``, drawn only when a mask is
    needed (not in deterministic mode, nor at rate 0 or 1), so the rng collection advances as
    with ``flax.linen.Dropout``. That key goes to ``jdrop.dropout``, whose mask is flax's mask
    (``jax.random.bernoulli(key, 1 - rate)``): same model, same rngs, same outputs and gradients
    (to float rounding). With ``m`` that mask, shared along ``broadcast_dims``, and
    ``keep = 1 - rate`` (to 2**-23, see :func:`jdrop.dropout`)::

        scale="inverted" (flax's):  train  y = m * x / keep      deterministic  y = x
        scale="classic":            train  y = m * x             deterministic  y = keep * x

    Unlike flax, the backward pass does not keep the mask unless asked: ``residual="key"``
    regenerates it from the key, ``"bits"`` keeps it packed 1 bit per element, ``"mask"`` keeps
    the bool mask as flax does. All three give the same gradients.

    Attributes:
      rate: the dropout probability (*not* the keep rate!).
      broadcast_dims: dimensions that will share the same dropout mask.
      deterministic: if False the inputs are masked and scaled; if True no mask is applied. May
        instead be passed at call time (exactly one of the two, as ``flax.linen.merge_param``
        requires).
      rng_collection: the rng collection name to use when requesting an rng key.
      scale: ``"inverted"`` (default, flax's) or ``"classic"``.
      residual: ``"key"``, ``"bits"`` or ``"mask"``: what the backward pass keeps (None: the
        default per key implementation, see :func:`jdrop.dropout`).

    Example::

      >>> import flax.linen as nn
      >>> import jax, jax.numpy as jnp
      >>> from jdrop.interop import linen as jdrop_linen
      >>> class MLP(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x, train):
      ...     x = nn.Dense(4)(x)
      ...     return jdrop_linen.Dropout(0.5, deterministic=not train)(x)
      >>> x = jnp.ones((1, 3))
      >>> variables = MLP().init(jax.random.key(0), x, train=False)
      >>> y = MLP().apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)})
    """

    scale: Scale = "inverted"
    residual: Residual | None = None

    def __post_init__(self) -> None:
        _check_fields(self.scale, self.residual)
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None, rng: PRNGKey | None = None) -> jax.Array:
        """Applies a random dropout mask to the input.

        Args:
          inputs: the inputs that should be randomly masked (a floating array).
          deterministic: if False the inputs are masked and scaled; if True no mask is applied.
          rng: an optional PRNG key used as the random key; if not given, one is generated with
            ``make_rng`` from the ``rng_collection`` collection.

        Returns:
          The masked inputs, reweighted to preserve the mean; same shape and dtype.
        """
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        rate = _concrete_rate(self.rate)
        options: dict[str, Any] = dict(broadcast_dims=self.broadcast_dims, scale=self.scale, residual=self.residual)
        if rate == 0.0 or deterministic:
            return dropout(None, inputs, self.rate, deterministic=True, **options)
        if rate == 1.0:
            # flax draws no key at rate 1; neither do we, so later make_rng calls stay in step.
            return jnp.zeros_like(check_float_input(inputs))
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        return dropout(rng, inputs, self.rate, **options)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) as a ``flax.linen`` module, computed by :func:`jdrop.drop_path`.

    timm's ``DropPath`` with flax's conventions (``deterministic``, ``rng_collection``, ``make_rng``, as
    :class:`Dropout`): on a residual branch, ``x + DropPath(rate)(f(x), deterministic=...)``. With ``m ~
    Bernoulli(1 - rate)`` drawn once per example and shared by all its elements::

        scale="inverted" (timm's):  train  y = m * x / keep      deterministic  y = x
        scale="classic" (paper's):  train  y = m * x             deterministic  y = keep * x

    The key is ``rng`` if given, else ``self.make_rng(rng_collection)``, drawn only when a mask is
    needed (not in deterministic mode, nor at rate 0 or 1). The examples: by default
    (``batch_axis="auto"``) axis 0 of a batch, one draw per sample as timm, and the whole input inside an
    ``apply_fn`` run per example by :func:`jdrop.train_step` (:func:`jdrop.TrainState.from_linen`); pass
    ``batch_axis=None`` under your own ``nn.vmap`` over examples.

    Attributes:
      rate: the probability of dropping an example's branch.
      deterministic: if True no mask is applied; may instead be passed at call time.
      rng_collection: the rng collection to draw the key from.
      batch_axis: the example axis, None (the input is one example) or ``"auto"`` (see above).
      scale: ``"inverted"`` (default, timm's) or ``"classic"``.

    Example::

      >>> class Block(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x, deterministic):
      ...     return x + jdrop.interop.linen.DropPath(0.1)(nn.Dense(x.shape[-1])(x), deterministic)
    """

    rate: float
    deterministic: bool | None = None
    rng_collection: str = "dropout"
    batch_axis: BatchAxis = AUTO
    scale: Scale = "inverted"

    def __post_init__(self) -> None:
        _check_fields(self.scale, "key")
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None, rng: PRNGKey | None = None) -> jax.Array:
        """Drops the whole of each example's ``inputs`` (a floating array) with probability ``rate``.

        Args:
          inputs: the residual branch's output.
          deterministic: if True no mask is applied (exactly one of this and the attribute is given).
          rng: an optional key; if not given, one is drawn with ``make_rng(rng_collection)``.

        Returns:
          Array of ``inputs``' shape and dtype.
        """
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        return _drop_path_module(inputs, self.rate, deterministic,
                                 lambda: self.make_rng(self.rng_collection) if rng is None else rng,
                                 dict(batch_axis=self.batch_axis, scale=self.scale))
