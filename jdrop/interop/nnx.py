"""``flax.nnx`` Dropout around :func:`jdrop.dropout`: a drop-in replacement for ``flax.nnx.Dropout``.

For attention, pass ``attention_fn=jdrop.dot_product_attention`` to ``flax.nnx.MultiHeadAttention``: the
same dropout mask for the same rngs, in O(T) memory (see :func:`jdrop.dot_product_attention`).

A flax.nnx transformer gets jdrop's dropout everywhere with two changes, same parameters, same rngs, same
outputs and gradients (to float rounding)::

    self.dropout = jdrop.interop.nnx.Dropout(0.1, rngs=rngs)       # was nnx.Dropout: residual and MLP dropout
    self.attention = nnx.MultiHeadAttention(heads, width, dropout_rate=0.1, decode=False, rngs=rngs,
                                            attention_fn=jdrop.dot_product_attention)

nnx's attention draws ``dropout_rng`` from its ``rngs`` stream (the call's ``rngs``, else the module's) and
passes it to ``attention_fn``, which draws flax's mask tile by tile. Both work under ``nnx.remat``; see
BENCHMARKS.md, "Transformer benchmark", for the memory and time.

To train a module with :func:`jdrop.train_step` (every example its own dropout mask, BatchNorm over the
whole batch), :func:`train_state` splits it into a :class:`jdrop.TrainState` and :func:`merge` turns the
trained state back into a module::

    state = jdrop.interop.nnx.train_state(model, optax.adam(1e-3))    # = jdrop.TrainState.from_nnx
    state, metrics = jdrop.train_step(state, batch, key)
    model = jdrop.interop.nnx.merge(state)

:class:`DropPath` is stochastic depth (timm's ``DropPath``) as an nnx module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdrop._batching import AUTO, BatchAxis
from jdrop._dropout import Residual, Scale, dropout
from jdrop._validation import check_float_input
from jdrop.interop import _check_fields, _concrete_rate, _drop_path_module
from jdrop.interop._nnx_train import NnxApply, merge, train_state

__all__ = ["DropPath", "Dropout", "NnxApply", "merge", "train_state"]

_NO_DETERMINISTIC = (
    "No `deterministic` argument was provided to {layer}. Pass it to the constructor "
    "({layer}(..., deterministic=True/False)) or to the call (layer(x, deterministic=True/False)), "
    "or set it with model.train() / model.eval() or nnx.view(model, deterministic=True/False)."
)
_NO_RNGS = (
    "`deterministic` is False, but no `rngs` argument was provided to {layer} as either a __call__ "
    "argument or a constructor argument: pass rngs=nnx.Rngs(dropout=seed) to one of them."
)


class Dropout(nnx.Dropout):
    """Dropout (Srivastava et al. 2014) as a ``flax.nnx`` module, computed by :func:`jdrop.dropout`.

    A subclass of ``flax.nnx.Dropout`` (so ``model.train()``, ``model.eval()``, ``nnx.view`` and
    filters on ``nnx.Dropout`` treat it as one) with its arguments, rng streams and errors: the key
    is drawn from the call's ``rngs`` if given, else from the stream forked at construction, and
    only when a mask is needed (not in deterministic mode, nor at rate 0 or 1), so the streams
    advance as with ``flax.nnx.Dropout``. That key goes to ``jdrop.dropout``, whose mask is flax's
    mask (``jax.random.bernoulli(key, 1 - rate)``): same model, same rngs, same outputs and
    gradients (to float rounding). With ``m`` that mask, shared along ``broadcast_dims``, and
    ``keep = 1 - rate`` (to 2**-23, see :func:`jdrop.dropout`)::

        scale="inverted" (flax's):  train  y = m * x / keep      deterministic  y = x
        scale="classic":            train  y = m * x             deterministic  y = keep * x

    Unlike flax, the backward pass does not keep the mask unless asked: ``residual="key"``
    regenerates it from the key, ``"bits"`` keeps it packed 1 bit per element, ``"mask"`` keeps
    the bool mask as flax does. All three give the same gradients.

    Args:
      rate: the dropout probability (*not* the keep rate!).
      broadcast_dims: dimensions that will share the same dropout mask.
      deterministic: if False the inputs are masked and scaled; if True no mask is applied.
        ``model.train()`` / ``model.eval()`` set it; the call's argument takes precedence.
      rng_collection: the rng collection name to use when requesting an rng key.
      rngs: an ``nnx.Rngs`` (its ``rng_collection`` stream is forked) or an ``nnx.RngStream``.
      scale: ``"inverted"`` (default, flax's) or ``"classic"``.
      residual: ``"key"``, ``"bits"`` or ``"mask"``: what the backward pass keeps (None: the
        default per key implementation, see :func:`jdrop.dropout`).

    Example::

      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> from jdrop.interop import nnx as jdrop_nnx
      >>> class MLP(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.linear = nnx.Linear(3, 4, rngs=rngs)
      ...     self.dropout = jdrop_nnx.Dropout(0.5, rngs=rngs)
      ...   def __call__(self, x):
      ...     return self.dropout(self.linear(x))
      >>> model = MLP(rngs=nnx.Rngs(0))
      >>> y_train = model(jnp.ones((1, 3)))   # dropout on
      >>> model.eval()
      >>> y_eval = model(jnp.ones((1, 3)))    # identity
    """

    def __init__(
        self,
        rate: float,
        *,
        broadcast_dims: Sequence[int] = (),
        deterministic: bool | None = False,
        rng_collection: str = "dropout",
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        scale: Scale = "inverted",
        residual: Residual | None = None,
    ):
        _check_fields(scale, residual)
        super().__init__(
            rate, broadcast_dims=broadcast_dims, deterministic=deterministic, rng_collection=rng_collection, rngs=rngs
        )
        self.scale = scale
        self.residual = residual

    def __call__(
        self,
        inputs: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> jax.Array:
        """Applies a random dropout mask to the input.

        Args:
          inputs: the inputs that should be randomly masked (a floating array).
          deterministic: if False the inputs are masked and scaled; if True no mask is applied.
            Takes precedence over the constructor's ``deterministic``.
          rngs: an optional key, ``nnx.RngStream`` or ``nnx.Rngs`` to draw the mask's key from;
            takes precedence over the ``rngs`` given to the constructor.

        Returns:
          The masked inputs, reweighted to preserve the mean; same shape and dtype.
        """
        if deterministic is None:
            deterministic = self.deterministic
        if deterministic is None:
            raise ValueError(_NO_DETERMINISTIC.format(layer="Dropout"))
        rate = _concrete_rate(self.rate)
        options: dict[str, Any] = dict(broadcast_dims=self.broadcast_dims, scale=self.scale, residual=self.residual)
        if rate == 0.0 or deterministic:
            return dropout(None, inputs, self.rate, deterministic=True, **options)
        if rate == 1.0:
            # flax draws no key at rate 1; neither do we, so the stream stays in step with flax's.
            return jnp.zeros_like(check_float_input(inputs))
        key = _draw_key(self.rngs if rngs is None else rngs, self.rng_collection, "Dropout")
        return dropout(key, inputs, self.rate, **options)


def _draw_key(rngs: Any, rng_collection: str, layer: str) -> jax.Array:
    """The mask's key from the call's (else the module's) ``rngs``, as ``flax.nnx.Dropout`` draws it."""
    if isinstance(rngs, nnx.Rngs):
        return rngs[rng_collection]()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    if isinstance(rngs, jax.Array):
        return rngs
    if rngs is None:
        raise ValueError(_NO_RNGS.format(layer=layer))
    raise TypeError(f"rngs must be a Rngs, RngStream or jax.Array, but got {type(rngs)}.")


def _fork(rngs: nnx.Rngs | nnx.RngStream | None, rng_collection: str) -> Any:
    """The module's own stream, forked from the constructor's ``rngs`` as ``flax.nnx.Dropout`` forks it."""
    if isinstance(rngs, nnx.Rngs):
        return rngs[rng_collection].fork()
    if isinstance(rngs, nnx.RngStream):
        return rngs.fork()
    if rngs is None:
        return nnx.data(None)
    raise TypeError(f"rngs must be a Rngs, RngStream or None, but got {type(rngs)}.")


class DropPath(nnx.Module):
    """Stochastic depth (Huang et al. 2016) as a ``flax.nnx`` module, computed by :func:`jdrop.drop_path`.

    timm's ``DropPath`` with ``flax.nnx.Dropout``'s conventions (``rngs`` streams forked at construction,
    ``deterministic`` set by ``model.train()`` / ``model.eval()``): on a residual branch,
    ``x + self.drop_path(f(x))``. With ``m ~ Bernoulli(1 - rate)`` drawn once per example and shared by all
    its elements::

        scale="inverted" (timm's):  train  y = m * x / keep      deterministic  y = x
        scale="classic" (paper's):  train  y = m * x             deterministic  y = keep * x

    The key is drawn from the call's ``rngs`` if given, else from the module's stream, only when a mask
    is needed (not in deterministic mode, nor at rate 0 or 1). The examples: by default
    (``batch_axis="auto"``) axis 0 of a batch, one draw per sample as timm, and the whole input inside
    :func:`jdrop.train_step` (:meth:`jdrop.TrainState.from_nnx` runs the module per example); pass
    ``batch_axis=None`` under your own ``nnx.vmap`` over examples.

    Args:
      rate: the probability of dropping an example's branch.
      deterministic: if True no mask is applied; ``model.train()`` / ``model.eval()`` set it.
      rng_collection: the rng stream to draw keys from.
      rngs: an ``nnx.Rngs`` (its ``rng_collection`` stream is forked) or an ``nnx.RngStream``.
      batch_axis: the example axis, None (the input is one example) or ``"auto"`` (see above).
      scale: ``"inverted"`` (default, timm's) or ``"classic"``.

    Example::

      >>> class Block(nnx.Module):
      ...   def __init__(self, width, rngs):
      ...     self.linear = nnx.Linear(width, width, rngs=rngs)
      ...     self.drop_path = jdrop.interop.nnx.DropPath(0.1, rngs=rngs)
      ...   def __call__(self, x):
      ...     return x + self.drop_path(self.linear(x))
    """

    def __init__(
        self,
        rate: float,
        *,
        deterministic: bool | None = False,
        rng_collection: str = "dropout",
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        batch_axis: BatchAxis = AUTO,
        scale: Scale = "inverted",
    ):
        _check_fields(scale, "key")
        _concrete_rate(rate)
        self.rate = rate
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.batch_axis = batch_axis
        self.scale = scale
        self.rngs = _fork(rngs, rng_collection)

    def __call__(
        self,
        inputs: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> jax.Array:
        """Drops the whole of each example's ``inputs`` with probability ``rate``.

        Args:
          inputs: the residual branch's output (a floating array).
          deterministic: if True no mask is applied; takes precedence over the attribute.
          rngs: an optional key, ``nnx.RngStream`` or ``nnx.Rngs``; takes precedence over the module's.

        Returns:
          Array of ``inputs``' shape and dtype.
        """
        if deterministic is None:
            deterministic = self.deterministic
        if deterministic is None:
            raise ValueError(_NO_DETERMINISTIC.format(layer="DropPath"))
        stream = self.rngs if rngs is None else rngs
        return _drop_path_module(inputs, self.rate, deterministic,
                                 lambda: _draw_key(stream, self.rng_collection, "DropPath"),
                                 dict(batch_axis=self.batch_axis, scale=self.scale))
