"""The one custom_vjp core of jdrop: ``dropout``, ``dropout_fwd`` and ``dropout_bwd``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdrop import masks
from jdrop._rates import check_float_input, check_rate, keep_probability, rate_is_valid

__all__ = ["DropoutResidual", "dropout", "dropout_bwd", "dropout_fwd"]

Scale = Literal["inverted", "classic"]
Residual = Literal["key", "bits", "mask"]
_SCALES = ("inverted", "classic")
_RESIDUALS = ("key", "bits", "mask")


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["key_data", "mask", "threshold", "valid"],
    meta_fields=["residual", "scale", "train", "impl", "mask_shape", "identity"],
)
@dataclasses.dataclass(frozen=True)
class DropoutResidual:
    """What :func:`dropout_bwd` needs to apply the forward pass's mask again.

    Per policy, the only per-element field is ``mask``:

    - ``"key"``: ``key_data`` (2 words for threefry); ``mask`` is None. The backward pass
      regenerates the mask from the key, so nothing per element is kept.
    - ``"bits"``: ``mask`` is the drawn mask packed 8 elements per byte (:func:`jdrop.masks.pack_bits`).
    - ``"mask"``: ``mask`` is the drawn bool mask (1 byte per element, what other libraries keep).
    - deterministic (``train=False``): no mask; the backward pass multiplies by the eval scale.

    ``threshold`` is the integer keep threshold (``ceil(keep * 2**23)``) and ``valid`` is False
    when a traced rate was outside [0, 1] (outputs and gradients are then NaN). ``identity`` marks a
    pass that is statically the identity (static rate 0, or inverted evaluation with a static rate):
    it returns its input itself, not a product with 1, which XLA:CPU would flush to zero for
    subnormal numbers outside ``jit``.
    """

    key_data: jax.Array | None
    mask: jax.Array | None
    threshold: jax.Array
    valid: jax.Array
    residual: str
    scale: str
    train: bool
    impl: str | None
    mask_shape: tuple[int, ...]
    identity: bool = False


def _multiplier(res: DropoutResidual, dtype: Any) -> jax.Array:
    """The factor applied to kept elements (train) or to every element (eval), NaN if invalid."""
    keep = res.threshold.astype(dtype) / dtype.type(2.0**masks.THRESHOLD_BITS)
    if res.train and res.scale == "inverted":
        factor = jnp.where(res.threshold > 0, 1.0 / jnp.where(res.threshold > 0, keep, 1.0), 0.0)
    elif res.train or res.scale == "inverted":
        factor = jnp.ones((), dtype)
    else:
        factor = keep
    return jnp.where(res.valid, factor, jnp.nan).astype(dtype)


def _compute_dtype(dtype: Any) -> np.dtype:
    return np.dtype(jnp.promote_types(dtype, jnp.float32))


def _apply(res: DropoutResidual, mask: jax.Array | None, values: jax.Array) -> jax.Array:
    """``values * mask * multiplier`` in at least float32, cast back to the input dtype."""
    if res.identity:
        return values
    dtype = _compute_dtype(values.dtype)
    factor = _multiplier(res, dtype)
    wide = values.astype(dtype)
    if mask is None:
        out = wide * factor
    else:
        fill = jnp.where(res.valid, dtype.type(0), dtype.type(np.nan))
        out = jnp.where(mask, wide * factor, fill)
    return out.astype(values.dtype)


def _mask_from_key(key_data: jax.Array, res: DropoutResidual, shape: tuple[int, ...]) -> jax.Array:
    """The keep mask at ``res.mask_shape``, for a consumer of ``shape`` (broadcast along ``broadcast_dims``)."""
    key = jax.random.wrap_key_data(key_data, impl=res.impl)
    bits = masks.random_bits(key, res.mask_shape, broadcast_to=shape)
    return masks.keep_from_bits(bits, res.threshold)


def _train_forward(
    cfg: tuple[str, str, str, tuple[int, ...]],
    key_data: jax.Array,
    x: jax.Array,
    threshold: jax.Array,
    valid: jax.Array,
) -> tuple[jax.Array, DropoutResidual]:
    residual, scale, impl, mask_shape = cfg
    res = DropoutResidual(key_data, None, threshold, valid, residual, scale, True, impl, mask_shape)
    mask = _mask_from_key(key_data, res, x.shape)
    y = _apply(res, mask, x)
    if residual == "bits":
        res = dataclasses.replace(res, key_data=None, mask=masks.pack_bits(mask))
    elif residual == "mask":
        res = dataclasses.replace(res, key_data=None, mask=mask)
    return y, res


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train_dropout(cfg, key_data, x, threshold, valid):
    return _train_forward(cfg, key_data, x, threshold, valid)[0]


def _train_dropout_bwd(cfg, res, dy):
    del cfg
    return None, dropout_bwd(res, dy), None, None


_train_dropout.defvjp(_train_forward, _train_dropout_bwd)


def dropout_bwd(res: DropoutResidual, dy: jax.Array) -> jax.Array:
    """Backward pass of dropout: ``dx = dy * m * s`` with the forward pass's mask ``m``.

    ``s`` is ``1 / keep`` (inverted) or 1 (classic) in training, and 1 (inverted) or ``keep``
    (classic) in a deterministic pass. With ``residual="key"`` the mask is regenerated from the
    key, tied to ``dy`` by an optimisation barrier. What the barrier does depends on the compiler:
    it stops XLA's common-subexpression pass from merging the regeneration with the forward pass's
    mask (which would then be kept alive as a per-element residual); XLA:CPU removes barriers right
    after that pass (``cse_barrier_expander``), so they do not constrain its fusion. Inside one
    ``jit`` XLA then computes the mask within the fusions that use it, forward and backward alike:
    the compiled step keeps nothing per element (``tests/test_dropout.py`` checks the temporary
    memory).

    Args:
      res: the residual returned by :func:`dropout_fwd`.
      dy: cotangent of the output, same shape as the forward input.

    Returns:
      ``dx``, with the dtype of ``dy``.
    """
    if not res.train:
        return _apply(res, None, dy)
    if res.residual == "key":
        key_data, dy = lax.optimization_barrier((res.key_data, dy))
        mask = _mask_from_key(key_data, res, dy.shape)
    else:
        assert res.mask is not None, "a bits/mask residual carries the mask"
        mask = masks.unpack_bits(res.mask, res.mask_shape) if res.residual == "bits" else res.mask
    return _apply(res, mask, dy)


def mask_residual(mask: jax.Array, rate: Any, *, scale: str = "inverted") -> DropoutResidual:
    """A training residual that holds ``mask`` itself, for ``dropout_bwd(res, dy) = dy * mask * s``.

    ``s`` is the training scale of ``rate`` (``1 / keep`` or 1) and a traced ``rate`` outside
    [0, 1] makes the result NaN, as in the forward pass. :mod:`jdrop.mlp` uses it with
    ``mask = [a > 0]`` for a ReLU layer's dropped activation ``a``, which is the dropout mask
    times ``relu'``: the backward pass then needs neither the key nor a stored mask.
    """
    threshold = masks.keep_threshold(keep_probability(rate))
    valid = jnp.asarray(rate_is_valid(rate))
    return DropoutResidual(None, mask, threshold, valid, "mask", scale, True, None, tuple(mask.shape))


def _check_options(scale: Any, residual: Any, deterministic: Any) -> None:
    if scale not in _SCALES:
        raise ValueError(f"`scale` must be one of {_SCALES}, got {scale!r}.")
    if residual not in _RESIDUALS:
        raise ValueError(f"`residual` must be one of {_RESIDUALS}, got {residual!r}.")
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(
            f"`deterministic` must be a Python bool (static), got {type(deterministic).__name__}. "
            "Choose train or eval outside jit, or mark it static."
        )


def _prepare(key, x, rate, deterministic, broadcast_dims, scale, residual):
    """Checks and canonicalises the arguments at trace time.

    Returns ``(x, train_args, None)`` for a training pass (the arguments of the custom_vjp core)
    or ``(x, None, res)`` for a deterministic one (``rate == 0`` statically counts as one).
    """
    x = check_float_input(x)
    _check_options(scale, residual, deterministic)
    rate = check_rate(rate)
    mask_shape = masks.broadcast_shape(x.shape, broadcast_dims)
    threshold = masks.keep_threshold(keep_probability(rate))
    valid = jnp.asarray(rate_is_valid(rate))
    static = isinstance(rate, float)
    if deterministic or (static and rate == 0.0):
        identity = static and (rate == 0.0 or scale == "inverted")
        res = DropoutResidual(None, None, threshold, valid, residual, scale, False, None, mask_shape, identity)
        return x, None, res
    key = masks.require_key(key, what="dropout")
    cfg = (residual, scale, str(jax.random.key_impl(key)), mask_shape)
    return x, (cfg, jax.random.key_data(key), x, threshold, valid), None


def dropout_fwd(
    key: Any,
    x: Any,
    rate: Any,
    *,
    deterministic: bool = False,
    broadcast_dims: Sequence[int] = (),
    scale: Scale = "inverted",
    residual: Residual = "key",
) -> tuple[jax.Array, DropoutResidual]:
    """Dropout's forward pass, returning the output and the residuals for :func:`dropout_bwd`.

    Same arguments and output as :func:`dropout`; use this pair when writing a backward pass by
    hand (as :mod:`jdrop.mlp` does). ``dropout_bwd(res, dy)`` is exactly the gradient that
    ``jax.vjp(dropout)`` gives.

    Returns:
      ``(y, res)`` where ``res`` is a :class:`DropoutResidual`.
    """
    x, train_args, eval_res = _prepare(key, x, rate, deterministic, broadcast_dims, scale, residual)
    if eval_res is not None:
        return _apply(eval_res, None, x), eval_res
    return _train_forward(*train_args)


def dropout(
    key: Any,
    x: Any,
    rate: Any,
    *,
    deterministic: bool = False,
    broadcast_dims: Sequence[int] = (),
    scale: Scale = "inverted",
    residual: Residual = "key",
) -> jax.Array:
    """Dropout (Hinton et al. 2012; Srivastava et al. 2014), with a custom_vjp backward pass.

    With ``m ~ Bernoulli(keep)`` per element (shared along ``broadcast_dims``),
    ``keep = ceil((1 - rate) * 2**23) / 2**23`` (within 2**-23 of ``1 - rate``)::

        scale="inverted":  train  y = m * x / keep      eval  y = x
        scale="classic":   train  y = m * x             eval  y = keep * x

    Both make the eval output equal the expected train output (exactly, since ``keep`` is the
    realised keep probability). The mask is ``jdrop.keep_mask(key, x.shape, rate)``, which equals
    ``jax.random.bernoulli(key, 1 - rate, ...)``: for the same key, the same mask as
    ``flax.linen.Dropout`` and ``equinox.nn.Dropout``.

    The backward pass is ``dx = dy * m * (1 / keep or 1)``, with the very same mask, read from
    the residual that ``residual`` selects:

    - ``"key"`` (default): nothing per element; the mask is regenerated from the key.
    - ``"bits"``: the mask packed 1 bit per element.
    - ``"mask"``: the bool mask, 1 byte per element (as flax, equinox and haiku keep it).

    ``rate`` may be a traced scalar (schedules, sweeps): one compilation serves all rates. A
    static rate outside [0, 1] raises ``ValueError``; a traced one outside [0, 1] makes the
    output and gradient NaN rather than silently using another rate. ``rate = 1`` gives zeros
    and zero gradients; ``rate = 0`` returns ``x`` unchanged. No gradient flows to ``rate``.

    Args:
      key: a PRNG key (``jax.random.key``; a legacy ``PRNGKey`` is accepted). May be None when
        ``deterministic``.
      x: floating array (float16, bfloat16, float32, float64); the output has its dtype.
      rate: drop probability in [0, 1].
      deterministic: evaluation mode (no randomness).
      broadcast_dims: dims along which one mask value is shared (e.g. the time axis).
      scale: ``"inverted"`` or ``"classic"``.
      residual: ``"key"``, ``"bits"`` or ``"mask"``.

    Returns:
      The dropped-out array, same shape and dtype as ``x``.

    Example::

      >>> y = jdrop.dropout(jax.random.key(0), jnp.ones((4, 8)), 0.5)
    """
    x, train_args, eval_res = _prepare(key, x, rate, deterministic, broadcast_dims, scale, residual)
    if eval_res is not None:
        return _apply(eval_res, None, x)
    return _train_dropout(*train_args)
