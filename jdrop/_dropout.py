"""The one differentiation core of jdrop: ``dropout``, ``dropout_fwd`` and ``dropout_bwd``.

Reverse mode runs :func:`dropout_fwd`'s forward pass and :func:`dropout_bwd` on its residual (the residual
policies); forward mode (``jax.jvp``, ``jacfwd``, ``linearize``) applies the same :func:`dropout_bwd` to the
tangent, dropout's Jacobian being diagonal (see ``_train_dropout_jvp``).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jdrop import masks
from jdrop._shard_map import in_manual_mesh
from jdrop._typing import KeyLike, Residual, Scale
from jdrop._validation import (
    check_deterministic,
    check_float_input,
    check_rate,
    check_residual,
    check_scale,
    keep_probability,
    nan_unless,
    rate_is_valid,
    require_key,
    warn_deprecated,
)

__all__ = ["DropoutResidual", "Residual", "Scale", "default_residual", "dropout", "dropout_bwd", "dropout_fwd",
           "keep_and_factor"]


class _Kind(enum.Enum):
    """What a residual keeps for the backward pass (``DropoutResidual.policy``)."""

    KEY = "key"  # the key's data: the mask is regenerated
    BITS = "bits"  # the mask packed 8 elements a byte
    MASK = "mask"  # the bool mask
    DETERMINISTIC = "deterministic"  # nothing: the backward pass multiplies by the evaluation scale


@dataclasses.dataclass(frozen=True)
class _Static:
    """The static part of a pass: hashable (the custom_vjp's non-differentiable argument, a residual's metadata)."""

    kind: _Kind
    scale: str
    impl: Any  # the key's PRNG implementation (a hashable PRNGSpec, custom ones too), to rebuild the key
    mask_shape: tuple[int, ...]
    # Statically the identity (static rate 0, or inverted evaluation with a static rate): the pass returns its
    # input itself, not a product with 1, which XLA:CPU would flush to zero for subnormals outside jit.
    identity: bool = False

    @property
    def train(self) -> bool:
        return self.kind is not _Kind.DETERMINISTIC


@partial(jax.tree_util.register_dataclass, data_fields=["saved", "_threshold", "_valid"], meta_fields=["_static"])
@dataclasses.dataclass(frozen=True)
class DropoutResidual:
    """What :func:`dropout_bwd` needs to apply the forward pass's mask again: a pytree, opaque but for its face.

    - ``policy``: what the backward pass reads the mask from: ``"key"`` (the mask is regenerated from
      the key), ``"bits"`` (the mask packed 8 elements a byte, :func:`jdrop.masks.pack_bits`),
      ``"mask"`` (the bool mask, 1 byte per element, what other libraries keep), or
      ``"deterministic"`` (an evaluation pass: no mask, the backward pass multiplies by the
      evaluation scale).
    - ``mask_shape``: the shape of the drawn mask (1 along ``broadcast_dims``).
    - ``saved``: the array kept per policy: the key's data (``uint32[2]`` for threefry), the packed
      ``uint8`` mask, the bool mask, or None; its ``nbytes`` is what a residual costs per layer.

    The rest (threshold, validity of a traced rate, scale, key implementation) is private. Build one
    with :func:`dropout_fwd`, or with :meth:`from_mask` for a mask you hold.
    """

    saved: jax.Array | None
    _threshold: jax.Array
    _valid: jax.Array
    _static: _Static

    @property
    def policy(self) -> str:
        """``"key"``, ``"bits"``, ``"mask"`` or ``"deterministic"``."""
        return self._static.kind.value

    @property
    def mask_shape(self) -> tuple[int, ...]:
        """The shape of the drawn mask (size 1 along the broadcast dims)."""
        return self._static.mask_shape

    @classmethod
    def from_mask(cls, mask: jax.Array, rate: ArrayLike, *, scale: str = "inverted") -> DropoutResidual:
        """A training residual holding ``mask`` itself: ``dropout_bwd(res, dy) = dy * mask * s``.

        ``s`` is the training scale of ``rate`` (``1 / keep`` for ``"inverted"``, with ``keep`` the
        realised keep probability, or 1 for ``"classic"``) and a traced ``rate`` outside [0, 1] makes the
        result NaN, as in the forward pass. :mod:`jdrop.mlp` uses it with ``mask = [a > 0]`` for a ReLU
        layer's dropped activation ``a``, which is the dropout mask times ``relu'``: the backward pass
        then needs neither the key nor a stored mask.

        Example::

          >>> res = jdrop.DropoutResidual.from_mask(a > 0, 0.5)
          >>> dx = jdrop.dropout_bwd(res, dy)           # dy * [a > 0] / 0.5
        """
        checked = check_rate(rate)
        threshold = masks.keep_threshold(keep_probability(checked))
        static = _Static(_Kind.MASK, check_scale(scale), None, tuple(mask.shape))
        return cls(mask, threshold, jnp.asarray(rate_is_valid(checked)), static)

    def __getattr__(self, name: str) -> Any:
        # The fields of the first DropoutResidual, kept readable (deprecated). Python calls this only for
        # names that are not attributes, so the dataclass and pytree machinery never come here.
        if name in _DEPRECATED_FIELDS:
            replacement, read = _DEPRECATED_FIELDS[name]
            warn_deprecated(f"DropoutResidual.{name} is deprecated; use {replacement}.", stacklevel=2)
            return read(self)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _payload_if(*kinds: _Kind) -> Callable[[DropoutResidual], Any]:
    return lambda res: res.saved if res._static.kind in kinds else None


_DEPRECATED_FIELDS: dict[str, tuple[str, Callable[[DropoutResidual], Any]]] = {
    "residual": ("res.policy", lambda res: res.policy),
    "train": ('res.policy != "deterministic"', lambda res: res._static.train),
    "key_data": ('res.saved (policy "key")', _payload_if(_Kind.KEY)),
    "mask": ('res.saved (policy "bits" or "mask")', _payload_if(_Kind.BITS, _Kind.MASK)),
    "threshold": ("jdrop.masks.keep_threshold", lambda res: res._threshold),
    "valid": ("nothing (private)", lambda res: res._valid),
    "scale": ("nothing (private)", lambda res: res._static.scale),
    "impl": ("nothing (private)", lambda res: res._static.impl),
    "identity": ("nothing (private)", lambda res: res._static.identity),
}


def _keep_and_factor(
    threshold: jax.Array, valid: jax.Array | bool, *, scale: str, train: bool, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """The realised keep probability and the factor of a pass, in ``dtype``; the factor is NaN if invalid.

    Train: kept elements are multiplied by ``1 / keep`` (inverted; 0 when ``keep = 0``, where nothing
    is kept) or 1 (classic). Eval: every element by 1 (inverted) or ``keep`` (classic). An invalid
    traced rate reaches NaN here, through :func:`jdrop._validation.nan_unless`, and only here.
    """
    keep = masks.realised_keep(threshold).astype(dtype)
    if train and scale == "inverted":
        factor = jnp.where(threshold > 0, 1.0 / jnp.where(threshold > 0, keep, 1.0), 0.0)
    elif train or scale == "inverted":
        factor = jnp.ones((), dtype)
    else:
        factor = keep
    return keep, (factor * nan_unless(valid, dtype)).astype(dtype)


def keep_and_factor(
    rate: ArrayLike, *, scale: str = "inverted", train: bool = True, dtype: Any = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """The realised keep probability of ``rate`` and the factor dropout multiplies by, as the core uses them.

    ``keep = ceil((1 - rate) * 2**23) / 2**23``; the factor is ``1 / keep`` (inverted training, 0 at
    ``keep = 0``), 1 (classic training, inverted evaluation) or ``keep`` (classic evaluation); NaN for a
    traced ``rate`` outside [0, 1]. Variants that scale by hand (alpha dropout, DropConnect's moments) use it.
    """
    checked = check_rate(rate)
    threshold = masks.keep_threshold(keep_probability(checked))
    return _keep_and_factor(threshold, rate_is_valid(checked), scale=check_scale(scale), train=train, dtype=dtype)


def _compute_dtype(dtype: Any) -> np.dtype:
    return np.dtype(jnp.promote_types(dtype, jnp.float32))


def _apply(static: _Static, threshold: jax.Array, valid: jax.Array, mask: jax.Array | None,
           values: jax.Array) -> jax.Array:
    """``values * mask * factor`` in at least float32, cast back to the input dtype."""
    if static.identity:
        return values
    dtype = _compute_dtype(values.dtype)
    _, factor = _keep_and_factor(threshold, valid, scale=static.scale, train=static.train, dtype=dtype)
    wide = values.astype(dtype)
    if mask is None:
        out = wide * factor
    else:
        fill = dtype.type(0) * factor  # dropped elements are NaN too when the factor is
        out = jnp.where(mask, wide * factor, fill)
    return out.astype(values.dtype)


def _mask_from_key(key_data: jax.Array, static: _Static, threshold: jax.Array, shape: tuple[int, ...],
                   tie: jax.Array | None = None) -> jax.Array:
    """The keep mask at ``static.mask_shape``, for a consumer of ``shape`` (broadcast along ``broadcast_dims``).

    A regeneration (``tie``: the backward pass's cotangent) is drawn on CPU in a kernel of its own
    (:func:`_staged_on_cpu`); the forward pass's draw, and every draw on other platforms, fuses into its consumer.
    """

    def draw(key_data: jax.Array, threshold: jax.Array) -> jax.Array:
        key = jax.random.wrap_key_data(key_data, impl=static.impl)
        bits = masks.random_bits(key, static.mask_shape, broadcast_to=shape, dtype=masks.bits_dtype(threshold))
        return masks.keep_from_bits(bits, threshold)

    # Only threefry's draw is staged: JAX batches the staging conditional under jax.vmap (a batched cotangent or
    # tangent, as in jacrev / jacfwd), and rbg's and unsafe_rbg's bits under vmap are not the unbatched bits.
    if tie is None or tie.size == 0 or str(static.impl) != "threefry2x32":
        return draw(key_data, threshold)
    return _staged_on_cpu(draw, key_data, threshold, tie)


def _staged_on_cpu(draw: Callable[[jax.Array, jax.Array], jax.Array], key_data: jax.Array, threshold: jax.Array,
                   tie: jax.Array) -> jax.Array:
    """``draw(key_data, threshold)``, the same mask, computed on CPU in a kernel of its own and passed on as bytes.

    Why: fused into its consumer (``dy * factor``, 4-byte floats), XLA:CPU's loop holds 8 elements per iteration,
    one 20-round threefry chain, and the loop alternates between computing and waiting for memory; alone, with a
    1-byte result, LLVM vectorizes the draw 32 elements wide (independent chains: 2 x 512 bits on AVX-512, 4 x 256
    on AVX2), and the consumer is a plain memory-bound pass. Measured on a 2-core AVX-512 CPU (``benchmarks/
    vag_isa.py``, BENCHMARKS.md): ``value_and_grad`` of dropout on 4096 x 4096 47 vs 61 ms (AVX2 code: 53 vs 67).

    The byte mask is a temporary between two kernels of the backward pass, never a residual: a conditional
    whose two branches are the same computation marks the kernel boundary (XLA:CPU fuses across
    ``optimization_barrier``), and its predicate, which changes nothing, reads an element of ``tie``, the
    cotangent, so no other draw of the same key is the same instruction for XLA to merge with. The forward pass
    is not staged for that reason: its draw equals other forward draws of the key (``jdrop.mlp`` regenerates
    masks through ``dropout_fwd``), and a merged, materialised draw would live from the forward pass to the
    backward pass. Under ``jax.vmap`` (per-example keys) the predicate is batched, JAX turns the conditional
    into a select of its two equal branches, and XLA fuses the draw as before. Other platforms fuse it as well.
    """

    def staged(key_data: jax.Array, threshold: jax.Array, tie: jax.Array) -> jax.Array:
        def as_bytes() -> jax.Array:
            return draw(key_data, threshold).astype(jnp.uint8)

        first = tie.reshape(-1)[0]  # first == first is False only for NaN: the branches are the same either way
        return lax.cond((key_data.reshape(-1)[0] == 0) & (first == first), as_bytes, as_bytes) != 0

    def fused(key_data: jax.Array, threshold: jax.Array, tie: jax.Array) -> jax.Array:
        del tie
        return draw(key_data, threshold)

    return lax.platform_dependent(key_data, threshold, tie, cpu=staged, default=fused)


# What a training pass keeps, per policy: (key_data, mask) -> saved.
_SAVE: dict[_Kind, Callable[[jax.Array, jax.Array], jax.Array]] = {
    _Kind.KEY: lambda key_data, mask: key_data,
    _Kind.BITS: lambda key_data, mask: masks.pack_bits(mask),
    _Kind.MASK: lambda key_data, mask: mask,
}


def _train_forward(
    static: _Static, key_data: jax.Array, x: jax.Array, threshold: jax.Array, valid: jax.Array
) -> tuple[jax.Array, DropoutResidual]:
    mask = _mask_from_key(key_data, static, threshold, x.shape)
    y = _apply(static, threshold, valid, mask, x)
    return y, DropoutResidual(_SAVE[static.kind](key_data, mask), threshold, valid, static)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _train_dropout(static, key_data, x, threshold, valid):
    return _train_forward(static, key_data, x, threshold, valid)[0]


@_train_dropout.defjvp
def _train_dropout_jvp(static, primals, tangents):
    """``(y, J dx)`` with ``J = diag(m * s)``: the tangent is :func:`dropout_bwd` of the forward pass's residual.

    Dropout is linear and its Jacobian diagonal, so ``J = J^T`` and one function, :func:`dropout_bwd`, is
    both the forward-mode and the reverse-mode rule. ``lax.custom_linear_solve`` carries it: an
    application of a linear map whose transpose JAX does not derive but takes from us (``transpose_solve``,
    here the same :func:`dropout_bwd`). So ``jax.jvp``, ``jacfwd`` and ``linearize`` evaluate it on the
    tangent; ``jax.grad`` / ``vjp`` linearize this rule, keep exactly :func:`dropout_fwd`'s residual (the key's
    data, the packed bits or the bool mask: the residual policy) and run :func:`dropout_bwd` on the
    cotangent, as a custom_vjp would; higher orders (``jax.hessian``) compose, since the tangent of the solve
    is the solve of the tangent.
    """
    key_data, x, threshold, valid = primals
    y, res = _train_forward(static, key_data, x, threshold, valid)
    dx = tangents[1]
    return y, lax.custom_linear_solve(lambda t: t, dx, lambda _, t: dropout_bwd(res, t), symmetric=True)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _vjp_train_dropout(static, key_data, x, threshold, valid):
    """Reverse mode only, inside ``jax.shard_map`` (:func:`jdrop._shard_map.in_manual_mesh`): the same forward pass
    and :func:`dropout_bwd` as :func:`_train_dropout`; ``jax.jvp`` of it raises JAX's custom_vjp error."""
    return _train_forward(static, key_data, x, threshold, valid)[0]


def _vjp_train_dropout_bwd(static, res, dy):
    del static
    return None, dropout_bwd(res, dy), None, None


_vjp_train_dropout.defvjp(_train_forward, _vjp_train_dropout_bwd)


def _regenerated_mask(res: DropoutResidual, dy: jax.Array) -> tuple[jax.Array | None, jax.Array]:
    key_data, dy = lax.optimization_barrier((res.saved, dy))
    return _mask_from_key(key_data, res._static, res._threshold, dy.shape, tie=dy), dy


# The mask the backward pass applies, per policy: (res, dy) -> (mask or None, dy).
_MASK_OF: dict[_Kind, Callable[[DropoutResidual, jax.Array], tuple[jax.Array | None, jax.Array]]] = {
    _Kind.KEY: _regenerated_mask,
    _Kind.BITS: lambda res, dy: (masks.unpack_bits(cast(jax.Array, res.saved), res.mask_shape), dy),
    _Kind.MASK: lambda res, dy: (res.saved, dy),
    _Kind.DETERMINISTIC: lambda res, dy: (None, dy),
}


def dropout_bwd(res: DropoutResidual, dy: jax.Array) -> jax.Array:
    """Backward pass of dropout: ``dx = dy * m * s`` with the forward pass's mask ``m``.

    ``s`` is ``1 / keep`` (inverted) or 1 (classic) in training, and 1 (inverted) or ``keep``
    (classic) in a deterministic pass. With ``residual="key"`` the mask is regenerated from the
    key, tied to ``dy`` by an optimisation barrier. What the barrier does depends on the compiler:
    it stops XLA's common-subexpression pass from merging the regeneration with the forward pass's
    mask (which would then be kept alive as a per-element residual); XLA:CPU removes barriers right
    after that pass (``cse_barrier_expander``), so they do not constrain its fusion. Inside one
    ``jit`` XLA then computes the mask within the fusions that use it; on CPU the regeneration is
    drawn in a kernel of its own and handed to the multiply as a temporary byte mask, 1.3x faster
    (``_staged_on_cpu``). Either way the compiled step keeps nothing per element
    (``tests/test_dropout.py`` checks the temporary memory).

    Args:
      res: the residual returned by :func:`dropout_fwd`.
      dy: cotangent of the output, same shape as the forward input.

    Returns:
      ``dx``, with the dtype of ``dy``.
    """
    mask, dy = _MASK_OF[res._static.kind](res, dy)
    return _apply(res._static, res._threshold, res._valid, mask, dy)


def default_residual(key: jax.Array, mask_shape: tuple[int, ...], threshold: jax.Array) -> str:
    """The residual policy ``residual=None`` picks for this key: ``"key"`` where regenerating is cheap, else ``"bits"``.

    ``"key"`` when jdrop draws the bits itself with its fused threefry (:func:`jdrop.masks.threefry_layout`:
    threefry keys, either counter layout, 32- or 64-bit words): the regeneration fuses into the backward
    pass's multiply and nothing per element is kept. ``"bits"`` (the mask packed 1 bit per element) for every
    other key (rbg, unsafe_rbg, philox, a user's implementation, threefry arrays past the fused layouts): their
    bits come only from ``jax.random.bits``, and drawing them again in the backward pass is a second full RNG
    call; the packed mask is read instead, at an eighth of the memory of the bool mask flax and equinox keep
    (``benchmarks/key_impls.py`` measures every policy against plain bernoulli dropout).
    """
    fused = masks.threefry_layout(key, mask_shape, masks.bits_dtype(threshold)) is not None
    return "key" if fused else "bits"


class _Call(NamedTuple):
    """A checked call: a training pass (``key_data`` set) or a deterministic one (``key_data`` None)."""

    x: jax.Array
    static: _Static
    threshold: jax.Array
    valid: jax.Array
    key_data: jax.Array | None

    def eval_residual(self) -> DropoutResidual:
        return DropoutResidual(None, self.threshold, self.valid, self.static)

    def train_arguments(self) -> tuple[Any, ...]:
        """The arguments of the custom_vjp core (and of its forward rule)."""
        return self.static, self.key_data, self.x, self.threshold, self.valid


def _prepare(key, x, rate, deterministic, broadcast_dims, scale, residual) -> _Call:
    """Checks and canonicalises the arguments at trace time (``rate == 0`` statically is deterministic)."""
    x = check_float_input(x)
    scale, residual = check_scale(scale), check_residual(residual)
    deterministic = check_deterministic(deterministic)
    rate = check_rate(rate)
    mask_shape = masks.broadcast_shape(x.shape, broadcast_dims)
    threshold = masks.keep_threshold(keep_probability(rate))
    valid = jnp.asarray(rate_is_valid(rate))
    static = isinstance(rate, float)
    if deterministic or (static and rate == 0.0):
        identity = static and (rate == 0.0 or scale == "inverted")
        return _Call(x, _Static(_Kind.DETERMINISTIC, scale, None, mask_shape, identity), threshold, valid, None)
    key = require_key(key, what="dropout")
    residual = default_residual(key, mask_shape, threshold) if residual is None else residual
    options = _Static(_Kind(residual), scale, jax.random.key_impl(key), mask_shape)
    return _Call(x, options, threshold, valid, jax.random.key_data(key))


def dropout_fwd(
    key: KeyLike | None,
    x: ArrayLike,
    rate: ArrayLike,
    *,
    deterministic: bool = False,
    broadcast_dims: Sequence[int] = (),
    scale: Scale = "inverted",
    residual: Residual | None = None,
) -> tuple[jax.Array, DropoutResidual]:
    """Dropout's forward pass, returning the output and the residuals for :func:`dropout_bwd`.

    Same arguments and output as :func:`dropout`; use this pair when writing a backward pass by
    hand (as :mod:`jdrop.mlp` does). ``dropout_bwd(res, dy)`` is exactly the gradient that
    ``jax.vjp(dropout)`` gives.

    Returns:
      ``(y, res)`` where ``res`` is a :class:`DropoutResidual`.
    """
    call = _prepare(key, x, rate, deterministic, broadcast_dims, scale, residual)
    if call.key_data is None:
        res = call.eval_residual()
        return _apply(call.static, call.threshold, call.valid, None, call.x), res
    return _train_forward(*call.train_arguments())


def dropout(
    key: KeyLike | None,
    x: ArrayLike,
    rate: ArrayLike,
    *,
    deterministic: bool = False,
    broadcast_dims: Sequence[int] = (),
    scale: Scale = "inverted",
    residual: Residual | None = None,
) -> jax.Array:
    """Dropout (Hinton et al. 2012; Srivastava et al. 2014); the backward pass reuses the forward pass's mask.

    With ``m ~ Bernoulli(keep)`` per element (shared along ``broadcast_dims``),
    ``keep = ceil((1 - rate) * 2**23) / 2**23`` (within 2**-23 of ``1 - rate``; ``2**52`` when the rate
    enters as float64, under ``jax_enable_x64``: see :func:`jdrop.keep_mask`)::

        scale="inverted":  train  y = m * x / keep      eval  y = x
        scale="classic":   train  y = m * x             eval  y = keep * x

    Both make the eval output equal the expected train output (exactly, since ``keep`` is the
    realised keep probability). The mask is ``jdrop.keep_mask(key, x.shape, rate)``, which equals
    ``jax.random.bernoulli(key, 1 - rate, ...)``: for the same key, the same mask as
    ``flax.linen.Dropout`` and ``equinox.nn.Dropout``.

    The backward pass is ``dx = dy * m * (1 / keep or 1)``, with the very same mask, read from
    the residual that ``residual`` selects:

    - ``"key"``: nothing per element; the mask is regenerated from the key.
    - ``"bits"``: the mask packed 1 bit per element.
    - ``"mask"``: the bool mask, 1 byte per element (as flax, equinox and haiku keep it).
    - None (default): ``"key"`` for threefry keys (jdrop's fused draw regenerates the mask inside the
      backward pass's multiply), ``"bits"`` for keys whose bits only ``jax.random.bits`` draws (rbg,
      unsafe_rbg, philox, user-defined: redrawing them is a second full RNG call).

    Autodiff: reverse mode (``grad``, ``vjp``, ``jacrev``) and forward mode (``jvp``, ``jacfwd``,
    ``linearize``) and their compositions (``hessian``), all with the forward pass's mask.

    ``rate`` may be a traced scalar (schedules, sweeps): one compilation serves all rates. A
    static rate outside [0, 1] raises ``ValueError``; a traced one outside [0, 1] makes the
    output and gradient NaN rather than silently using another rate. ``rate = 1`` gives zeros
    and zero gradients; ``rate = 0`` returns ``x`` unchanged. No gradient flows to ``rate``.

    Args:
      key: a PRNG key of any implementation: typed (``jax.random.key(seed, impl=...)``, user-defined
        ones too) or raw from ``jax.random.PRNGKey`` under any ``jax_default_prng_impl``. It comes first,
        as in ``jax.random``. May be None when ``deterministic``.
      x: floating array (float16, bfloat16, float32, float64); the output has its dtype.
      rate: drop probability in [0, 1].
      deterministic: evaluation mode (no randomness).
      broadcast_dims: dims along which one mask value is shared (e.g. the time axis).
      scale: ``"inverted"`` or ``"classic"``.
      residual: ``"key"``, ``"bits"``, ``"mask"`` or None (the default for the key's implementation).

    Returns:
      The dropped-out array, same shape and dtype as ``x``.

    Example::

      >>> y = jdrop.dropout(jax.random.key(0), jnp.ones((4, 8)), 0.5)
    """
    call = _prepare(key, x, rate, deterministic, broadcast_dims, scale, residual)
    if call.key_data is None:
        return _apply(call.static, call.threshold, call.valid, None, call.x)
    return (_vjp_train_dropout if in_manual_mesh() else _train_dropout)(*call.train_arguments())
