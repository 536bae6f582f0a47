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
is ever stored. With ``jax_threefry_partitionable=False`` JAX pairs the counters of the array's two halves
instead; the unrolled draw follows that layout too (:class:`Layout`), and under ``jax_enable_x64`` it draws
the 64-bit words of a float64 ``bernoulli``. Other key implementations (``rbg``, ``unsafe_rbg``, philox,
user-defined ones), and threefry arrays past those layouts, use ``jax.random.bits`` directly: jdrop's
fused path is used only where its bits are provably JAX's (:func:`threefry_layout`).

How bits become a keep decision
-------------------------------
The keep test is ``(bits >> 9) < ceil(keep * 2**23)``, which is exactly
``jax.random.bernoulli(key, keep, shape)`` (``uniform`` takes the top 23 bits of the same word). So
the mask of ``jdrop.dropout`` is the mask of ``flax.linen.Dropout`` and ``equinox.nn.Dropout`` for
the same key, and the realised keep probability ``ceil(keep * 2**23) / 2**23`` differs from
``1 - rate`` by less than ``2**-23`` (the contract allows ``2**-16``). Inverted scaling divides by
that realised probability, so ``E[dropout(x)] = x`` holds exactly, not just up to quantisation. When the
rate enters as float64 (a Python number or float64 array under ``jax_enable_x64``, as bernoulli takes
``1 - rate``), the test is ``(bits64 >> 12) < ceil(keep * 2**52)`` on 64-bit words, float64 bernoulli's.

The files
---------
One concept per file, this package face re-exporting every public name: ``_keys`` (per-example keys),
``_bits`` (threefry bits) and ``_lowering`` (the process-wide choice of their lowering), ``_index``
(global element indices), ``_keep`` (thresholds and the keep mask), ``_floats`` (uniforms and normals
from bits), ``_packing`` (1 bit per element). The key checks :func:`canonical_key` and
:func:`require_key` live in :mod:`jdrop._validation` with every other check.
"""

from jdrop._validation import canonical_key as canonical_key
from jdrop._validation import require_key as require_key
from jdrop.masks._bits import Layout as Layout
from jdrop.masks._bits import bits_at as bits_at
from jdrop.masks._bits import random_bits as random_bits
from jdrop.masks._bits import threefry2x32 as threefry2x32
from jdrop.masks._bits import threefry_layout as threefry_layout
from jdrop.masks._floats import normal_from_bits as normal_from_bits
from jdrop.masks._floats import uniform_from_bits as uniform_from_bits
from jdrop.masks._index import index_words as index_words
from jdrop.masks._keep import THRESHOLD_BITS as THRESHOLD_BITS
from jdrop.masks._keep import WIDE_THRESHOLD_BITS as WIDE_THRESHOLD_BITS
from jdrop.masks._keep import bits_dtype as bits_dtype
from jdrop.masks._keep import broadcast_shape as broadcast_shape
from jdrop.masks._keep import keep_from_bits as keep_from_bits
from jdrop.masks._keep import keep_mask as keep_mask
from jdrop.masks._keep import keep_threshold as keep_threshold
from jdrop.masks._keep import realised_keep as realised_keep
from jdrop.masks._keys import example_keys as example_keys
from jdrop.masks._keys import fold_in as fold_in
from jdrop.masks._lowering import BitsLowering as BitsLowering
from jdrop.masks._lowering import bits_lowering as bits_lowering
from jdrop.masks._lowering import set_bits_lowering as set_bits_lowering
from jdrop.masks._packing import pack_bits as pack_bits
from jdrop.masks._packing import unpack_bits as unpack_bits

__all__ = [
    "THRESHOLD_BITS",
    "WIDE_THRESHOLD_BITS",
    "Layout",
    "bits_at",
    "bits_dtype",
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
    "threefry_layout",
    "uniform_from_bits",
    "unpack_bits",
]
