"""Keys to masks: the one mask primitive of jdrop.

Every dropout in jdrop draws its randomness through :func:`random_bits` and turns it into a keep
decision through :func:`keep_threshold` / :func:`keep_from_bits`. Nothing else draws random bits.

How the bits are drawn
----------------------
For the default threefry key (``jax.random.key`` or the legacy ``jax.random.PRNGKey``),
:func:`random_bits` returns exactly ``jax.random.bits(key, shape, jnp.uint32)`` as JAX computes it
with its (default) partitionable threefry: element ``i`` (row-major) gets
``t0 ^ t1`` where ``(t0, t1) = threefry2x32(key, (i_hi, i_lo))``. The difference is the lowering:
JAX's XLA:CPU lowering of threefry is a rolled loop that XLA cannot fuse with its consumers, so the
bits are materialised (4 bytes per element written and read again) and the loop runs slowly.
Here the 20 rounds are written out in ``jnp`` integer ops, so XLA fuses them into the consumer
(the dropout multiply, or the backward pass's multiply), on every backend, and nothing per element
is ever stored. Other key implementations (``rbg``, ``unsafe_rbg``, custom ones) use
``jax.random.bits`` directly: they are already fast where they are meant to run.

How bits become a keep decision
-------------------------------
The keep test is ``(bits >> 9) < ceil(keep * 2**23)``, which is exactly
``jax.random.bernoulli(key, keep, shape)`` (``uniform`` takes the top 23 bits of the same word). So
the mask of ``jdrop.dropout`` is the mask of ``flax.linen.Dropout`` and ``equinox.nn.Dropout`` for
the same key, and the realised keep probability ``ceil(keep * 2**23) / 2**23`` differs from
``1 - rate`` by less than ``2**-23`` (the contract allows ``2**-16``). Inverted scaling divides by
that realised probability, so ``E[dropout(x)] = x`` holds exactly, not just up to quantisation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jdrop._typing import KeyLike
from jdrop._validation import canonical_axis, canonical_key, check_single_key, keep_probability, require_key

__all__ = [
    "THRESHOLD_BITS",
    "bits_at",
    "bits_lowering",
    "broadcast_shape",
    "canonical_key",
    "example_keys",
    "fold_in",
    "index_words",
    "keep_from_bits",
    "keep_mask",
    "keep_threshold",
    "normal_from_bits",
    "pack_bits",
    "random_bits",
    "realised_keep",
    "require_key",
    "set_bits_lowering",
    "threefry2x32",
    "uniform_from_bits",
    "unpack_bits",
]

THRESHOLD_BITS = 23
"""Resolution of the keep test: keep iff ``(bits >> 9) < ceil(keep * 2**23)`` (bernoulli's rule)."""

_THRESHOLD_ONE = float(2**THRESHOLD_BITS)
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


# --------------------------------------------------------------------------------------- keys


def example_keys(key: KeyLike, n: int, *, offset: Any = 0) -> jax.Array:
    """Keys for the examples with global indices ``offset, ..., offset + n - 1``.

    ``keys[j] = jax.random.fold_in(key, offset + j)``: example ``i``'s key depends only on the
    step key and ``i``, so a batch split into microbatches (each with its own ``offset``) or
    sharded over devices gets the very same keys, hence the same masks, as the whole batch.

    Args:
      key: the step's PRNG key (typed or legacy raw).
      n: number of examples (static, non-negative).
      offset: global index of the first example; an int or a traced integer scalar.

    Returns:
      A typed key array of shape ``(n,)``.
    """
    key = check_single_key(key)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"`n` must be a non-negative int, got {n!r}.")
    if isinstance(offset, (float, complex, bool)) or (
        hasattr(offset, "dtype") and not jnp.issubdtype(offset.dtype, jnp.integer)
    ):
        raise TypeError(f"`offset` must be an integer, got {type(offset).__name__} {offset!r}.")
    if isinstance(offset, (int, np.integer)) and offset < 0:
        raise ValueError(f"`offset` must be >= 0, got {offset}.")
    index = jnp.asarray(offset, jnp.uint32) + jnp.arange(n, dtype=jnp.uint32)
    return fold_in(key, index)


def fold_in(key: KeyLike, data: Any) -> jax.Array:
    """``jax.random.fold_in`` of a key array and ``uint32`` data, broadcast against each other.

    ``out[i] = jax.random.fold_in(key[i], data[i])`` over the broadcast shape of ``key`` and
    ``data``, bit for bit: it is ``jax.random.fold_in`` itself, vmapped, in a nested ``jit`` so that
    it is traced and lowered once per shape (JAX lowers its own ``fold_in`` again at every call).

    Args:
      key: a PRNG key array (typed or legacy raw).
      data: integer data, e.g. an example or layer index (taken modulo 2**32, as JAX does).

    Returns:
      A typed key array of the broadcast shape.
    """
    key = canonical_key(key)
    data = jnp.asarray(data).astype(jnp.uint32)
    shape = jnp.broadcast_shapes(key.shape, data.shape)
    return _fold_in(jnp.broadcast_to(key, shape), jnp.broadcast_to(data, shape))


@jax.jit
def _fold_in(key: jax.Array, data: jax.Array) -> jax.Array:
    # Compile hazard: never derive keys with the unrolled threefry of random_bits. A key shared by a
    # batch makes that 20-round chain loop-invariant, and LLVM's vectorizer then runs for hours when it
    # interleaves (AVX-512's choice). JAX's own lowering is a rolled loop on CPU: tiny data, no chain.
    fold = jax.random.fold_in
    for _ in range(key.ndim):
        fold = jax.vmap(fold)
    return fold(key, data)


# --------------------------------------------------------------------------------------- bits


def _rotate_left(v: jax.Array, distance: int) -> jax.Array:
    return (v << np.uint32(distance)) | (v >> np.uint32(32 - distance))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), unrolled in ``jnp`` uint32 ops.

    Bit-identical to ``jax.random``'s threefry primitive; written out so that XLA can fuse it
    into the consumers of the bits on every backend.
    """
    k2 = k0 ^ k1 ^ np.uint32(0x1BD11BDA)
    schedule = (k0, k1, k2)
    x0 = x0 + k0
    x1 = x1 + k1
    for block in range(5):
        for rotation in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, rotation)
            x1 = x1 ^ x0
        x0 = x0 + schedule[(block + 1) % 3]
        x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major element index as uint32, built from broadcasted iotas (partitionable)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        if shape[axis] > 1:
            index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    return index


BitsLowering = Literal["fused", "jax"]
_LOWERINGS = ("fused", "jax")
_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _lowering_from_environment() -> dict[str, str]:
    value = os.environ.get("JDROP_BITS_LOWERING", "fused").strip().lower()
    if value not in _LOWERINGS:
        raise ValueError(f"JDROP_BITS_LOWERING must be one of {_LOWERINGS}, got {value!r}.")
    return dict.fromkeys(_PLATFORMS, value)


_bits_lowering: dict[str, str] = _lowering_from_environment()


def set_bits_lowering(lowering: BitsLowering, *, platforms: Sequence[str] | None = None) -> None:
    """Chooses how :func:`random_bits` computes threefry bits: ``"fused"`` (default) or ``"jax"``.

    Both give the same bits, ``jax.random.bits(key, shape, jnp.uint32)``; only the program differs:

    - ``"fused"``: the 20 threefry rounds written out in ``jnp`` ops, which XLA fuses into the
      consumer of the bits (nothing per element is stored; fastest on CPU and GPU).
    - ``"jax"``: ``jax.random.bits`` itself, JAX's own lowering (a rolled loop on CPU, a kernel or
      unrolled code on GPU), whose bits are materialised. An escape hatch for any backend or
      compiler version where the fused program misbehaves (compile time, speed).

    ``platforms`` restricts the choice to some backends (``"cpu"``, ``"cuda"``, ``"rocm"``,
    ``"tpu"``); the choice per backend is made when a program is lowered for it. The setting is
    read when a function is traced: set it at start-up (or call ``jax.clear_caches()`` after
    changing it), or set the environment variable ``JDROP_BITS_LOWERING=jax`` before importing
    jdrop.

    Raises:
      ValueError: for an unknown lowering or platform.
    """
    if lowering not in _LOWERINGS:
        raise ValueError(f"`lowering` must be one of {_LOWERINGS}, got {lowering!r}.")
    chosen = _PLATFORMS if platforms is None else tuple(platforms)
    for platform in chosen:
        if platform not in _PLATFORMS:
            raise ValueError(f"`platforms` entries must be among {_PLATFORMS}, got {platform!r}.")
    _bits_lowering.update(dict.fromkeys(chosen, lowering))


def bits_lowering() -> dict[str, str]:
    """The lowering :func:`random_bits` uses per platform (see :func:`set_bits_lowering`)."""
    return dict(_bits_lowering)


def random_bits(key: KeyLike, shape: Sequence[int], *, broadcast_to: Sequence[int] | None = None) -> jax.Array:
    """Uniform ``uint32`` bits, equal to ``jax.random.bits(key, shape, jnp.uint32)``.

    For threefry keys the bits are computed by a fusible unrolled threefry (see the module
    docstring); XLA then computes them inside whatever consumes them, so they are never stored.
    When the caller broadcasts the bits to a larger shape (``broadcast_to``), they are drawn with
    JAX's own lowering instead and materialised at ``shape`` (see the comment in the code).
    :func:`set_bits_lowering` chooses JAX's lowering everywhere or on some backends.

    Args:
      key: a single PRNG key (typed or legacy raw).
      shape: the shape of the bits.
      broadcast_to: the shape of the consumer the bits are broadcast into, if any.

    Returns:
      ``uint32`` array of ``shape``.
    """
    key = canonical_key(key)
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    # Compile hazard: fused into a consumer that broadcasts them, the 20 unrolled rounds can be
    # invariant in the consumer's inner loop, where LLVM's vectorizer may run for hours (AVX-512).
    broadcast = broadcast_to is not None and tuple(int(d) for d in broadcast_to) != shape
    if str(jax.random.key_impl(key)) != "threefry2x32" or size >= 2**32 or broadcast:
        # Other generators are already fused or fast on their backend; >= 2**32 elements need
        # JAX's two-word counter, whose bits we then take as they are.
        return jax.random.bits(key, shape, jnp.uint32)
    data = jax.random.key_data(key)
    lowerings = set(_bits_lowering.values())
    if lowerings == {"fused"}:
        return _threefry_bits(data, shape)
    if lowerings == {"jax"}:
        return jax.random.bits(key, shape, jnp.uint32)
    branches = {
        platform: (partial(_threefry_bits, shape=shape) if lowering == "fused" else partial(_jax_bits, shape=shape))
        for platform, lowering in _bits_lowering.items()
    }
    return lax.platform_dependent(data, **branches)


def _jax_bits(data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.bits(jax.random.wrap_key_data(data), shape, jnp.uint32)


@partial(jax.jit, static_argnums=(1,))
def _threefry_bits(data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The bits of :func:`random_bits` for threefry key data ``data`` (``uint32[2]``).

    A nested ``jit``: it is traced once per shape and lowered once per program, however many
    layers (forward and backward) draw bits of that shape, which keeps tracing and lowering
    time flat in depth. XLA inlines the call before fusion, so the bits still fuse into their
    consumers.
    """
    t0, t1 = threefry2x32(data[0], data[1], jnp.zeros(shape, jnp.uint32), _flat_index(shape))
    return t0 ^ t1


def bits_at(key_data: jax.Array, index_hi: jax.Array, index_lo: jax.Array) -> jax.Array:
    """The bits of ``jax.random.bits(key, shape, jnp.uint32)`` at flat indices ``index_hi * 2**32 + index_lo``.

    JAX's partitionable threefry gives element ``i`` (row-major) of any shape the word
    ``t0 ^ t1`` of ``threefry2x32(key, (i >> 32, i & 0xffffffff))``: it depends on the key and
    ``i`` only, not on the shape. So a tiled computation can draw each tile's bits by global index
    and together the tiles hold exactly the bits of the whole array (this is how
    :func:`jdrop.dot_product_attention` draws flax's ``(B, H, Tq, Tk)`` dropout mask block by block).

    Args:
      key_data: a threefry key's data, ``uint32[2]`` (``jax.random.key_data(key)``).
      index_hi: ``uint32`` high words of the indices (zero below ``2**32`` elements).
      index_lo: ``uint32`` low words, broadcastable against ``index_hi``.

    Returns:
      ``uint32`` bits of the broadcast shape of the indices.
    """
    t0, t1 = threefry2x32(key_data[0], key_data[1], index_hi, index_lo)
    return t0 ^ t1


def index_words(
    row: jax.Array, col: jax.Array, n_cols: int, *, n_rows: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """The ``(high, low)`` ``uint32`` words of the row-major flat index ``row * n_cols + col``, in 64 bits.

    With :func:`bits_at` this draws the bits of element ``(row, col)`` of a ``(n_rows, n_cols)`` array
    (any array, flattened to two dims: ``row`` may itself combine leading indices) by its global
    index, so a tile anywhere in the array gets exactly that array's bits: ``bits_at(key_data,
    *index_words(row, col, n_cols))`` equals ``jax.random.bits(key, (n_rows, n_cols))[row, col]``. The
    product is computed exactly in 64 bits from 16-bit halves (uint32 arithmetic only, so it runs on
    every backend without x64); when the static ``n_rows`` shows every index below ``2**32``, the high
    word is a constant 0 and the low word one multiply-add.

    Args:
      row: ``uint32`` row indices, ``< 2**32``.
      col: ``uint32`` column indices, ``< n_cols``, broadcastable against ``row``.
      n_cols: the array's number of columns (static, ``1 <= n_cols < 2**32``).
      n_rows: the array's number of rows, if known statically (enables the one-word form).

    Returns:
      ``(high, low)``: ``uint32`` words of the broadcast shape (``high`` a 0-d zero in the one-word form).
    """
    if n_rows is not None and n_rows * n_cols < 2**32:
        return jnp.zeros((), jnp.uint32), row * np.uint32(n_cols) + col
    high, low = _wide_product(row, n_cols)
    low = low + col
    return high + (low < col).astype(jnp.uint32), low  # the carry of the low word


def _wide_product(a: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
    """``a * c`` as (high, low) ``uint32`` words, for ``uint32`` ``a`` and a static ``c < 2**32``."""
    a0, a1 = a & np.uint32(0xFFFF), a >> np.uint32(16)
    c0, c1 = np.uint32(c & 0xFFFF), np.uint32(c >> 16)
    p00, p01, p10, p11 = a0 * c0, a0 * c1, a1 * c0, a1 * c1
    middle = (p00 >> np.uint32(16)) + (p01 & np.uint32(0xFFFF)) + (p10 & np.uint32(0xFFFF))
    low = (p00 & np.uint32(0xFFFF)) | (middle << np.uint32(16))
    high = p11 + (p01 >> np.uint32(16)) + (p10 >> np.uint32(16)) + (middle >> np.uint32(16))
    return high, low


# --------------------------------------------------------------------------------------- rates


def keep_threshold(keep: jax.Array) -> jax.Array:
    """``ceil(keep * 2**23)`` as ``uint32``: the integer threshold of the keep test.

    ``keep`` must already be a float32 array in [0, 1] (the public functions check it).
    """
    return jnp.ceil(jnp.asarray(keep, jnp.float32) * _THRESHOLD_ONE).astype(jnp.uint32)


def realised_keep(threshold: jax.Array) -> jax.Array:
    """The exact keep probability of the test with this threshold: ``threshold / 2**23``."""
    return threshold.astype(jnp.float32) / _THRESHOLD_ONE


def keep_from_bits(bits: jax.Array, threshold: jax.Array) -> jax.Array:
    """Bool keep decision: ``(bits >> 9) < threshold`` (the rule of ``jax.random.bernoulli``)."""
    return (bits >> np.uint32(32 - THRESHOLD_BITS)) < threshold


def broadcast_shape(shape: Sequence[int], broadcast_dims: Sequence[int] = ()) -> tuple[int, ...]:
    """Shape of the drawn mask: ``shape`` with every dim in ``broadcast_dims`` set to 1.

    A mask shared along those dims (as in flax's ``broadcast_dims``) is drawn once at this shape
    and broadcast. Negative dims count from the end.

    Raises:
      ValueError: if a dim is out of range for ``len(shape)`` or repeated.
      TypeError: if a dim is not an int.
    """
    shape = tuple(shape)
    ndim = len(shape)
    if isinstance(broadcast_dims, (int, np.integer)):
        broadcast_dims = (int(broadcast_dims),)
    seen = set()
    for dim in broadcast_dims:
        canonical = canonical_axis(dim, ndim, name="broadcast_dims")
        if canonical in seen:
            raise ValueError(f"`broadcast_dims` names dim {canonical} twice: {tuple(broadcast_dims)}.")
        seen.add(canonical)
    return tuple(1 if axis in seen else size for axis, size in enumerate(shape))


def keep_mask(key: KeyLike, shape: Sequence[int], rate: ArrayLike, *, broadcast_dims: Sequence[int] = ()) -> jax.Array:
    """The exact bool keep mask that :func:`jdrop.dropout` uses for this key, shape and rate.

    ``m_i = [u_i < 1 - rate]`` with ``u`` uniform on the 2**-23 grid drawn from ``key``; equal to
    ``jax.random.bernoulli(key, 1 - rate, mask_shape)`` broadcast to ``shape``, where
    ``mask_shape`` has size 1 along ``broadcast_dims`` (the mask is shared along those dims).
    ``P(m_i = 1) = ceil((1 - rate) * 2**23) / 2**23``.

    Args:
      key: a PRNG key.
      shape: shape of the mask.
      rate: drop probability in [0, 1], a Python float or a traced scalar.
      broadcast_dims: dims along which the mask is shared.

    Returns:
      bool array of ``shape``.
    """
    shape = tuple(int(d) for d in shape)
    mask_shape = broadcast_shape(shape, broadcast_dims)
    threshold = keep_threshold(keep_probability(rate))
    return jnp.broadcast_to(keep_from_bits(random_bits(key, mask_shape, broadcast_to=shape), threshold), shape)


# --------------------------------------------------------------------------------------- floats


def uniform_from_bits(bits: jax.Array, minval: float = 0.0, maxval: float = 1.0) -> jax.Array:
    """Float32 uniforms on ``[minval, maxval)`` from ``uint32`` bits, as ``jax.random.uniform`` makes them.

    The top 23 bits become the mantissa of a float in [1, 2), so ``u = (bits >> 9) / 2**23`` on
    [0, 1) (the same 23 bits that :func:`keep_from_bits` compares with the threshold), then
    ``max(minval, u * (maxval - minval) + minval)``. With ``bits = random_bits(key, shape)`` this
    equals ``jax.random.uniform(key, shape, jnp.float32, minval, maxval)`` (bit for bit for the
    default range; for others up to XLA's choice of fusing the final multiply-add).
    """
    mantissa = (bits >> np.uint32(32 - THRESHOLD_BITS)) | np.uint32(0x3F800000)
    floats = lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
    low, high = np.float32(minval), np.float32(maxval)
    return lax.max(low, floats * (high - low) + low)


def normal_from_bits(bits: jax.Array) -> jax.Array:
    """Float32 standard normals from ``uint32`` bits, as ``jax.random.normal`` makes them.

    ``z = sqrt(2) * erfinv(u)`` with ``u`` uniform on ``[nextafter(-1, 0), 1)`` from
    :func:`uniform_from_bits`. With ``bits = random_bits(key, shape)`` this equals
    ``jax.random.normal(key, shape, jnp.float32)``.
    """
    low = np.nextafter(np.float32(-1.0), np.float32(0.0))
    return np.float32(np.sqrt(2.0)) * lax.erf_inv(uniform_from_bits(bits, low, 1.0))


# --------------------------------------------------------------------------------------- packing


def pack_bits(mask: jax.Array) -> jax.Array:
    """Packs a bool array into ``uint8``, 8 elements a byte (little-endian within each byte).

    Element ``i`` (row-major) is bit ``i % 8`` of byte ``i // 8``; the last byte is padded with
    zeros. The result has shape ``(ceil(mask.size / 8),)``; :func:`unpack_bits` inverts it.
    """
    flat = jnp.ravel(mask).astype(jnp.uint8)
    pad = (-flat.size) % 8
    flat = jnp.pad(flat, (0, pad)).reshape(-1, 8)
    weights = jnp.asarray(1 << np.arange(8), jnp.uint8)
    return jnp.sum(flat * weights, axis=1, dtype=jnp.uint8)


def unpack_bits(packed: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Inverse of :func:`pack_bits`: the bool array of ``shape`` packed into ``packed``."""
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    bits = (packed[:, None] >> jnp.arange(8, dtype=jnp.uint8)) & np.uint8(1)
    return bits.reshape(-1)[:size].reshape(shape).astype(bool)
