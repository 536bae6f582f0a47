"""The public face of the fused attention: checks, then the layout and the kernel.

Every check goes through :mod:`jdrop._validation`; the tiling is :mod:`jdrop.attention._layout`'s,
the computation :mod:`jdrop.attention._kernel`'s.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike, DTypeLike

from jdrop import masks
from jdrop._shard_map import explicit_axes, on_auto_axes, spec_of
from jdrop._validation import (
    check_choice,
    check_deterministic,
    check_exact_draw,
    check_rate,
    positive_int,
    require_key,
)
from jdrop.attention import _dropout_mask
from jdrop.attention._checks import (
    check_attention_shapes,
    check_broadcastable,
    check_complex_supported,
    check_float_dtype,
    check_inexact_input,
    check_mask_rows,
    check_no_custom_products,
    check_not_sequence_parallel,
    check_shared_key,
)
from jdrop.attention._kernel import Config, Drop, DropoutMode, Operands, attention, dropout_operands, reverse_only
from jdrop.attention._layout import Layout
from jdrop.attention._ring import Ring
from jdrop.attention._ring import attention as ring_attention
from jdrop.attention._sow import attention_weights, sow_attention_weights

__all__ = ["DEFAULT_BLOCK_K", "DEFAULT_BLOCK_Q", "IMPLEMENTATIONS", "dot_product_attention"]

DEFAULT_BLOCK_Q = 256
"""Default query rows per tile (measured on a 2-core CPU: see BENCHMARKS.md)."""
DEFAULT_BLOCK_K = 128
"""Default key columns per tile."""
IMPLEMENTATIONS = ("xla", "pallas")
"""The values of ``implementation`` besides None (which is "xla" until the kernels are measured on hardware)."""


def _checked_inputs(query: Any, key: Any, value: Any, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``query``, ``key``, ``value`` as arrays of one floating ``dtype`` (default: promoted), shapes checked."""
    arrays = [check_inexact_input(x, name=name) for x, name in ((query, "query"), (key, "key"), (value, "value"))]
    dtype = check_float_dtype(jnp.result_type(*arrays) if dtype is None else dtype)
    query, key, value = (x.astype(dtype) for x in arrays)
    check_attention_shapes(query.shape, key.shape, value.shape)
    return query, key, value


def _checked_bias_and_mask(layout: Layout, bias: Any, mask: Any) -> tuple[jax.Array | None, jax.Array | None]:
    """``bias`` and ``mask`` as arrays (the mask bool), checked to broadcast to ``(batch..., Hq, Tq, Tk)``."""
    target = (*layout.batch_shape, layout.q_heads, layout.q_length, layout.k_length)
    arrays = []
    for name, array in (("bias", bias), ("mask", mask)):
        if array is not None:
            array = jnp.asarray(array)
            check_broadcastable(array.shape, target, name=name, axes="(batch..., heads, Tq, Tk)")
        arrays.append(array)
    bias, mask = arrays
    return bias, None if mask is None else mask.astype(bool)


def _dropout(mode: DropoutMode, mask_shape: tuple[int, ...], dropout_rng: Any, rate: float | jax.Array, dtype: Any,
             dropout_mask: str, implementation: str) -> tuple[Drop | None, str]:
    """The kernel's dropout operands (None without dropout) and how tiles draw the mask (see ``_dropout_mask``).

    Flax's mask for any key: a threefry key is drawn tile by tile in the counter layout and word width of the
    current configs; any other key's mask is drawn whole up front (1 byte per element), with a warning.
    """
    if mode == DropoutMode.NONE:
        return None, dropout_mask
    rng = require_key(dropout_rng, what="jdrop.dot_product_attention", name="dropout_rng")
    check_mask_rows(math.prod(mask_shape[:-1]))
    if dropout_mask != "exact":
        return _dropout_mask.operands(rng, rate, dtype, dropout_mask), dropout_mask
    key_data, threshold, factor = dropout_operands(rng, rate, dtype)
    draw, operand = _dropout_mask.exact_draw(rng, threshold, mask_shape)
    check_exact_draw(draw, mask_shape, implementation=implementation, impl=str(jax.random.key_impl(rng)))
    return (operand, threshold, factor), draw


def _config(layout: Layout, mode: DropoutMode, bias: jax.Array | None, masked: bool, causal: bool,
            precision: Any, dropout_mask: str) -> Config:
    """The kernel's static description of the call; ``bias`` is in the internal layout."""
    per_element = mode == DropoutMode.PER_ELEMENT
    bias_shape = () if bias is None else bias.shape
    return Config(
        block_q=layout.block_q,
        block_k=layout.block_k,
        k_length=layout.k_length,
        group=layout.group,
        causal=causal,
        skip_causal=causal and not masked,
        dropout=mode,
        dropout_shape=(layout.batch if per_element else 1, layout.q_heads if per_element else 1, layout.q_length,
                       layout.k_length),
        bias_full=tuple(d > 1 for d in bias_shape),
        precision=precision,
        mask=dropout_mask,
    )


def dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Any = None,
    dropout_rate: Any = 0.0,
    deterministic: bool = False,
    dtype: DTypeLike | None = None,
    precision: Any = None,
    module: Any = None,
    *,
    is_causal: bool = False,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Any = None,
    qk_attn_weights_einsum: Any = None,
    attn_weights_value_einsum: Any = None,
    block_q: int | None = None,
    block_k: int | None = None,
    implementation: str | None = None,
    dropout_mask: str = "exact",
    axis_name: Any = None,
    sequence_layout: str = "contiguous",
    batch_axis_name: Any = None,
    head_axis_name: Any = None,
    interpret: Any = None,
) -> jax.Array:
    """Dot-product attention (Vaswani et al. 2017) with dropout, blockwise, in O(T) memory.

    With ``S = q k^T / sqrt(D) + bias`` (masked entries set to ``finfo(float32).min``, as flax
    does), ``P = softmax(S)`` over the keys and ``m ~ Bernoulli(keep)`` per attention weight::

        train  out = (m * P / keep) v      eval (deterministic or rate 0)  out = P v

    ``m`` is ``jax.random.bernoulli(dropout_rng, 1 - dropout_rate, shape)``, exactly the mask
    ``flax.linen.dot_product_attention`` draws for the same ``dropout_rng``: ``shape`` is
    ``(batch..., heads, Tq, Tk)``, or ``(1, ..., 1, Tq, Tk)`` (one mask for every batch row and head)
    with ``broadcast_dropout=True``. ``keep`` is the realised keep probability
    ``ceil((1 - rate) * 2**23) / 2**23`` (within ``2**-23`` of flax's ``1 - rate``; under ``jax_enable_x64``
    flax's Python-float keep probability makes bernoulli draw float64 uniforms, and so does this function:
    ``2**52``), so the output is unbiased exactly. Every mode of autodiff works with the forward pass's
    mask: reverse mode (``jax.grad``, ``jacrev``), forward mode (``jax.jvp``, ``jacfwd``, ``linearize``)
    and their compositions (``jax.hessian``, ``grad`` of ``grad``), under ``jit`` and ``vmap``; not
    forward mode with ``axis_name`` or on sharded operands inside ``jax.shard_map`` (see below).
    Same arguments as flax's function: it is a drop-in ``attention_fn`` for
    ``flax.linen.MultiHeadDotProductAttention`` and ``flax.nnx.MultiHeadAttention``, and gives
    their outputs for the same rngs, to float rounding.

    How it differs from flax's: the ``(Tq, Tk)`` logits are visited one ``(block_q, block_k)``
    tile at a time with an online softmax (Rabe & Staats 2021; Dao et al. 2022, FlashAttention),
    each tile drawing its part of the mask by global element index (:func:`jdrop.masks.bits_at`);
    the backward pass (FlashAttention-2's, whose residuals are q, k, v, the output, the per-row
    logsumexp, kept as its max and log-sum, and the key) recomputes each tile's probabilities and
    mask. No ``Tq x Tk`` array is stored or built, so a training step's temporary memory grows
    linearly in the length, and results do not depend on the tile sizes (up to float rounding). It
    is plain JAX (``lax`` loops), so XLA compiles it for CPU, GPU and TPU.

    Forward mode is a blockwise forward-mode FlashAttention from the same residuals, in O(T) memory:
    with ``S = q k^T / sqrt(D) + bias``, ``P = softmax(S)`` (undropped), ``W = m * P / keep`` and
    ``out = W v``, the tangents ``dq, dk, dv, dbias`` give::

        dS = (dq k^T + q dk^T) / sqrt(D) + dbias      (0 at masked logits)
        d_out = W dv + (W * dS) v - c * out,            c_i = sum_j P_ij dS_ij

    one pass over each query tile's key tiles, each tile's mask drawn again from the key. Reverse
    mode still keeps only those residuals and runs the hand-written backward pass (the tangent map
    and its transpose tied by :func:`jdrop._linear.linear_map`), and second derivatives are exact.
    Inside ``jax.shard_map`` on sharded operands (and so with ``axis_name``), attention is reverse
    mode only (``jax.grad``, ``jax.vjp``, ``jax.hessian``): ``jax.jvp`` there raises a ``TypeError``
    that says so (``lax.custom_linear_solve``, which carries the tangent map, does not keep the mesh
    axes its operands vary along in JAX 0.10).

    ``implementation="pallas"`` runs the same algorithm as Pallas kernels instead (Dao 2023's
    FlashAttention-2 forward and backward; Mosaic on TPU, Triton on GPU), which draw each tile's
    mask in-kernel with the same threefry and the same global index, so the mask is still flax's,
    bit for bit. It takes float16, bfloat16 and float32 (not float64: TPUs have none), any mask,
    bias, causal flag, grouped queries and traced rate; tiles must suit the backend (TPU:
    ``block_q`` a multiple of 32, ``block_k`` of 128; GPU: powers of 2, at least 16; defaults
    128x128 and 64x64, or per compile target). Tiles a known target cannot hold raise a ``ValueError``
    naming ``block_q``/``block_k`` while tracing, before its compiler refuses them: TPU scoped VMEM;
    H100/H200 shared memory, 232448 bytes per kernel (each GPU kernel is checked as it is built, so a
    forward-only call is not refused for its gradient kernels; default tiles shrink to fit, e.g. at head
    dim 256). Broadcast dropout costs the kernels as much as per-head dropout (each
    (batch, head) program draws its tile's bits; the xla path draws them once), and a bias shared
    across batch rows or heads has its gradient reduced from a ``(B, H, Tq, Tk)`` float32 buffer
    (only when that gradient is used). It is checked on CPU only (Pallas's interpreter, and lowering
    for ``tpu`` and ``cuda``), not yet run on a GPU or TPU: the default, None, is ``"xla"``
    everywhere until it is measured there (``python -m benchmarks.gpu``).

    Sequence parallelism (ring attention, Liu et al. 2023): with ``axis_name``, called inside
    ``jax.shard_map`` on local shards, the sequence is taken to be sharded over that mesh axis (N
    devices: this device holds ``L`` of the ``N L`` queries and keys, placed by
    ``sequence_layout``). The key/value shards then travel around the devices (``lax.ppermute``),
    the partial outputs combine by their logsumexp, and the backward pass sends the key/value
    gradients around after them; each device draws exactly its part of the global mask
    ``bernoulli(dropout_rng, 1 - rate, (B, H, N L, N L))`` by global index, so outputs and
    gradients are the single-device call's on any number of devices, in O(L) memory per device.
    An argument, not a separate function, because a model runs on local shards inside one
    ``shard_map``: ``attention_fn=functools.partial(jdrop.dot_product_attention, axis_name="seq")``
    makes any flax attention module sequence-parallel (:func:`jdrop.sequence_parallel_attention` is
    the wrapper for global arrays). ``sequence_layout="zigzag"`` (device ``d`` holds chunks ``d``
    and ``2N - 1 - d`` of ``2N``; :func:`jdrop.attention.to_zigzag`) gives every device the same
    work at every step of causal attention; with ``"contiguous"`` shards the steps above the
    diagonal are skipped but devices idle (``N - 1/2`` block-times instead of ``N / 2``). Masks and
    biases may vary along the queries or along the keys (a key-padding mask ``(B, 1, 1, L)``
    travels with the keys), not both; causal attention needs equal query and key lengths.
    ``broadcast_dropout=False`` with the batch or heads sharded too (a 2-D mesh) needs
    ``batch_axis_name``/``head_axis_name``, so that each shard draws its rows of the mask.

    ``dropout_mask="fast16"`` or ``"fast8"`` (either implementation) opts into a cheaper mask that
    is *not* flax's: one threefry call per 4 or 8 attention weights, its 64 output bits split into
    16- or 8-bit uniforms (FlashAttention-2's trick), 3.6x or 6.4x fewer integer ops per weight
    (120 -> 33 or 19, counted by ``benchmarks/attention_mask.py``). The realised keep probability is
    ``ceil((1 - rate) * 2**b) / 2**b`` (``b`` = 16 or 8: the rate rounded down to a multiple of
    ``2**-b``) and kept weights are scaled by its inverse, so the output is still unbiased. The
    name says what it trades: the mask stops being exact (flax's) to be fast; 16 bits keep the
    contract's ``2**-16`` rate resolution, 8 bits are the coarse option.

    ``dropout_mask="hash8"`` (either implementation; not flax's mask either) spends the threefry call
    on a group of 4 rows (8 apart, in blocks of 32) and a tile: it gives the group a word ``a`` and an
    odd multiplier ``b``; every column ``c`` then gets one 32-bit word ``x = (a ^ c * 0x9E3779B9) * b``,
    ``x ^= x >> 16``, and member ``s`` of the group keeps its weight iff the top byte of
    ``x * K[s]`` (four odd constants) is below ``ceil((1 - rate) * 256)``. Cost per weight: a multiply
    and a compare, a quarter of the word's 4 ops, and the group's threefry call shared by the tile's
    columns: 3.3 (128 x 128 tiles, Mosaic) to 3.5 (64 x 64, Triton) integer ops, counted in the
    kernels' own IR (120 for exact, 19 for fast8); 4.5 to 6.9 integer PTX instructions on an H100 (76
    for exact, 16 for fast8). Realised keep probability and scaling as fast8's.
    Rows of different groups come from different threefry outputs; within a group, words and bytes
    come from the multiply-xorshift mix, a hash, not a generator with published test results: the
    tests check its keep rates, the joint keep rates of neighbouring weights (columns, rows, members
    of one word, heads, batch rows, tile edges) and NIST's frequency, runs and serial tests on its
    bits, and a transformer trained with it reaches the exact mask's accuracy within noise
    (docs/guides/attention_masks.md).

    Grouped-query and multi-query attention: ``key`` and ``value`` may have fewer heads than
    ``query`` (a divisor of its heads); query head ``h`` attends with key/value head
    ``h // (q_heads // kv_heads)``, as ``flax.nnx`` and repeating the key/value heads do.

    Where it follows flax's semantics exactly (``flax.linen.dot_product_attention`` and
    ``flax.nnx.dot_product_attention``, and their modules):

    - Complex inputs (complex64, complex128; ``implementation="xla"``, not sequence-parallel): flax's
      formula, ``softmax(s) = exp(s) / sum_k exp(s)`` of the complex logits ``s = q k^T / sqrt(D) +
      bias`` (no conjugate; masked entries ``finfo.min``), the output complex of the inputs' dtype.
      It is computed on the whole ``(Tq, Tk)`` matrix, as flax does (O(Tq Tk) memory), with the same
      dropout mask; gradients by autodiff (JAX's convention for complex functions, as flax's).
    - Sown weights (``module``): ``softmax(s)`` before dropout, in the inputs' dtype; float32 under
      ``force_fp32_for_softmax=True`` with another dtype (what ``flax.linen`` sows then). Their
      product runs at ``precision``, as every product of flax's.
    - Empty inputs: an output with a zero-size axis (batch, query length, heads or value depth) is
      returned empty, and attention over zero keys returns zeros (a sum over no keys), as flax's;
      their gradients are zeros.
    - Meshes with explicit axes (``jax.make_mesh``'s default, under ``jax.set_mesh``, arrays placed by
      ``jax.reshard``): the computation runs on ``Auto`` axes inside and the output carries flax's
      sharding (the query's, with the value's last axis), with the single-device values; so does the
      ring (``axis_name=`` inside ``jax.shard_map``) and the Pallas kernels.
    - Autodiff: reverse mode to any order (``jax.grad`` of ``jax.grad``), also with
      ``is_causal=True`` (the skipped tiles are conditional steps of fixed loops, so the first-order
      step still computes no tile above the diagonal). ``implementation="pallas"`` is first-order.
    - Where it differs: the softmax always runs in float32 (flax's only under
      ``force_fp32_for_softmax``, otherwise in ``dtype``), and the output is in ``dtype`` (flax.linen
      returns float32 under ``force_fp32_for_softmax`` with a lower ``dtype``).

    Args:
      query: ``(batch..., Tq, heads, D)``, floating (float16, bfloat16, float32, float64) or complex.
      key: ``(batch..., Tk, kv_heads, D)``.
      value: ``(batch..., Tk, kv_heads, Dv)``.
      bias: added to the logits, broadcastable to ``(batch..., heads, Tq, Tk)``; differentiable.
      mask: bool, broadcastable to ``(batch..., heads, Tq, Tk)``; False entries are masked out. A row
        masked entirely gets a uniform softmax over its keys, as in flax.
      broadcast_dropout: one dropout mask for all batch rows and heads (flax's default).
      dropout_rng: a PRNG key of any implementation (typed, or raw from ``PRNGKey``). Threefry keys
        draw the mask tile by tile (O(T) memory) under every ``jax_threefry_partitionable`` and
        ``jax_enable_x64``; other implementations (rbg, unsafe_rbg, philox, user-defined) have no
        counter-based bits: flax's mask is drawn whole (O(T^2) bytes, as flax's) with a warning.
        Needed in training when the rate is not statically 0.
      dropout_rate: drop probability in [0, 1], a Python float or a traced scalar (one compilation
        serves all rates; a traced rate outside [0, 1] makes the output NaN). 1 gives zeros.
      deterministic: evaluation mode (no dropout; the rng is ignored). A Python bool.
      dtype: the dtype of the inputs and output (default: their promoted dtype). Products
        accumulate, and the softmax runs, in at least float32 whatever the dtype.
      precision: ``lax.Precision`` of the products (the sown weights' too).
      module: a flax module to sow the attention weights into (flax's ``sow_weights=True``): the
        softmax probabilities (before dropout) are then computed apart, as a full
        ``(batch..., heads, Tq, Tk)`` array, and sown as ``"attention_weights"`` (``"intermediates"``
        in linen, ``nnx.Intermediate`` in nnx) in the dtype flax sows (see above); the output still
        comes from the blockwise kernel.
      is_causal: attend only to keys ``k <= q`` (flax.nnx's ``is_causal``), without building a mask;
        without a ``mask``, the tiles above the diagonal are skipped.
      force_fp32_for_softmax: flax's flag: the sown weights are float32 (the softmax here always
        runs in at least float32).
      einsum_dot_general: must be None (custom products, e.g. AQT, need flax's own attention).
      qk_attn_weights_einsum: must be None.
      attn_weights_value_einsum: must be None.
      block_q: query rows per tile (tuning only: results do not depend on it). Default: 256 for
        ``"xla"`` (tuned on a CPU), 128 (TPU) or 64 (GPU) for ``"pallas"``.
      block_k: key columns per tile. Default: 128 for ``"xla"``, 128 (TPU) or 64 (GPU) for ``"pallas"``.
      implementation: None (today ``"xla"`` everywhere), ``"xla"`` (the blockwise ``lax`` program) or
        ``"pallas"`` (the TPU or GPU kernels; ``ValueError`` on a CPU, or for float64 or tiles the
        backend refuses), as in ``jax.nn.dot_product_attention``.
      dropout_mask: ``"exact"`` (flax's mask, the default), ``"fast16"``, ``"fast8"`` or ``"hash8"``
        (see above).
      axis_name: a mesh axis name (or tuple of names) bound by an enclosing ``jax.shard_map``: the
        arrays are this device's shards of a sequence sharded over that axis (see above). None: the
        arrays are the whole sequence. Runs the ``"xla"`` kernel with the exact mask.
      sequence_layout: ``"contiguous"`` (device ``d`` holds positions ``[d L, (d + 1) L)``) or
        ``"zigzag"`` (chunks ``d`` and ``2N - 1 - d`` of ``L / 2`` each; ``L`` even). With
        ``axis_name`` only.
      batch_axis_name: mesh axes that shard the leading batch dim (with ``axis_name``): the
        global batch row of this device's first row for ``broadcast_dropout=False``.
      head_axis_name: mesh axes that shard the query and key/value heads alike (with ``axis_name``).
      interpret: with ``implementation="pallas"``, where the kernels run. None (the default) or False:
        compiled for the default backend's TPU or GPU. True: under Pallas's interpreter, on any machine
        a CPU included (the default backend's kernels; a CPU's are the TPU kernels), for debugging: every
        grid step is a loop iteration of plain XLA ops, slow but the same tile arithmetic.
        ``pltpu.InterpretParams(...)`` (``jax.experimental.pallas.tpu``): the TPU kernels under the TPU
        interpreter, which simulates VMEM, the DMAs and several cores, and with ``detect_races=True``
        prints ``RACE DETECTED`` for a data race. Only with ``implementation="pallas"``.

    Returns:
      ``(batch..., Tq, heads, Dv)`` in ``dtype``.

    Raises:
      ValueError: for a bad ``dropout_rate``, a missing or non-single ``dropout_rng`` in
        training, mismatched shapes, custom einsums, block sizes below 1, an unknown
        ``implementation`` or ``dropout_mask``, or what ``implementation="pallas"`` cannot take (tiles
        past the compile target's VMEM or shared memory included); with
        ``axis_name``: an unbound axis, a mask or bias that varies along both queries and keys,
        ``module``, ``implementation="pallas"``, a fast ``dropout_mask``, shard lengths the layout or
        causal masking cannot take, or a ``dropout_rng`` that differs along the sequence axis (or along
        an undeclared batch or head axis with ``broadcast_dropout=False``); complex inputs with
        ``implementation="pallas"`` or ``axis_name``.
      TypeError: for integer inputs, a ``dtype`` neither floating nor complex, a non-bool ``deterministic``, or
        non-int block sizes.

    Example::

      >>> q = k = v = jnp.ones((2, 1024, 8, 64))
      >>> out = jdrop.dot_product_attention(q, k, v, dropout_rng=jax.random.key(0), dropout_rate=0.1)
      >>> out = jdrop.dot_product_attention(q, k, v, dropout_rng=jax.random.key(0), dropout_rate=0.1,
      ...                                   implementation="pallas", dropout_mask="fast16")  # on a GPU/TPU
      >>> from jax.experimental.pallas import tpu as pltpu
      >>> out = jdrop.dot_product_attention(q, k, v, dropout_rng=jax.random.key(0), dropout_rate=0.1,
      ...                                   implementation="pallas", interpret=pltpu.InterpretParams(
      ...                                       detect_races=True, num_cores_or_threads=2))  # the TPU kernels, on a CPU
      >>> ring = functools.partial(jdrop.dot_product_attention, axis_name="seq", is_causal=True)
      >>> out = jax.shard_map(lambda q, k, v: ring(q, k, v, dropout_rng=key, dropout_rate=0.1),
      ...                     mesh=jax.make_mesh((8,), ("seq",)), in_specs=P(None, "seq"),
      ...                     out_specs=P(None, "seq"))(q, k, v)   # the sequence over 8 devices
      >>> layer = flax.linen.MultiHeadDotProductAttention(8, dropout_rate=0.1,
      ...                                                 attention_fn=jdrop.dot_product_attention)
    """
    check_no_custom_products(einsum_dot_general=einsum_dot_general, qk_attn_weights_einsum=qk_attn_weights_einsum,
                             attn_weights_value_einsum=attn_weights_value_einsum)
    block_q, block_k, implementation, dropout_mask = _checked_options(block_q, block_k, implementation, dropout_mask)
    deterministic = check_deterministic(deterministic)
    query, key, value = _checked_inputs(query, key, value, dtype)
    check_complex_supported(query.dtype, implementation=implementation, sequence_parallel=axis_name is not None)
    layout = _tiling(query, key, block_q, block_k, dropout_mask)
    bias, mask = _checked_bias_and_mask(layout, bias, mask)
    rate = check_rate(dropout_rate, name="dropout_rate")
    mode = _dropout_mode(deterministic, rate, broadcast_dropout)
    ring = None if axis_name is None else _ring_plan(axis_name, sequence_layout, batch_axis_name, head_axis_name,
                                                     layout, bias, mask, bool(is_causal), module, implementation,
                                                     dropout_mask)
    pallas = _pallas_backend(implementation, interpret)
    mask_shape = _mask_shape(layout, ring, mode == DropoutMode.PER_ELEMENT)
    real = jnp.finfo(query.dtype).dtype  # complex inputs: the mask's factors are real
    drop, draw = _dropout(mode, mask_shape, dropout_rng, rate, real, dropout_mask, implementation)
    if module is not None:
        sow_attention_weights(module, query, key, bias, mask, bool(is_causal), precision=precision,
                              force_fp32_for_softmax=bool(force_fp32_for_softmax))
    if query.size == 0 or key.shape[-3] == 0 or value.shape[-1] == 0 or jnp.iscomplexobj(query):
        return _whole_matrix(query, key, value, bias, mask, bool(is_causal), precision, drop, mask_shape,
                             dropout_rng, rate)
    run = partial(_attend, layout, mode, mask_shape, ring, pallas, bool(is_causal), precision, draw, block_q,
                  block_k)
    args = (query, key, value, bias, mask, drop)
    axes = explicit_axes(args)
    if axes:  # under jax.set_mesh with explicit axes: the kernels run on Auto axes, the output sharded as flax's
        spec = _output_spec(query, value)
        return on_auto_axes(run, args, axes, lambda out: spec)
    return run(*args)


def _whole_matrix(query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array | None,
                       mask: jax.Array | None, causal: bool, precision: Any, drop: Drop | None,
                       mask_shape: tuple[int, int, int, int], dropout_rng: Any, rate: Any) -> jax.Array:
    """flax's formula on the whole ``(Tq, Tk)`` matrix, for complex or empty inputs; gradients by autodiff.

    Empty output, or no keys: zeros, as flax's (a sum over no keys). Complex inputs:
    ``out = (m * softmax(q k^T / sqrt(D) + bias) / keep) v`` with the complex softmax ``exp(s) / sum exp(s)``
    and ``m`` the mask the kernels draw (``jdrop.masks.keep_mask``: flax's ``bernoulli``).
    """
    if query.size == 0 or key.shape[-3] == 0 or value.shape[-1] == 0:
        return jnp.zeros((*query.shape[:-1], value.shape[-1]), query.dtype)
    weights = attention_weights(query, key, bias, mask, causal, precision)
    if drop is not None:
        factor = drop[2]
        keep_bits = masks.keep_mask(require_key(dropout_rng, what="jdrop.dot_product_attention",
                                                name="dropout_rng"), mask_shape, rate)
        batch = query.shape[:-3]
        shape = (*batch, *mask_shape[1:]) if mask_shape[0] > 1 else (1,) * len(batch) + mask_shape[1:]
        weights = weights * jnp.where(keep_bits, factor, 0 * factor).reshape(shape).astype(weights.dtype)
    group = query.shape[-2] // key.shape[-2]
    out = jnp.einsum("...hqk,...khd->...qhd", weights, jnp.repeat(value, group, axis=-2), precision=precision,
                     preferred_element_type=weights.dtype)
    return out.astype(query.dtype)


def _output_spec(query: jax.Array, value: jax.Array) -> P:
    """The sharding of flax's output ``einsum("...hqk,...khd->...qhd", weights, value)``: the query's but the last axis.

    The last axis is the value's (unless that mesh axis already shards another axis of the output).
    """
    spec = spec_of(query)[:-1]
    last = spec_of(value)[-1]
    used = {a for entry in spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))}
    mine = set() if last is None else set(last if isinstance(last, tuple) else (last,))
    return P(*spec, None if mine & used else last)


def _attend(layout: Layout, mode: DropoutMode, mask_shape: tuple[int, int, int, int], ring: Ring | None,
            pallas: tuple[Any, str, bool] | None, causal: bool, precision: Any, draw: str,
            block_q: int | None, block_k: int | None, query: jax.Array, key: jax.Array, value: jax.Array,
            bias: jax.Array | None, mask: jax.Array | None, drop: Drop | None) -> jax.Array:
    """The checked inputs through the ring, the Pallas kernels or the xla kernel: ``(batch..., Tq, Hq, Dv)``.

    ``draw`` is how the tiles draw the mask (a ``dropout_mask`` mode, or the layout of flax's exact mask for the
    current key and configs: see ``_dropout_mask``); the kernels take the ``"exact"`` draw and the fast modes only.
    """
    query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)  # scaled once, as flax does
    if ring is not None:
        return _ring_attention(ring, layout, mode, mask_shape, query, key, value, bias, mask, drop, causal, precision,
                               draw)
    if pallas is not None:
        kernels, backend, interpret = pallas
        return kernels.attention(layout, query, key, value, bias, mask, drop, dropout=mode, dropout_mask=draw,
                                 precision=precision, is_causal=causal, block_q=block_q, block_k=block_k,
                                 backend=backend, interpret=interpret)
    bias, mask = (None if x is None else layout.internal(x) for x in (bias, mask))
    cfg = _config(layout, mode, bias, mask is not None, causal, precision, draw)
    ops = Operands(layout.query_tiles(query), layout.key_tiles(key), layout.key_tiles(value), bias, mask, drop)
    return layout.from_query_tiles(attention(cfg, ops))


def _checked_options(block_q: Any, block_k: Any, implementation: Any, dropout_mask: Any
                     ) -> tuple[int | None, int | None, str, str]:
    """Tiles (None: the implementation's default), the implementation (None: ``"xla"``) and the mask, checked."""
    block_q, block_k = (None if b is None else positive_int(b, name=name) for b, name in
                        ((block_q, "block_q"), (block_k, "block_k")))
    implementation = "xla" if implementation is None else check_choice(implementation, IMPLEMENTATIONS,
                                                                         name="implementation")
    return block_q, block_k, implementation, check_choice(dropout_mask, _dropout_mask.MODES, name="dropout_mask")


def _pallas_backend(implementation: str, interpret: Any) -> tuple[Any, str, Any] | None:
    """With ``implementation="pallas"``, the kernels' module, backend and interpret mode (``ValueError`` where they
    cannot run); else None (and ``interpret``, the kernels' option, must be None)."""
    if implementation != "pallas":
        if interpret is not None:
            raise ValueError(f"`interpret` applies to implementation='pallas' only, got interpret={interpret!r} "
                             f"with implementation={implementation!r}; drop it, or pass implementation='pallas'.")
        return None
    from jdrop.attention import _pallas  # imports jax.experimental.pallas: only when asked for

    backend, interpret = _pallas.resolve_backend(interpret)
    return _pallas, backend, interpret


def _tiling(query: jax.Array, key: jax.Array, block_q: int | None, block_k: int | None, dropout_mask: str) -> Layout:
    """The xla path's tiling: the given tiles or the defaults; a fast mask's rows in whole groups per tile."""
    layout = Layout.of(query, key, DEFAULT_BLOCK_Q if block_q is None else block_q,
                       DEFAULT_BLOCK_K if block_k is None else block_k)
    if dropout_mask != "exact":  # whole groups of rows per tile (see _dropout_mask)
        span = _dropout_mask.group_rows(dropout_mask)
        layout = layout._replace(block_q=-(-layout.block_q // span) * span)
    return layout


def _dropout_mode(deterministic: bool, rate: float | jax.Array, broadcast_dropout: bool) -> DropoutMode:
    """No dropout when deterministic or at a static rate 0; else one mask for all rows and heads, or one each."""
    if deterministic or (isinstance(rate, float) and rate == 0.0):
        return DropoutMode.NONE
    return DropoutMode.BROADCAST if broadcast_dropout else DropoutMode.PER_ELEMENT


def _mask_shape(layout: Layout, ring: Ring | None, per_element: bool) -> tuple[int, int, int, int]:
    """The shape of flax's dropout mask: the call's, or the whole ring's (global sequence, batch and heads)."""
    if ring is not None:
        return ring.dropout_shape(layout, per_element)
    return (layout.batch if per_element else 1, layout.q_heads if per_element else 1, layout.q_length,
            layout.k_length)


def _ring_attention(ring: Ring, layout: Layout, mode: DropoutMode, mask_shape: tuple[int, int, int, int],
                    query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array | None,
                    mask: jax.Array | None, drop: Drop | None, causal: bool, precision: Any,
                    draw: str = "exact") -> jax.Array:
    """The checked, scaled local shards through the ring (:mod:`jdrop.attention._ring`), back in their layout."""
    if drop is not None:
        check_shared_key(drop[0], query, sequence_axis=ring.axis_name,
                         declared=(ring.batch_axis_name, ring.head_axis_name),
                         per_element=mode == DropoutMode.PER_ELEMENT)
    chunk = ring.chunk_layout(layout)
    ops = ring.operands(chunk, query, key, value, bias, mask, drop)
    cfg = _config(chunk, mode, None if ops.bias is None else ops.bias[0], mask is not None, causal, precision,
                  draw)
    out = reverse_only(ring_attention, cfg._replace(dropout_shape=mask_shape), ring, ops,
                       where=f"with axis_name={ring.axis_name!r} (ring attention)")
    return ring.output(chunk, out)


def _ring_plan(axis_name: Any, sequence_layout: str, batch_axis_name: Any, head_axis_name: Any, layout: Layout,
               bias: jax.Array | None, mask: jax.Array | None, causal: bool, module: Any, implementation: str,
               dropout_mask: str) -> Ring:
    """The ring of a sequence-parallel call, after rejecting what it cannot honour."""
    check_not_sequence_parallel(module, name="module", why="sowing the attention weights needs the whole "
                                "(Tq, Tk) matrix on one device")
    check_not_sequence_parallel(None if implementation == "xla" else implementation, name="implementation",
                                why="the ring composes the xla kernel's block pairs (Pallas block pairs are not wired)")
    check_not_sequence_parallel(None if dropout_mask == "exact" else dropout_mask, name="dropout_mask",
                                why="the fast masks group rows by single-device tiles, which the ring's chunks split")
    return Ring.plan(axis_name, sequence_layout, batch_axis_name, head_axis_name, layout, bias, mask, causal)
