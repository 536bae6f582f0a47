"""Argument checks of every public function: one function per rule, one wording per rule.

Each check validates and canonicalises a value at trace time (where it is static) and raises a
``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, outside the allowed range) that
names the argument and what is allowed, as ``jax.random`` does. Traced rates cannot be checked at
trace time: :func:`rate_is_valid` and :func:`nan_unless` (the one road to NaN) make an invalid one give
NaN outputs and gradients.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Container, Iterable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jdrop._typing import Scale

__all__ = [
    "RESIDUALS",
    "SCALES",
    "JdropDeprecationWarning",
    "MissingKeyError",
    "StaticRate",
    "canonical_axis",
    "KEY_FIRST",
    "canonical_key",
    "default_key_shape",
    "check_alias",
    "check_callable",
    "check_channel_and_batch_axes",
    "check_choice",
    "check_deterministic",
    "deterministic_or_train",
    "check_float_input",
    "check_keywords",
    "check_index_offset",
    "check_nonnegative",
    "check_rank_at_least",
    "check_rate",
    "check_residual",
    "check_scale",
    "check_single_key",
    "check_exact_draw",
    "int_at_least",
    "keep_probability",
    "nan_unless",
    "nan_unless_valid",
    "poison_invalid",
    "positive_int",
    "nonnegative_is_valid",
    "rate_is_valid",
    "require_key",
    "static_bool",
    "warn_deprecated",
]

SCALES = ("inverted", "classic")
"""Dropout's two scalings: ``"inverted"`` (1/keep in training) and ``"classic"`` (keep at evaluation)."""
RESIDUALS = ("key", "bits", "mask")
"""The residual policies of :func:`jdrop.dropout`: what its backward pass reads the mask from."""


class JdropDeprecationWarning(DeprecationWarning):
    """A spelling jdrop still accepts but will remove (``train=``, the first ``DropoutResidual`` fields).

    Its own class, so that a test suite or a notebook can turn jdrop's deprecations into errors without
    touching other libraries': ``warnings.filterwarnings("error", category=JdropDeprecationWarning)``, or in
    pytest's configuration ``"error::jdrop._validation.JdropDeprecationWarning"``.
    """


def warn_deprecated(message: str, *, stacklevel: int) -> None:
    """Warns ``message`` as a :class:`JdropDeprecationWarning`, attributed ``stacklevel`` frames up (the caller)."""
    warnings.warn(message, JdropDeprecationWarning, stacklevel=stacklevel + 1)


class MissingKeyError(ValueError, RuntimeError):
    """A training pass without a PRNG key: a ``ValueError`` (jdrop's rule for a missing argument).

    Also a ``RuntimeError``, what ``equinox.nn.Dropout`` raises for a missing key, so code written
    for equinox's modules catches the equinox adapter's error unchanged.
    """


def _is_tracer(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


class StaticRate(float):
    """A static real scalar given as an array or numpy scalar: a Python float that remembers its ``dtype``.

    ``jax.random.bernoulli(key, 1 - rate)`` draws uniforms in the dtype of ``1 - rate``: JAX's default float
    for a Python number (float64 under ``jax_enable_x64``), the array's own dtype otherwise, so
    :func:`keep_probability` needs it; everything else sees a float.
    """

    dtype: np.dtype

    def __new__(cls, value: Any, dtype: Any) -> StaticRate:
        rate = super().__new__(cls, float(value))
        rate.dtype = np.dtype(dtype)
        return rate


def _real_scalar(value: Any, *, name: str, expected: str) -> float | jax.Array:
    """``value`` as a Python float (static) or a float32 scalar array (traced); ``TypeError`` otherwise."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"`{name}` must be {expected}, got {type(value).__name__} {value!r}.")
    if isinstance(value, numbers.Real):
        return StaticRate(value, value.dtype) if hasattr(value, "dtype") else float(value)
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        dtype = np.dtype(value.dtype) if not jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key) else None
        real = dtype is not None and dtype != np.bool_
        if not (real and (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer))):
            raise TypeError(f"`{name}` must be a real scalar, got an array of dtype {value.dtype}.")
        if tuple(value.shape) != ():
            raise ValueError(f"`{name}` must be a scalar, got shape {tuple(value.shape)}.")
        if _is_tracer(value):  # float64 stays float64 (under jax_enable_x64), as jax.random sees it
            return jnp.asarray(value, jnp.float64 if dtype == np.float64 else jnp.float32)
        return StaticRate(value, dtype)
    raise TypeError(f"`{name}` must be {expected}, got {type(value).__name__} {value!r}.")


def check_rate(rate: Any, *, name: str = "rate", upper: float = 1.0) -> float | jax.Array:
    """Returns ``rate`` as a Python float when static (checked), or a float32 scalar array.

    Static values (Python numbers, numpy scalars, concrete arrays) are checked here, at trace
    time: NaN, inf, or a value outside ``[0, upper]`` raise ``ValueError`` naming ``name``.
    Traced values cannot be checked at trace time; :func:`rate_is_valid` turns an invalid traced
    value into NaN outputs instead of a silently different rate.

    Raises:
      TypeError: if ``rate`` is not a real number or a real scalar array.
      ValueError: if a static ``rate`` is NaN, infinite or outside ``[0, upper]``.
    """
    value = _real_scalar(rate, name=name, expected=f"a real number in [0, {upper:g}]")
    if isinstance(value, float) and not (0.0 <= value <= upper):  # also rejects NaN
        raise ValueError(f"`{name}` must be in [0, {upper:g}], got {value!r}.")
    return value


def check_nonnegative(value: Any, *, name: str, positive: bool = False) -> float | jax.Array:
    """``value`` as a Python float when static (finite and >= 0, or > 0 if ``positive``), else a float32 scalar.

    For scales and coefficients (a noise's standard deviation, a temperature, a loss weight); a
    traced value is checked by :func:`nonnegative_is_valid` instead (NaN outputs when invalid).

    Raises:
      TypeError: if ``value`` is not a real number or a real scalar array.
      ValueError: if a static ``value`` is NaN, infinite, negative (or 0 when ``positive``).
    """
    bound = "> 0" if positive else ">= 0"
    checked = _real_scalar(value, name=name, expected=f"a finite real number {bound}")
    if isinstance(checked, float) and not (math.isfinite(checked) and (checked > 0 if positive else checked >= 0)):
        raise ValueError(f"`{name}` must be finite and {bound}, got {checked!r}.")
    return checked


def nonnegative_is_valid(value: float | jax.Array) -> jax.Array | bool:
    """True for a static value (already checked); for a traced one, a traced ``value >= 0 and finite``."""
    if isinstance(value, float):
        return True
    return (value >= 0.0) & jnp.isfinite(value)


def rate_is_valid(rate: float | jax.Array, *, upper: float = 1.0, closed: bool = True) -> jax.Array | bool:
    """True for a static rate (already checked); for a traced one, a traced ``0 <= rate <= upper``.

    ``closed=False`` excludes ``upper`` itself (``0 <= rate < upper``).
    """
    if isinstance(rate, float):
        return True
    return (rate >= 0.0) & ((rate <= upper) if closed else (rate < upper))


def nan_unless(valid: jax.Array | bool, dtype: Any) -> jax.Array:
    """1 where ``valid``, NaN otherwise, in ``dtype``: the one road from an invalid traced argument to NaN.

    Every op multiplies by it once, its scale factor (the core, attention, DropConnect's moments:
    through :func:`jdrop._dropout.keep_and_factor`) or its output (the variants whose output has no
    keep factor: :func:`poison_invalid`). So a traced rate (or scale) outside its range makes every
    output element and every gradient NaN, in training and evaluation alike, never a silently
    different rate.
    """
    return jnp.where(valid, 1.0, jnp.nan).astype(dtype)


def nan_unless_valid(rate: float | jax.Array, dtype: Any) -> jax.Array:
    """:func:`nan_unless` of a rate's validity: 1 for a valid rate, NaN for a traced one outside [0, 1]."""
    return nan_unless(rate_is_valid(rate), dtype)


def poison_invalid(x: jax.Array, valid: jax.Array | bool) -> jax.Array:
    """``x`` when ``valid`` (``x`` itself when statically valid), else NaN: ``x * nan_unless(valid)``.

    Computed in at least float32 and returned in ``x``'s dtype, as the core computes; its gradient
    is ``dy * nan_unless(valid)``, NaN too when invalid.
    """
    if valid is True:
        return x
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    return (x.astype(dtype) * nan_unless(valid, dtype)).astype(x.dtype)


def keep_probability(rate: Any) -> jax.Array:
    """``1 - rate`` as a float scalar after checking ``rate`` (see :func:`check_rate`), as bernoulli sees it.

    The dtype is the one ``jax.random.bernoulli(key, 1 - rate)`` draws its uniforms in, so that the keep
    test is its test: a static rate (a Python number, as flax and equinox pass it) is subtracted in
    float64 and rounded once to JAX's default float: float32, or float64 under ``jax_enable_x64`` (then
    the uniforms have 52 bits, drawn from 64-bit words); a static array or numpy scalar by its dtype (float64
    only under x64, float32 otherwise: :class:`StaticRate`). A traced rate keeps its dtype (float32, or
    float64 under x64; other dtypes become float32) and is clipped into [0, 1] for the threshold only
    (callers that scale also poison the output with NaN when it was out of range).
    """
    rate = check_rate(rate)
    if isinstance(rate, float):
        wide = np.float64 if getattr(rate, "dtype", np.float64) == np.float64 else np.float32
        return jnp.asarray(np.asarray(1.0 - rate, jax.dtypes.canonicalize_dtype(wide)))
    return jnp.clip(1.0 - jax.lax.stop_gradient(rate), 0.0, 1.0)


def check_float_input(x: Any, *, name: str = "x") -> jax.Array:
    """Returns ``x`` as a floating array, or raises ``TypeError`` naming ``name``.

    Integer, bool and complex arrays are rejected: dropout's scaling has no exact meaning for them. A PRNG key
    (typed, or shaped like a raw key) is named as such: every random op of jdrop takes the key first.
    """
    if not (isinstance(x, (jax.Array, np.ndarray, np.generic)) or _is_tracer(x)) and not (
        hasattr(x, "__jax_array__")
    ):
        raise TypeError(
            f"`{name}` must be a floating-point array (float16, bfloat16, float32 or float64), "
            f"got {type(x).__name__}. Wrap Python data with jnp.asarray(..., jnp.float32)."
        )
    if _is_typed_key(x):
        raise TypeError(f"`{name}` must be a floating-point array, got a PRNG key ({x.dtype}): {KEY_FIRST}.")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        hint = f" If it is a raw key from jax.random.PRNGKey, {KEY_FIRST}." if _is_raw_key(x) else ""
        raise TypeError(
            f"`{name}` must be a floating-point array (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}. Cast it first, e.g. x.astype(jnp.float32).{hint}"
        )
    return x


def check_keywords(given: Iterable[str], known: Container[str], *, where: str) -> None:
    """``TypeError``, in Python's words, for a name in ``given`` (a ``**kwargs`` dict) that is not in ``known``."""
    for name in given:
        if name not in known:
            raise TypeError(f"{where}() got an unexpected keyword argument {name!r}")


def check_choice(value: Any, choices: tuple[str, ...], *, name: str) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` naming ``name`` and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return value


def check_scale(scale: Any) -> Scale:
    """``scale`` if it is ``"inverted"`` or ``"classic"``, else ``ValueError``."""
    return cast(Scale, check_choice(scale, SCALES, name="scale"))


def check_residual(residual: Any) -> str | None:
    """``residual`` if it is ``"key"``, ``"bits"``, ``"mask"`` or None (the default per key), else ``ValueError``."""
    return None if residual is None else check_choice(residual, RESIDUALS, name="residual")


def check_alias(name: str, value: Any, default: Any, *, alias: str, alias_value: Any) -> None:
    """``ValueError`` if ``name`` (away from its ``default``) and its ``alias`` (a peer's spelling) are both set."""
    if alias_value is not None and value != default:
        raise ValueError(
            f"pass `{name}` or its alias `{alias}`, not both: got {name}={value!r} and {alias}={alias_value!r}."
        )


def check_callable(value: Any, *, name: str, usage: str = "") -> Any:
    """``value`` if it is callable, else ``TypeError`` naming ``name`` (and how it is called, ``usage``)."""
    if not callable(value):
        how = f" as {usage}" if usage else ""
        raise TypeError(f"`{name}` must be callable{how}, got {_describe(value)}.")
    return value


def static_bool(value: Any, *, name: str, hint: str = "") -> bool:
    """``value`` as a Python bool, or ``TypeError`` naming ``name`` (a flag that selects a code path is static)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a Python bool (static), got {type(value).__name__}.{hint}")
    return bool(value)


def check_deterministic(deterministic: Any) -> bool:
    """``deterministic`` as a Python bool, or ``TypeError`` (see :func:`static_bool`)."""
    return static_bool(
        deterministic, name="deterministic", hint=" Choose train or eval outside jit, or mark it static."
    )


def deterministic_or_train(deterministic: Any, train: Any, *, default: bool, where: str) -> bool:
    """The evaluation flag of a function that takes ``deterministic`` and the older ``train`` (deprecated).

    ``train=t`` means ``deterministic=not t`` and warns (``DeprecationWarning``); neither gives ``default``.

    Raises:
      TypeError: if both are given, or either is not a Python bool (see :func:`static_bool`).
    """
    if train is None:
        return default if deterministic is None else check_deterministic(deterministic)
    if deterministic is not None:
        raise TypeError(f"{where} got both `deterministic` and the deprecated `train`: pass only `deterministic`.")
    train = static_bool(train, name="train", hint=" Choose train or eval outside jit, or mark it static.")
    warn_deprecated(
        f"{where}(train=...) is deprecated: use deterministic={not train} (flax's name, used across jdrop).",
        stacklevel=3,
    )
    return not train


def canonical_axis(axis: Any, ndim: int, *, name: str) -> int:
    """``axis`` in ``0..ndim-1`` (negative counts from the end), or ``TypeError``/``ValueError`` naming it."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {type(axis).__name__} {axis!r}.")
    if not -ndim <= axis < ndim:
        allowed = f"allowed are {-ndim}..{ndim - 1}" if ndim else "a 0-d input has no axes"
        raise ValueError(f"`{name}` = {axis} is out of range for an input of rank {ndim}: {allowed}.")
    return int(axis) % ndim


def check_channel_and_batch_axes(ndim: int, *, channel_axis: Any, batch_axis: Any) -> tuple[int, int | None]:
    """``(channel, batch)`` axes of a rank-``ndim`` input, canonical and distinct (``batch`` None: one example)."""
    channel = canonical_axis(channel_axis, ndim, name="channel_axis")
    if batch_axis is None:
        return channel, None
    batch = canonical_axis(batch_axis, ndim, name="batch_axis")
    if batch == channel:
        raise ValueError(f"`batch_axis` and `channel_axis` must differ, both are dim {batch} of a rank-{ndim} input.")
    return channel, batch


def check_rank_at_least(x: jax.Array, minimum: int, *, name: str, why: str) -> jax.Array:
    """``x`` if its rank is at least ``minimum``, else ``ValueError`` naming ``name`` and ``why`` it needs the axes."""
    if x.ndim < minimum:
        raise ValueError(f"`{name}` must have rank >= {minimum} ({why}), got rank {x.ndim}.")
    return x


def int_at_least(value: Any, minimum: int, *, name: str) -> int:
    """``value`` as a Python int >= ``minimum``: ``TypeError`` if it is not an int, ``ValueError`` if smaller."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}.")
    return int(value)


def check_index_offset(offset: Any, *, name: str = "offset") -> Any:
    """``offset`` if it is an integer index (a Python int >= 0 or an integer array, maybe traced).

    Raises:
      TypeError: for a float, complex or bool, or an array of another dtype.
      ValueError: for a static negative int.
    """
    if isinstance(offset, (float, complex, bool, np.bool_)) or (
        hasattr(offset, "dtype") and not jnp.issubdtype(offset.dtype, jnp.integer)
    ):
        raise TypeError(f"`{name}` must be an integer, got {_describe(offset)}.")
    if isinstance(offset, (int, np.integer)) and offset < 0:
        raise ValueError(f"`{name}` must be >= 0, got {offset}.")
    return offset


def positive_int(value: Any, *, name: str) -> int:
    """``value`` as a Python int >= 1 (see :func:`int_at_least`)."""
    return int_at_least(value, 1, name=name)


# ------------------------------------------------------------------------------------------------ keys


def _describe(value: Any) -> str:
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"an array of dtype {value.dtype} and shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:120]


def default_key_shape() -> tuple[int, ...]:
    """The data shape of one key of the default PRNG implementation (``jax_default_prng_impl``), read now.

    ``(2,)`` for threefry2x32 (and philox4x32), ``(4,)`` for rbg, unsafe_rbg and threefry4x32, ``(1,)``
    for philox2x32: the trailing shape of a raw ``uint32`` key from ``jax.random.PRNGKey(seed)``.
    """
    return _key_shape_of(str(jax.config.jax_default_prng_impl))  # type: ignore[attr-defined]


@functools.cache
def _key_shape_of(impl: str) -> tuple[int, ...]:
    del impl  # the cache key: the shape is read under the current default
    return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


def _is_raw_key(value: Any) -> bool:
    """A ``uint32`` array whose trailing dims are the default implementation's key shape."""
    shape = default_key_shape()
    dtype = getattr(value, "dtype", None)
    return (dtype == np.uint32 and len(value.shape) >= len(shape)
            and tuple(value.shape[len(value.shape) - len(shape):]) == shape)


def _is_typed_key(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


KEY_FIRST = ("the key comes first: jdrop's random functions take (key, x, ...) in that order, as jax.random "
             "does, e.g. jdrop.dropout(key, x, rate); check the order of the arguments")
"""The one wording of the swapped-arguments error (a key passed as the data, or data as the key)."""


def canonical_key(key: Any, *, name: str = "key") -> jax.Array:
    """Returns ``key`` as a typed PRNG key array, accepting raw ``uint32`` keys of the default implementation.

    Accepted: a typed key of any implementation (``jax.random.key(seed, impl=...)``, one from
    ``jax.extend.random.define_prng_impl``), or a raw ``uint32`` key from ``jax.random.PRNGKey(seed)``:
    an array whose trailing dims are the key shape of the default implementation (``jax_default_prng_impl``:
    ``(2,)`` for threefry2x32, ``(4,)`` for rbg and unsafe_rbg; see :func:`default_key_shape`), wrapped
    with that implementation, as ``jax.random`` does.

    Raises:
      TypeError: for anything else (an int seed, a float array, a string, a raw key of another shape),
        naming ``name``; a floating array (data where the key goes) also says that the key comes first.
    """
    if _is_typed_key(key):
        return key  # type: ignore[no-any-return]
    if isinstance(key, (jax.Array, np.ndarray)) or hasattr(key, "dtype"):
        if _is_raw_key(key):
            return jax.random.wrap_key_data(key)
        if jnp.issubdtype(key.dtype, jnp.floating):
            raise TypeError(f"`{name}` must be a PRNG key, got {_describe(key)}: {KEY_FIRST}.")
    impl = jax.config.jax_default_prng_impl  # type: ignore[attr-defined]
    raise TypeError(
        f"`{name}` must be a PRNG key: jax.random.key(seed) (or a raw uint32 key from jax.random.PRNGKey(seed), "
        f"whose trailing shape is {default_key_shape()} under jax_default_prng_impl={impl!r}); got "
        f"{_describe(key)}. To make one from an int seed, call jax.random.key(seed)."
    )


def check_single_key(key: Any, *, name: str = "key") -> jax.Array:
    """``key`` as one typed key (shape ``()``), or ``ValueError`` for a key array (``TypeError`` for a non-key)."""
    key = canonical_key(key, name=name)
    if key.shape != ():
        raise ValueError(
            f"`{name}` must be a single key (shape ()), got a key array of shape {key.shape}; "
            "use jax.vmap to give each example its own key."
        )
    return key


def require_key(key: Any, *, what: str, name: str = "key", eval_hint: str = "deterministic=True") -> jax.Array:
    """A single typed key for a training pass of ``what``, or an error that says what to do.

    Raises:
      MissingKeyError: (a ``ValueError``) if ``key`` is None: pass a key, or ``eval_hint`` for evaluation.
      ValueError: if ``key`` holds several keys.
      TypeError: if ``key`` is not a PRNG key (see :func:`canonical_key`).
    """
    if key is None:
        raise MissingKeyError(
            f"{what} needs a PRNG `{name}` in training mode: pass {name}=jax.random.key(seed) (one per step, "
            f"e.g. from jdrop.example_keys), or {eval_hint} for evaluation."
        )
    return check_single_key(key, name=name)


def check_exact_draw(draw: str, mask_shape: tuple[int, ...], *, implementation: str, impl: str) -> None:
    """How attention draws flax's mask (``draw``, see ``jdrop.attention._dropout_mask``), checked for its costs.

    A ``"drawn"`` mask (a key whose bits only ``jax.random`` draws: rbg, unsafe_rbg, philox, a user's
    implementation, or threefry past the fused layouts) is flax's mask drawn whole, 1 byte per attention
    weight: it warns (``UserWarning``) that memory is then O(T^2), as flax's is, and says how to get O(T).

    Raises:
      ValueError: for ``implementation="pallas"`` with any draw but the default ``"exact"`` (the kernels draw
        partitionable threefry with 32-bit words only), or a drawn mask of ``2**32`` elements or more.
    """
    if implementation == "pallas" and draw != "exact":
        raise ValueError(
            f"implementation='pallas' draws flax's dropout mask for threefry keys with jax_threefry_partitionable="
            f"True and jax_enable_x64=False only; this call needs the {draw!r} draw (a {impl} key under the current "
            "configs): use implementation='xla', which draws it exactly."
        )
    if draw != "drawn":
        return
    size = math.prod(mask_shape)
    if size >= 2**32:
        raise ValueError(
            f"the dropout mask of a {impl} key is drawn whole, and {mask_shape} has 2**32 elements or more; use a "
            "threefry key (jax.random.key(seed, impl='threefry2x32')), drawn tile by tile in O(T) memory."
        )
    warnings.warn(
        f"jdrop.dot_product_attention: a {impl} key's dropout mask cannot be drawn tile by tile (its bits come "
        f"from jax.random for the whole array at once), so flax's mask {mask_shape} is drawn whole ({size} bytes, "
        "O(T^2) memory, as flax's own). For O(T) memory pass a threefry key as dropout_rng "
        "(jax.random.key(seed, impl='threefry2x32'), or fold your key into one).",
        UserWarning,
        stacklevel=4,
    )

