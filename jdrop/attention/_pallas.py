"""Pallas kernels of :func:`jdrop.dot_product_attention`: Mosaic (TPU) and Triton (GPU), flax's masks in-kernel.

Four kernels implement the forward and the FlashAttention-2 backward (Dao 2023) of the blockwise
attention of :mod:`jdrop.attention`:

- forward: per ``(batch, query head, query tile)``, an online softmax over the key tiles; outputs the
  attention output and each row's logsumexp, kept as its max and log-sum (see ``_forward_tile``);
- ``dK, dV``: per ``(batch, key/value head, key tile)``, a loop over the group's query heads and the query
  tiles that see the key tile;
- ``dQ``: per ``(batch, query head, query tile)``, a loop over the key tiles it sees;
- ``dbias`` (only when a bias is given and its gradient is used: a separate kernel, so that XLA drops it
  otherwise): one logit-gradient tile per program, reduced over the axes the bias broadcasts along.

Every tile recomputes its probabilities from the logsumexp and draws its dropout factors in-kernel from
the key by global element index, with the same threefry and the same index as the xla path
(:mod:`jdrop.attention._dropout_mask`, :func:`jdrop.masks.index_words`), so the mask is
``jax.random.bernoulli(dropout_rng, 1 - rate, shape)``, flax's, bit for bit (or the same fast mask as the xla
path's). Nothing of ``Tq x Tk`` elements is stored (but a bias gradient, see ``_bias_gradient``).

The tile arithmetic (``_logits``, ``_factors``, ``_forward_tile``, ``_backward_tile``) is one set of functions
of arrays; each backend has its own thin shell around it (block specs, grid and loops):

- TPU (Mosaic): the reduction axis (key tiles in the forward pass and ``dQ``, query tiles in ``dK, dV``) is the
  last grid axis, marked ``arbitrary``, with accumulators in VMEM scratch; skipped causal tiles are guarded by
  ``pl.when`` and their block indices clamped so that no copy is issued for them. Tiles: ``block_q`` a
  multiple of 32 (int8/bf16 sublane tiling), ``block_k`` a multiple of 128 (lanes).
- GPU (Triton): the grid covers the parallel axes only and the kernel loops over the reduction axis with
  ``lax.fori_loop`` (the loop bound skips causal tiles); Triton needs power-of-2 tiles and head dims (head
  dims are zero-padded to one) and tiles of at least 16 for its matrix units.

Both shells run on CPU under ``interpret=True`` or the TPU interpreter's ``pltpu.InterpretParams`` (the
``interpret`` argument of :func:`jdrop.dot_product_attention`; the tests compare them with the xla path there, the
TPU interpreter with its race detector on), lower for their target on any machine, and compile for H100 and TPU
v4/v5e/v6e without a device (``tests/accelerators``, ``benchmarks/accelerator_tiles.py``): the compile target is
the abstract mesh's device (:func:`target_platform`, :func:`compile_target`), so tracing under
``jax.sharding.use_abstract_mesh`` of a compile-only TPU or H100 picks its kernels. Default tiles are per compile
target (:data:`TARGET_BLOCKS`, from those compilers' register, shared-memory and VMEM reports); tiles a target
cannot hold raise a ``ValueError`` naming ``block_q``/``block_k`` before its compiler runs: TPU scoped VMEM
(:func:`check_vmem`), H100/H200 shared memory per GPU kernel (:func:`check_shared_memory`, from Triton's
allocation as :func:`shared_memory_estimate` models it; default tiles shrink to fit). Every ``pallas_call``
carries a ``pl.CostEstimate`` (:func:`cost_estimate`), which XLA:TPU's ``cost_analysis()`` adds up (the Triton
lowering of jax 0.10.2 drops it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from jdrop._linear import linear_map
from jdrop._shard_map import varying_axes
from jdrop.attention import _dropout_mask
from jdrop.attention._kernel import (
    Config,
    Drop,
    DropoutMode,
    LogSumExp,
    Operands,
    Tangent,
    output_tangent,
    reverse_only,
    tangent,
)
from jdrop.attention._layout import Layout, _pad_axis

BACKENDS = ("tpu", "gpu")
DEFAULT_BLOCKS = {"tpu": (128, 128), "gpu": (64, 64)}
"""Default ``(block_q, block_k)`` per backend, for targets without an entry in :data:`TARGET_BLOCKS`."""
TARGET_BLOCKS: dict[tuple[str | None, int], tuple[int, int]] = {
    # H100, head dim 128, 8 warps, by ptxas -arch=sm_90a -v: 16-bit 128 x 64 has no spills (registers: forward
    # 185, dK/dV 218, dQ 204) and at most 193 KiB of shared memory (limit 227); 128 x 128 needs 258 KiB (refused),
    # 64 x 128 spills in dK/dV. float32 spills in dK/dV at every tile (144 bytes at 32 x 64, the fewest; 276 at
    # 64 x 64, and dQ 60 there too).
    ("h100", 2): (128, 64),
    ("h100", 4): (32, 64),
    # TPU: 512 x 512 is accepted by XLA:TPU for bfloat16 and float32 on each chip, takes an estimated 3.1 / 4.6 MiB of
    # the 16 MiB scoped VMEM (room for bias and mask tiles), and compiles in a fraction of the time of larger tiles
    # (v5e value_and_grad, T=4096: 27 s bf16 against 67 s for 512 x 1024 and over 150 s for 1024 x 1024).
    **{(chip, itemsize): (512, 512) for chip in ("v4", "v5e", "v6e") for itemsize in (2, 4)},
}
"""Default ``(block_q, block_k)`` per compile target and itemsize, from what each target's compiler reports
(``python -m benchmarks.accelerator_tiles sweep``; ``benchmarks/results/accelerator_tiles.json``)."""
SCOPED_VMEM_BYTES = {"v4": 16 * 2**20, "v5e": 16 * 2**20, "v6e": 32 * 2**20}
"""XLA:TPU's scoped VMEM limit per chip, as its ``CompileTimeScopedVmemOom`` reports it ("limit 16.00M" on v5e)."""
SHARED_MEMORY_BYTES = {"h100": 232448}
"""Shared memory one GPU thread block may take, per target: H100's (and H200's: the same SM) 227 KiB opt-in limit,
as XLA:GPU reports it when it refuses a kernel ("requested 263680, available: 232448")."""
_TARGETS = (("H100", "h100"), ("H200", "h100"), ("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"),
            ("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"))
_KERNEL_NAMES = {"forward": "forward", "dq": "dQ", "dkv": "dK/dV", "dbias": "bias-gradient"}
_MASK_VALUE = float(np.finfo(np.float32).min)  # flax's big negative: a fully masked row is uniform


# ----------------------------------------------------------------------------------- static description


class _Spec(NamedTuple):
    """Static description of one call (hashable: the custom rules' non-differentiable argument)."""

    q_length: int  # real lengths; the arrays are padded to whole tiles
    k_length: int
    block_q: int
    block_k: int
    q_heads: int
    group: int  # query heads per key/value head
    causal: bool
    skip_causal: bool  # no user mask: tiles above the diagonal are skipped
    dropout: DropoutMode
    mask_mode: str  # "exact", "fast16", "fast8", "hash8" (see jdrop.attention._dropout_mask)
    mask_rows: int  # rows of flax's mask viewed as (rows, k_length): Tq, or B * Hq * Tq
    bias_full: tuple[bool, ...]  # per axis of the 5-d bias (batch, kv head, group, q, k): full or broadcast
    mask_full: tuple[bool, ...]
    precision: Any
    backend: str  # "tpu" or "gpu"
    interpret: Any  # False, True or a pltpu.InterpretParams: pallas_call's interpret
    target: str | None = None  # the compile target (compile_target()) of compiled kernels, None when interpreted

    @property
    def has_bias(self) -> bool:
        return bool(self.bias_full)

    @property
    def has_mask(self) -> bool:
        return bool(self.mask_full)

    @property
    def has_dropout(self) -> bool:
        return self.dropout != DropoutMode.NONE

    @property
    def lane_rows(self) -> bool:
        """Per-row residuals laid out along lanes, ``(..., 1, Tq)``, rather than ``(..., Tq, 1)``.

        On TPU, whose HBM arrays are tiled ``(8, 128)`` over their last two dims, a ``(..., Tq, 1)`` float32 array
        takes 128 times its size (a lane-padded ``(Tq, 128)``), ``(..., 1, Tq)`` 8 times. Blocks ``(1, block_q)``
        need ``block_q`` a multiple of 128 (lanes) or the whole (one-tile) query length.
        """
        return self.backend == "tpu" and (self.block_q % 128 == 0 or self.q_length <= self.block_q)

    def compiler_params(self, semantics: tuple[Any, ...], warps: int = 4) -> Any:
        if self.backend == "tpu":
            return pltpu.CompilerParams(dimension_semantics=semantics)
        return pltriton.CompilerParams(num_warps=warps, num_stages=2)


def _rows_shape(spec: _Spec, lead: tuple[int, ...], q_padded: int) -> tuple[int, ...]:
    """Shape of a per-row float32 residual (row max, log row sum, delta) with leading dims ``lead``."""
    return (*lead, 1, q_padded) if spec.lane_rows else (*lead, q_padded, 1)


def _rows_block(spec: _Spec, lead: int, index: Callable[..., tuple[Any, ...]]) -> pl.BlockSpec:
    """Block spec of a per-row residual: ``lead`` squeezed leading dims; ``index(*grid ids)`` their indices and the
    query tile's."""
    squeezed = (None,) * lead
    if spec.lane_rows:
        return pl.BlockSpec((*squeezed, 1, spec.block_q), lambda *ids: (*index(*ids)[:-1], 0, index(*ids)[-1]))
    return pl.BlockSpec((*squeezed, spec.block_q, 1), lambda *ids: (*index(*ids), 0))


def _load_rows(spec: _Spec, ref) -> jax.Array:
    """A query tile's per-row residual as a ``(block_q, 1)`` column."""
    x = ref[...]
    return x.T if spec.lane_rows else x


def _residuals(spec: _Spec, max_ref, lse_ref, delta_ref) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A query tile's row max, log row sum and delta, ``(block_q, 1)`` columns."""
    return _load_rows(spec, max_ref), _load_rows(spec, lse_ref), _load_rows(spec, delta_ref)


def _store_rows(spec: _Spec, ref, column: jax.Array) -> None:
    """Stores a ``(block_q, 1)`` column; lane-laid rows by a transpose (a reshape is a sublane gather, which TPU v4
    lacks)."""
    ref[...] = column.T if spec.lane_rows else column


def _div(a: Any, b: int) -> Any:
    """``a // b`` for non-negative ``a``: ``lax.div`` (jnp's floor division adds sign fix-ups Mosaic lowers by chip)."""
    return lax.div(a, np.int32(b)) if isinstance(a, jax.Array) else a // b


def _rem(a: Any, b: int) -> Any:
    return lax.rem(a, np.int32(b)) if isinstance(a, jax.Array) else a % b


def _visible_k_blocks(spec: _Spec, i: Any, n_k: int) -> Any:
    """Key tiles query tile ``i`` sees: all, or those on or below the causal diagonal."""
    if not spec.skip_causal:
        return n_k
    return jnp.minimum(n_k, _div((i + 1) * spec.block_q - 1, spec.block_k) + 1)


def _first_q_block(spec: _Spec, j: Any) -> Any:
    """First query tile that sees key tile ``j``."""
    if not spec.skip_causal:
        return 0
    return _div(j * spec.block_k, spec.block_q)


# ----------------------------------------------------------------------------------- cost estimate

_PRODUCTS = {"forward": (1, 1), "dkv": (2, 2), "dq": (2, 1), "dbias": (1, 1)}
"""Per kernel, the tile products over the head dim ``D`` and over ``Dv``: forward ``Q K^T``, ``P~ V``; dK/dV
``Q K^T``, ``dS^T Q``, ``dO V^T``, ``dO^T P~``; dQ ``Q K^T``, ``dS K``, ``dO V^T``; dbias ``Q K^T``, ``dO V^T``."""
_SOFTMAX_OPS = {"forward": 3, "dkv": 5, "dq": 5, "dbias": 5}
"""Per kernel, float ops per logit besides the products: forward max, subtract, sum; backward the two subtractions
of ``S - max - log_sum``, ``P~ dP~``, ``P delta`` and their difference."""


def visited_tiles(spec: _Spec, n_q: int, n_k: int) -> int:
    """``(query tile, key tile)`` pairs a kernel computes per query head: all, or those causal skipping keeps."""
    if not spec.skip_causal:
        return n_q * n_k
    return sum(min(n_k, ((i + 1) * spec.block_q - 1) // spec.block_k + 1) for i in range(n_q))


def cost_estimate(spec: _Spec, kernel: str, q, k, v, bias, mask) -> pl.CostEstimate:
    """The ``pl.CostEstimate`` of one of the four kernels, from the shapes of its padded operands.

    With ``E = B Hq n bq bk`` the logits the kernel computes (``n``: :func:`visited_tiles`, so causal skipping
    counts) and ``D``, ``Dv`` the head dims (as padded for the backend):

    - flops: ``2 E (a D + b Dv)`` for its ``a``, ``b`` tile products (``_PRODUCTS``), plus per logit its softmax
      ops (``_SOFTMAX_OPS``), 1 for a bias (add), 2 for a causal flag or a mask (compare, select) and, with
      dropout, 1 (the multiply by the factors) plus the mask's integer ops
      (:func:`jdrop.attention._dropout_mask.integer_ops`: about 123 per logit for the exact mask, a quarter or
      an eighth of that for the fast ones), counted as flops as XLA's cost analysis counts integer ops;
    - transcendentals: one ``exp`` per logit, and in the forward pass one ``exp`` per row and key tile (the
      running max's correction) and one ``log`` per row;
    - bytes accessed: each block the schedule copies from or to HBM: the tiles of the operand that the kernel
      walks (k, v per visited tile in the forward and dQ kernels; q, dO and the three per-row float32 residuals
      per visited tile in the dK/dV kernel; all of them in the dbias kernel), the others once per program, a bias
      or mask tile per visited tile and the outputs once (the dbias kernel writes every tile, zeros where skipped).
      The dropout scalars (20 bytes) are left out.
    """
    batch, q_heads, q_padded, depth = q.shape
    kv_heads, k_padded, value_depth = k.shape[1], k.shape[2], v.shape[3]
    bq, bk = spec.block_q, spec.block_k
    n_q, n_k = q_padded // bq, k_padded // bk
    pairs = batch * q_heads * visited_tiles(spec, n_q, n_k)
    logits = pairs * bq * bk
    a, b = _PRODUCTS[kernel]
    per_logit = (_SOFTMAX_OPS[kernel] + (bias is not None) + 2 * (spec.causal or mask is not None)
                 + spec.has_dropout)
    flops = 2 * logits * (a * depth + b * value_depth) + per_logit * logits
    if spec.has_dropout:
        flops += _dropout_mask.integer_ops(spec.mask_mode, logits, bk)
    transcendentals = logits + (pairs * bq + batch * q_heads * q_padded if kernel == "forward" else 0)
    item = q.dtype.itemsize
    row_tile, col_tile = bq * (depth + value_depth) * item, bk * (depth + value_depth) * item
    residuals = 4 * bq * (2 if kernel == "forward" else 3)  # float32 per-row values of a query tile
    extra = sum(x.dtype.itemsize * (bq if x.shape[3] > 1 else 1) * (bk if x.shape[4] > 1 else 1)
                for x in (bias, mask) if x is not None)  # per visited tile
    heads_rows = batch * q_heads * n_q
    if kernel == "forward":
        moved = heads_rows * (bq * (depth + value_depth) * item + residuals) + pairs * (col_tile + extra)
    elif kernel == "dkv":
        moved = pairs * (row_tile + residuals + extra) + 2 * batch * kv_heads * n_k * col_tile
    elif kernel == "dq":
        moved = heads_rows * (row_tile + bq * depth * item + residuals) + pairs * (col_tile + extra)
    else:
        moved = pairs * (row_tile + col_tile + residuals + extra) + heads_rows * n_k * bq * bk * 4
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(moved))


# ----------------------------------------------------------------------------------- tile arithmetic


def _dot(spec: _Spec, a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2-d product contracting ``a``'s axis ``contract[0]`` with ``b``'s ``contract[1]``, in float32."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=spec.precision,
                           preferred_element_type=jnp.float32)


def _logits(spec: _Spec, q, k, bias, mask, i, j) -> tuple[jax.Array, jax.Array | None]:
    """Logits of tile (i, j), ``(bq, bk)`` float32, masked as flax masks them, and the allowed entries (or None).

    ``q`` is already scaled by ``1/sqrt(D)``; ``bias``/``mask`` are the tile's, ``(bq | 1, bk | 1)``. Masked
    entries get ``finfo(float32).min``; key columns past ``k_length`` (padding) get ``-inf``.
    """
    s = _dot(spec, q, k, (1, 1))
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    shape = s.shape
    rows = i * spec.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = j * spec.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
    allowed = None
    if mask is not None:
        allowed = jnp.broadcast_to(mask != 0, shape)
    if spec.causal:
        allowed = cols <= rows if allowed is None else allowed & (cols <= rows)
    if allowed is not None:
        s = jnp.where(allowed, s, _MASK_VALUE)
    if spec.k_length % spec.block_k:
        s = jnp.where(cols < spec.k_length, s, -jnp.inf)
    return s, allowed


def _factors(spec: _Spec, drop, head: Any, i: Any, j: Any) -> jax.Array | None:
    """Tile (i, j)'s dropout factors for query head index ``head = b * Hq + h``, or None without dropout.

    The same index and the same bits as the xla path's ``_dropout_factors`` (uint32 iotas are built as int32
    ones and converted: Mosaic has only int32 iotas).
    """
    if drop is None:
        return None
    key_data, threshold, factor = drop
    rows = (i * spec.block_q + _dropout_mask.first_rows(spec.block_q, spec.mask_mode)).astype(jnp.uint32)
    if spec.dropout == DropoutMode.PER_ELEMENT:
        rows = head.astype(jnp.uint32) * np.uint32(spec.q_length) + rows
    cols = (j * spec.block_k + lax.broadcasted_iota(jnp.int32, (1, spec.block_k), 1)).astype(jnp.uint32)
    keep = _dropout_mask.tile_keep_at(key_data, rows, cols, spec.k_length, spec.mask_rows, threshold, spec.mask_mode)
    return jnp.where(keep, factor, 0 * factor)  # dropped: 0, or NaN with the factor (as in the core)


def _forward_tile(spec: _Spec, carry, s: jax.Array, v: jax.Array, factors: jax.Array | None):
    """One online-softmax step (Milakov & Gimelshein 2018; Dao 2023): ``(max, sum, acc)`` after tile ``s``."""
    row_max, row_sum, acc = carry
    new_max = jnp.maximum(row_max, s.max(axis=-1, keepdims=True))
    # A row whose logits so far are all -inf (a -inf bias) keeps a finite reference point.
    safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    p = jnp.exp(s - safe_max)
    correction = jnp.exp(row_max - safe_max)
    row_sum = row_sum * correction + p.sum(axis=-1, keepdims=True)
    if factors is not None:
        p = p * factors
    acc = acc * correction + _dot(spec, p.astype(v.dtype), v, (1, 0))
    return new_max, row_sum, acc


def _key_gradients_t(spec: _Spec, p_dropped, ds, q, do) -> tuple[jax.Array, jax.Array]:
    """A tile's contributions to ``dK^T = Q^T dS`` ``(D, bk)`` and ``dV^T = dO^T P~`` ``(Dv, bk)``, float32.

    Transposed, so that the tiles derived from the logits (``P~``, ``dS``) are the right-hand operands, contracted
    over their first axis as they lie: only the loaded ``q``/``dO`` tiles are transposed. (``dS^T Q`` contracts
    ``dS`` over its first axis through a transpose of a chain of broadcasts, which XLA:GPU's Triton pipeline,
    folding that transpose up through the broadcasts, never finishes compiling with dropout.) The shells
    accumulate ``dK^T``, ``dV^T`` and transpose once at the end.
    """
    d_v_t = _dot(spec, do, p_dropped.astype(do.dtype), (0, 0))
    d_k_t = _dot(spec, q, ds.astype(q.dtype), (0, 0))
    return d_k_t, d_v_t


def _backward_tile(spec: _Spec, s, allowed, do, v, row_max, log_row_sum, delta, factors):
    """``(P~, dS)`` of a tile: the dropped probabilities (for dV) and the logit gradient (for dQ, dK, dbias).

    ``dS = P * (dP~ * factors - delta) = P~ * dP~ - P * delta``, ``dP~ = dO V^T``, ``delta = rowsum(dO * O)``.
    """
    p = jnp.exp(s - row_max - log_row_sum)
    dp = _dot(spec, do, v, (1, 1))
    p_dropped = p if factors is None else p * factors
    ds = p_dropped * dp - p * delta
    if allowed is not None and spec.has_mask:
        # Masked logits are a constant: no gradient, even in a fully masked row (whose P is uniform).
        ds = jnp.where(allowed, ds, 0.0)
    return p_dropped, ds


# ----------------------------------------------------------------------------------- refs and specs


class _Inputs(NamedTuple):
    """The kernel's optional refs, unpacked (None where absent)."""

    bias: Any
    mask: Any
    seed: Any
    factor: Any


def _split_refs(spec: _Spec, refs: tuple, n_leading: int) -> tuple[tuple, _Inputs, tuple]:
    """``(leading refs, optional input refs, remaining refs)`` in the order the kernels are called with."""
    leading, rest = refs[:n_leading], list(refs[n_leading:])
    bias = rest.pop(0) if spec.has_bias else None
    mask = rest.pop(0) if spec.has_mask else None
    seed = factor = None
    if spec.has_dropout:
        seed, factor = rest.pop(0), rest.pop(0)
    return leading, _Inputs(bias, mask, seed, factor), tuple(rest)


def _drop(inputs: _Inputs):
    if inputs.seed is None:
        return None
    return (inputs.seed[0, 0], inputs.seed[0, 1]), inputs.seed[0, 2], inputs.factor[0, 0]


def _scalar_spec(spec: _Spec, size: int) -> pl.BlockSpec:
    """The dropout scalars, ``(1, size)``: a row, so that under ``vmap`` (per-example keys) the batched
    ``(N, 1, size)`` array's blocks still span its last two dims, as Mosaic requires."""
    if spec.backend == "tpu":
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec((1, size), lambda *_: (0, 0))


def _broadcast_block(spec: _Spec, full: tuple[bool, ...], rows: int, cols: int):
    """Block shape of a 5-d bias or mask whose tile is ``(rows | 1, cols | 1)``, and its index map builder."""
    shape = (None, None, None, rows if full[3] else 1, cols if full[4] else 1)

    def index(b, h, i, j):
        kv_head, member = _div(h, spec.group), _rem(h, spec.group)
        return (b if full[0] else 0, kv_head if full[1] else 0, member if full[2] else 0, i if full[3] else 0,
                j if full[4] else 0)

    return shape, index


def _optional_specs(spec: _Spec, index_of, rows: int, cols: int) -> list[pl.BlockSpec]:
    """Block specs of bias, mask and dropout scalars; ``index_of(grid ids) -> (b, h, i, j)`` of the tile."""
    specs = []
    for full in (spec.bias_full, spec.mask_full):
        if full:
            shape, index = _broadcast_block(spec, full, rows, cols)
            specs.append(pl.BlockSpec(shape, lambda *ids, index=index: index(*index_of(*ids))))
    if spec.has_dropout:
        specs += [_scalar_spec(spec, 4), _scalar_spec(spec, 1)]
    return specs


def _optional_args(bias, mask, drop) -> list[jax.Array]:
    args = [x for x in (bias, mask) if x is not None]
    if drop is not None:
        (k0, k1), threshold, factor = drop
        args.append(jnp.stack([k0, k1, threshold, jnp.zeros((), jnp.uint32)]).reshape(1, 4))
        args.append(factor.reshape(1, 1).astype(jnp.float32))
    return args


def _column_slice(ref, full: bool, j: Any, size: int) -> jax.Array:
    """Key tile ``j`` of a bias or mask row-block ref (``(bq | 1, Tk | 1)``), for the GPU shells' loops."""
    if not full:
        return ref[...]
    return ref[:, pl.ds(pl.multiple_of(j * size, size), size)]


def _member_rows(ref, full: tuple[bool, ...], g: Any, i: Any, size: int) -> jax.Array:
    """Query tile ``i`` of group member ``g`` of a bias or mask ref ``(G | 1, Tq | 1, bk | 1)`` (GPU dK, dV loop)."""
    rows = pl.ds(pl.multiple_of(i * size, size), size) if full[3] else slice(None)
    return ref[g if full[2] else 0, rows, :]


def _key_tiles_gpu(spec: _Spec, q: jax.Array, k_ref, v_ref, inputs: _Inputs) -> tuple[Any, Callable[[Any], tuple]]:
    """For a GPU shell's program over query tile ``i`` (its loop over key tiles): ``(i, key_tile)``, where
    ``key_tile(j)`` is key tile ``j``'s keys, values, logits, allowed entries and dropout factors."""
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    drop = _drop(inputs)
    bk = spec.block_k

    def key_tile(j: Any) -> tuple:
        start = pl.multiple_of(j * bk, bk)
        k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        bias = None if inputs.bias is None else _column_slice(inputs.bias, spec.bias_full[4], j, bk)
        mask = None if inputs.mask is None else _column_slice(inputs.mask, spec.mask_full[4], j, bk)
        s, allowed = _logits(spec, q, k, bias, mask, i, j)
        return k, v, s, allowed, _factors(spec, drop, b * spec.q_heads + h, i, j)

    return i, key_tile


# ----------------------------------------------------------------------------------- forward


def _forward_kernel_gpu(spec: _Spec, n_k: int, *refs):
    (q_ref, k_ref, v_ref), inputs, (o_ref, max_ref, lse_ref) = _split_refs(spec, refs, 3)
    q = q_ref[...]
    i, key_tile = _key_tiles_gpu(spec, q, k_ref, v_ref, inputs)

    def body(j, carry):
        _, v, s, _, factors = key_tile(j)
        return _forward_tile(spec, carry, s, v, factors)

    bq = spec.block_q
    init = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, v_ref.shape[-1]), jnp.float32))
    row_max, row_sum, acc = lax.fori_loop(0, _visible_k_blocks(spec, i, n_k), body, init)
    o_ref[...] = (acc / row_sum).astype(o_ref.dtype)
    max_ref[...] = row_max
    lse_ref[...] = jnp.log(row_sum)


def _forward_kernel_tpu(spec: _Spec, n_k: int, *refs):
    (q_ref, k_ref, v_ref), inputs, (o_ref, max_ref, lse_ref, max_scratch, sum_scratch, acc_scratch) = _split_refs(
        spec, refs, 3)
    b, h, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        max_scratch[...] = jnp.full(max_scratch.shape, -jnp.inf, jnp.float32)
        sum_scratch[...] = jnp.zeros(sum_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    @pl.when(j < _visible_k_blocks(spec, i, n_k))
    def _step():
        bias = None if inputs.bias is None else inputs.bias[...]
        mask = None if inputs.mask is None else inputs.mask[...]
        s, _ = _logits(spec, q_ref[...], k_ref[...], bias, mask, i, j)
        carry = (max_scratch[...], sum_scratch[...], acc_scratch[...])
        factors = _factors(spec, _drop(inputs), b * spec.q_heads + h, i, j)
        row_max, row_sum, acc = _forward_tile(spec, carry, s, v_ref[...], factors)
        max_scratch[...], sum_scratch[...], acc_scratch[...] = row_max, row_sum, acc

    @pl.when(j == n_k - 1)
    def _finish():
        o_ref[...] = (acc_scratch[...] / sum_scratch[...]).astype(o_ref.dtype)
        _store_rows(spec, max_ref, max_scratch[...])
        _store_rows(spec, lse_ref, jnp.log(sum_scratch[...]))


def _forward(spec: _Spec, q, k, v, bias, mask, drop):
    """``(out, row_max, log_row_sum)``: out ``(B, Hq, Tq, Dv)``, the float32 residuals of shape ``_rows_shape``."""
    batch, q_heads, q_padded, depth = q.shape
    k_padded, value_depth = k.shape[2], v.shape[3]
    bq, bk, group = spec.block_q, spec.block_k, spec.group
    n_q, n_k = q_padded // bq, k_padded // bk
    out_shape = [jax.ShapeDtypeStruct((batch, q_heads, q_padded, value_depth), q.dtype),
                 jax.ShapeDtypeStruct(_rows_shape(spec, (batch, q_heads), q_padded), jnp.float32),
                 jax.ShapeDtypeStruct(_rows_shape(spec, (batch, q_heads), q_padded), jnp.float32)]
    if spec.backend == "tpu":
        def last_k(i, j):
            return jnp.minimum(j, _visible_k_blocks(spec, i, n_k) - 1)  # skipped tiles: no new copy

        grid: tuple[int, ...] = (batch, q_heads, n_q, n_k)
        row = pl.BlockSpec((None, None, bq, depth), lambda b, h, i, j: (b, h, i, 0))
        def key_tile(b, h, i, j):
            return b, _div(h, group), last_k(i, j), 0

        in_specs = [row, pl.BlockSpec((None, None, bk, depth), key_tile),
                    pl.BlockSpec((None, None, bk, value_depth), key_tile),
                    *_optional_specs(spec, lambda b, h, i, j: (b, h, i, last_k(i, j)), bq, bk)]
        out_specs = [pl.BlockSpec((None, None, bq, value_depth), lambda b, h, i, j: (b, h, i, 0)),
                     *[_rows_block(spec, 2, lambda b, h, i, j: (b, h, i))] * 2]
        scratch = [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                   pltpu.VMEM((bq, value_depth), jnp.float32)]
        kernel = partial(_forward_kernel_tpu, spec, n_k)
        params = spec.compiler_params(("parallel", "parallel", "parallel", "arbitrary"))
    else:
        grid = (n_q, batch, q_heads)
        in_specs = [pl.BlockSpec((None, None, bq, depth), lambda i, b, h: (b, h, i, 0)),
                    pl.BlockSpec((None, None, k_padded, depth), lambda i, b, h: (b, _div(h, group), 0, 0)),
                    pl.BlockSpec((None, None, k_padded, value_depth), lambda i, b, h: (b, _div(h, group), 0, 0)),
                    *_optional_specs(spec, lambda i, b, h: (b, h, i, 0), bq, k_padded)]
        out_specs = [pl.BlockSpec((None, None, bq, value_depth), lambda i, b, h: (b, h, i, 0)),
                     pl.BlockSpec((None, None, bq, 1), lambda i, b, h: (b, h, i, 0)),
                     pl.BlockSpec((None, None, bq, 1), lambda i, b, h: (b, h, i, 0))]
        scratch = []
        kernel = partial(_forward_kernel_gpu, spec, n_k)
        params = spec.compiler_params((), warps=4 if depth <= 64 else 8)
        check_shared_memory(spec, "forward", depth, value_depth, q.dtype.itemsize)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          scratch_shapes=scratch, compiler_params=params, interpret=spec.interpret,
                          cost_estimate=cost_estimate(spec, "forward", q, k, v, bias, mask),
                          name="jdrop_attention_forward")(q, k, v, *_optional_args(bias, mask, drop))


# ----------------------------------------------------------------------------------- backward: dK, dV


def _dkv_kernel_gpu(spec: _Spec, n_q: int, *refs):
    (q_ref, k_ref, v_ref, do_ref, max_ref, lse_ref, delta_ref), inputs, (dk_ref, dv_ref) = _split_refs(spec, refs, 7)
    j, b, kv_head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    drop = _drop(inputs)
    k, v = k_ref[...], v_ref[...]
    bq = spec.block_q

    def member_body(g, carry):
        def body(i, carry):
            d_k, d_v = carry
            rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
            q, do = q_ref[g, rows, :], do_ref[g, rows, :]
            bias = None if inputs.bias is None else _member_rows(inputs.bias, spec.bias_full, g, i, bq)
            mask = None if inputs.mask is None else _member_rows(inputs.mask, spec.mask_full, g, i, bq)
            s, allowed = _logits(spec, q, k, bias, mask, i, j)
            factors = _factors(spec, drop, b * spec.q_heads + kv_head * spec.group + g, i, j)
            p_dropped, ds = _backward_tile(spec, s, allowed, do, v, max_ref[g, rows, :], lse_ref[g, rows, :],
                                           delta_ref[g, rows, :], factors)
            d_k_t, d_v_t = _key_gradients_t(spec, p_dropped, ds, q, do)
            return d_k + d_k_t, d_v + d_v_t

        return lax.fori_loop(_first_q_block(spec, j), n_q, body, carry)

    init = (jnp.zeros(k.shape[::-1], jnp.float32), jnp.zeros(v.shape[::-1], jnp.float32))
    d_k_t, d_v_t = lax.fori_loop(0, spec.group, member_body, init)
    dk_ref[...] = d_k_t.T.astype(dk_ref.dtype)
    dv_ref[...] = d_v_t.T.astype(dv_ref.dtype)


def _dkv_kernel_tpu(spec: _Spec, n_q: int, *refs):
    (q_ref, k_ref, v_ref, do_ref, max_ref, lse_ref, delta_ref), inputs, rest = _split_refs(spec, refs, 7)
    dk_ref, dv_ref, dk_scratch, dv_scratch = rest
    b, kv_head, j, g, i = (pl.program_id(axis) for axis in range(5))

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
        dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

    @pl.when(i >= _first_q_block(spec, j))
    def _step():
        bias = None if inputs.bias is None else inputs.bias[...]
        mask = None if inputs.mask is None else inputs.mask[...]
        q, do = q_ref[...], do_ref[...]
        s, allowed = _logits(spec, q, k_ref[...], bias, mask, i, j)
        factors = _factors(spec, _drop(inputs), b * spec.q_heads + kv_head * spec.group + g, i, j)
        p_dropped, ds = _backward_tile(spec, s, allowed, do, v_ref[...], *_residuals(spec, max_ref, lse_ref, delta_ref),
                                       factors)
        d_k_t, d_v_t = _key_gradients_t(spec, p_dropped, ds, q, do)
        dk_scratch[...] += d_k_t
        dv_scratch[...] += d_v_t

    @pl.when((g == spec.group - 1) & (i == n_q - 1))
    def _finish():
        dk_ref[...] = dk_scratch[...].T.astype(dk_ref.dtype)
        dv_ref[...] = dv_scratch[...].T.astype(dv_ref.dtype)


def _dkv(spec: _Spec, q, k, v, do, row_max, log_row_sum, delta, bias, mask, drop):
    batch, q_heads, q_padded, depth = q.shape
    kv_heads, k_padded, value_depth = k.shape[1], k.shape[2], v.shape[3]
    bq, bk, group = spec.block_q, spec.block_k, spec.group
    n_q, n_k = q_padded // bq, k_padded // bk

    def grouped(x):  # (B, Hq, Tq, d) -> (B, Hk, G, Tq, d): a free reshape
        return x.reshape(batch, kv_heads, group, *x.shape[2:])

    cost = cost_estimate(spec, "dkv", q, k, v, bias, mask)
    q, do, row_max, log_row_sum, delta = map(grouped, (q, do, row_max, log_row_sum, delta))
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if spec.backend == "tpu":
        def first_i(i, j):  # skipped tiles: no new copy (and none past the last tile, for keys beyond all queries)
            return jnp.minimum(jnp.maximum(i, _first_q_block(spec, j)), n_q - 1)

        grid: tuple[int, ...] = (batch, kv_heads, n_k, group, n_q)

        def rows(width):
            return pl.BlockSpec((None, None, None, bq, width), lambda b, h, j, g, i: (b, h, g, first_i(i, j), 0))

        def cols(width):
            return pl.BlockSpec((None, None, bk, width), lambda b, h, j, g, i: (b, h, j, 0))

        in_specs = [rows(depth), cols(depth), cols(value_depth), rows(do.shape[-1]),
                    *[_rows_block(spec, 3, lambda b, h, j, g, i: (b, h, g, first_i(i, j)))] * 3,
                    *_optional_specs(spec, lambda b, h, j, g, i: (b, h * group + g, first_i(i, j), j), bq, bk)]
        out_specs = [cols(depth), cols(value_depth)]
        scratch = [pltpu.VMEM((depth, bk), jnp.float32), pltpu.VMEM((value_depth, bk), jnp.float32)]
        kernel = partial(_dkv_kernel_tpu, spec, n_q)
        params = spec.compiler_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary"))
    else:
        grid = (n_k, batch, kv_heads)

        def rows(width):
            return pl.BlockSpec((None, None, group, q_padded, width), lambda j, b, h: (b, h, 0, 0, 0))

        def cols(width):
            return pl.BlockSpec((None, None, bk, width), lambda j, b, h: (b, h, j, 0))

        optional = []
        for full in (spec.bias_full, spec.mask_full):
            if full:
                shape = (None, None, group if full[2] else 1, q_padded if full[3] else 1, bk if full[4] else 1)
                optional.append(pl.BlockSpec(shape, lambda j, b, h, full=full: (
                    b if full[0] else 0, h if full[1] else 0, 0, 0, j if full[4] else 0)))
        if spec.has_dropout:
            optional += [_scalar_spec(spec, 4), _scalar_spec(spec, 1)]
        in_specs = [rows(depth), cols(depth), cols(value_depth), rows(do.shape[-1]), rows(1), rows(1), rows(1),
                    *optional]
        out_specs = [cols(depth), cols(value_depth)]
        scratch = []
        kernel = partial(_dkv_kernel_gpu, spec, n_q)
        params = spec.compiler_params((), warps=4 if depth <= 64 else 8)
        check_shared_memory(spec, "dkv", depth, value_depth, q.dtype.itemsize)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          scratch_shapes=scratch, compiler_params=params, interpret=spec.interpret, cost_estimate=cost,
                          name="jdrop_attention_dkv")(q, k, v, do, row_max, log_row_sum, delta,
                                                       *_optional_args(bias, mask, drop))


# ----------------------------------------------------------------------------------- backward: dQ


def _dq_kernel_gpu(spec: _Spec, n_k: int, *refs):
    (q_ref, k_ref, v_ref, do_ref, max_ref, lse_ref, delta_ref), inputs, (dq_ref,) = _split_refs(spec, refs, 7)
    q, do = q_ref[...], do_ref[...]
    row_max, log_row_sum, delta = _residuals(spec, max_ref, lse_ref, delta_ref)
    i, key_tile = _key_tiles_gpu(spec, q, k_ref, v_ref, inputs)

    def body(j, d_q):
        k, v, s, allowed, factors = key_tile(j)
        _, ds = _backward_tile(spec, s, allowed, do, v, row_max, log_row_sum, delta, factors)
        return d_q + _dot(spec, ds.astype(k.dtype), k, (1, 0))

    d_q = lax.fori_loop(0, _visible_k_blocks(spec, i, n_k), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = d_q.astype(dq_ref.dtype)


def _dq_kernel_tpu(spec: _Spec, n_k: int, *refs):
    (q_ref, k_ref, v_ref, do_ref, max_ref, lse_ref, delta_ref), inputs, (dq_ref, dq_scratch) = _split_refs(
        spec, refs, 7)
    b, h, i, j = (pl.program_id(axis) for axis in range(4))

    @pl.when(j == 0)
    def _init():
        dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

    @pl.when(j < _visible_k_blocks(spec, i, n_k))
    def _step():
        bias = None if inputs.bias is None else inputs.bias[...]
        mask = None if inputs.mask is None else inputs.mask[...]
        k = k_ref[...]
        s, allowed = _logits(spec, q_ref[...], k, bias, mask, i, j)
        factors = _factors(spec, _drop(inputs), b * spec.q_heads + h, i, j)
        residuals = _residuals(spec, max_ref, lse_ref, delta_ref)
        _, ds = _backward_tile(spec, s, allowed, do_ref[...], v_ref[...], *residuals, factors)
        dq_scratch[...] += _dot(spec, ds.astype(k.dtype), k, (1, 0))

    @pl.when(j == n_k - 1)
    def _finish():
        dq_ref[...] = dq_scratch[...].astype(dq_ref.dtype)


def _row_specs_by_tile(spec: _Spec, q, k, v, index_of, k_block: int, k_index):
    """Block specs of q, k, v, dO and the three row residuals for kernels indexed by query tiles."""
    bq, group = spec.block_q, spec.group
    depth, value_depth = q.shape[3], v.shape[3]

    def rows(width):
        return pl.BlockSpec((None, None, bq, width), lambda *ids: (*index_of(*ids)[:3], 0))

    def cols(width):
        return pl.BlockSpec((None, None, k_block, width), lambda *ids: (
            index_of(*ids)[0], _div(index_of(*ids)[1], group), k_index(*ids), 0))

    residual = _rows_block(spec, 2, lambda *ids: index_of(*ids)[:3])
    return [rows(depth), cols(depth), cols(value_depth), rows(value_depth), residual, residual, residual]


def _dq(spec: _Spec, q, k, v, do, row_max, log_row_sum, delta, bias, mask, drop):
    batch, q_heads, q_padded, depth = q.shape
    k_padded = k.shape[2]
    bq, bk = spec.block_q, spec.block_k
    n_q, n_k = q_padded // bq, k_padded // bk
    index_of: Callable[..., tuple[Any, ...]]
    if spec.backend == "tpu":
        def index_of(b, h, i, j):
            return b, h, i, jnp.minimum(j, _visible_k_blocks(spec, i, n_k) - 1)

        grid: tuple[int, ...] = (batch, q_heads, n_q, n_k)
        in_specs = [*_row_specs_by_tile(spec, q, k, v, index_of, bk, lambda *ids: index_of(*ids)[3]),
                    *_optional_specs(spec, index_of, bq, bk)]
        scratch = [pltpu.VMEM((bq, depth), jnp.float32)]
        kernel = partial(_dq_kernel_tpu, spec, n_k)
        params = spec.compiler_params(("parallel", "parallel", "parallel", "arbitrary"))
        out_spec = pl.BlockSpec((None, None, bq, depth), lambda b, h, i, j: (b, h, i, 0))
    else:
        def index_of(i, b, h):  # the GPU grid has no key axis
            return b, h, i, 0

        grid = (n_q, batch, q_heads)
        in_specs = [*_row_specs_by_tile(spec, q, k, v, index_of, k_padded, lambda *ids: 0),
                    *_optional_specs(spec, index_of, bq, k_padded)]
        scratch = []
        kernel = partial(_dq_kernel_gpu, spec, n_k)
        params = spec.compiler_params((), warps=4 if depth <= 64 else 8)
        check_shared_memory(spec, "dq", depth, v.shape[3], q.dtype.itemsize)
        out_spec = pl.BlockSpec((None, None, bq, depth), lambda i, b, h: (b, h, i, 0))
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=grid, in_specs=in_specs,
                          out_specs=out_spec, scratch_shapes=scratch, compiler_params=params,
                          interpret=spec.interpret, cost_estimate=cost_estimate(spec, "dq", q, k, v, bias, mask),
                          name="jdrop_attention_dq")(
        q, k, v, do, row_max, log_row_sum, delta, *_optional_args(bias, mask, drop))


# ----------------------------------------------------------------------------------- backward: dbias


def _dbias_kernel(spec: _Spec, n_k: int, *refs):
    (q_ref, k_ref, v_ref, do_ref, max_ref, lse_ref, delta_ref), inputs, (ds_ref,) = _split_refs(spec, refs, 7)
    b, h, i, j = (pl.program_id(axis) for axis in range(4))

    def compute():
        bias = inputs.bias[...]
        mask = None if inputs.mask is None else inputs.mask[...]
        s, allowed = _logits(spec, q_ref[...], k_ref[...], bias, mask, i, j)
        factors = _factors(spec, _drop(inputs), b * spec.q_heads + h, i, j)
        residuals = _residuals(spec, max_ref, lse_ref, delta_ref)
        _, ds = _backward_tile(spec, s, allowed, do_ref[...], v_ref[...], *residuals, factors)
        ds_ref[...] = ds

    if not spec.skip_causal:
        compute()
        return
    visible = j < _visible_k_blocks(spec, i, n_k)
    pl.when(visible)(compute)

    @pl.when(jnp.logical_not(visible))
    def _zeros():
        ds_ref[...] = jnp.zeros(ds_ref.shape, jnp.float32)


def _bias_gradient(spec: _Spec, q, k, v, do, row_max, log_row_sum, delta, bias, mask, drop):
    """The gradient of the (5-d, padded) bias: the logit gradients, summed over the axes the bias broadcasts along.

    Each program writes one ``(block_q, block_k)`` tile of ``dS``; a bias shared across batch rows or heads
    therefore costs a temporary ``(B, Hq, Tq, Tk)`` float32 array for its gradient (the xla path accumulates
    it in place instead). Only computed when the bias gradient is used.
    """
    batch, q_heads, q_padded, _ = q.shape
    k_padded = k.shape[2]
    bq, bk = spec.block_q, spec.block_k
    n_q, n_k = q_padded // bq, k_padded // bk

    def index_of(b, h, i, j):
        return b, h, i, j

    in_specs = [*_row_specs_by_tile(spec, q, k, v, index_of, bk, lambda b, h, i, j: j),
                *_optional_specs(spec, index_of, bq, bk)]
    semantics = ("parallel",) * 4
    if spec.backend == "gpu":
        check_shared_memory(spec, "dbias", q.shape[3], v.shape[3], q.dtype.itemsize)
    ds = pl.pallas_call(partial(_dbias_kernel, spec, n_k),
                        out_shape=jax.ShapeDtypeStruct((batch, q_heads, q_padded, k_padded), jnp.float32),
                        grid=(batch, q_heads, n_q, n_k), in_specs=in_specs,
                        out_specs=pl.BlockSpec((None, None, bq, bk), lambda b, h, i, j: (b, h, i, j)),
                        compiler_params=spec.compiler_params(semantics), interpret=spec.interpret,
                        cost_estimate=cost_estimate(spec, "dbias", q, k, v, bias, mask),
                        name="jdrop_attention_dbias")(q, k, v, do, row_max, log_row_sum, delta,
                                                      *_optional_args(bias, mask, drop))
    ds = ds.reshape(batch, q_heads // spec.group, spec.group, q_padded, k_padded)
    axes = tuple(axis for axis, full in enumerate(spec.bias_full) if not full)
    return ds.sum(axis=axes, keepdims=True).astype(bias.dtype) if axes else ds.astype(bias.dtype)


# ----------------------------------------------------------------------------------- every mode of autodiff


def _xla_operands(spec: _Spec, q, k, v, bias, mask, drop) -> tuple[Config, Operands]:
    """The xla path's config and operands (:mod:`jdrop.attention._kernel`) of the kernels' arguments: the same
    tiles, mask and dropout draw, so that its blockwise forward-mode pass draws the kernels' dropout mask."""
    batch, q_heads, q_padded, _ = q.shape
    per_element = spec.dropout == DropoutMode.PER_ELEMENT
    cfg = Config(block_q=spec.block_q, block_k=spec.block_k, k_length=spec.k_length, group=spec.group,
                 causal=spec.causal, skip_causal=spec.skip_causal, dropout=spec.dropout,
                 dropout_shape=(batch if per_element else 1, q_heads if per_element else 1, spec.q_length,
                                spec.k_length),
                 bias_full=spec.bias_full, precision=spec.precision, mask=spec.mask_mode)
    xla_drop = None
    if drop is not None:
        (k0, k1), threshold, factor = drop
        xla_drop = (jnp.stack([k0, k1]), threshold, factor)
    ops = Operands(_query_tiles(spec, q), _key_tiles(spec, k), _key_tiles(spec, v), bias,
                   None if mask is None else mask != 0, xla_drop)
    return cfg, ops


def _query_tiles(spec: _Spec, x: jax.Array) -> jax.Array:
    """``(B, Hq, Tq_pad, ...)`` -> the xla path's ``(nq, B, Hk, G, bq, ...)``."""
    batch, q_heads, q_padded, *rest = x.shape
    x = x.reshape(batch, q_heads // spec.group, spec.group, q_padded // spec.block_q, spec.block_q, *rest)
    return jnp.moveaxis(x, 3, 0)


def _key_tiles(spec: _Spec, x: jax.Array) -> jax.Array:
    """``(B, Hk, Tk_pad, D)`` -> the xla path's ``(nk, B, Hk, bk, D)``."""
    batch, kv_heads, k_padded, depth = x.shape
    return jnp.moveaxis(x.reshape(batch, kv_heads, k_padded // spec.block_k, spec.block_k, depth), 2, 0)


def _from_query_tiles(x: jax.Array) -> jax.Array:
    """Inverse of :func:`_query_tiles` for ``(nq, B, Hk, G, bq, Dv)``."""
    n_q, batch, kv_heads, group, bq, depth = x.shape
    return jnp.moveaxis(x, 0, 3).reshape(batch, kv_heads * group, n_q * bq, depth)


def _tangent_parts(spec: _Spec, residuals: tuple[Any, ...], tangents: tuple[jax.Array, ...]) -> Tangent:
    """The xla path's blockwise forward-mode pass (:func:`jdrop.attention._kernel.tangent`) on the kernels'
    residuals."""
    q, k, v, bias, mask, drop, _, row_max, log_row_sum = residuals
    d_q, d_k, d_v, *d_bias = tangents
    cfg, ops = _xla_operands(spec, q, k, v, bias, mask, drop)
    d_ops = Operands(_query_tiles(spec, d_q), _key_tiles(spec, d_k), _key_tiles(spec, d_v),
                     d_bias[0] if d_bias else None, None, None)
    rows = (q.shape[0], q.shape[1], q.shape[2])
    lse = LogSumExp(*(_query_tiles(spec, x.reshape(rows)) for x in (row_max, log_row_sum)))
    return tangent(cfg, ops, d_ops, lse)


def _tangent(spec: _Spec, residuals: tuple[Any, ...], tangents: tuple[jax.Array, ...]) -> jax.Array:
    """The output tangent, ``dO = D dV + (D * dS) V - c * O`` (:func:`_tangent_parts`)."""
    parts = _tangent_parts(spec, residuals, tangents)
    return _from_query_tiles(output_tangent(parts, _query_tiles(spec, residuals[6])))


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _forward_rows(spec: _Spec, q, k, v, bias, mask, drop):
    """:func:`_forward` with a JVP (which the ``pallas_call`` lacks), for second derivatives: ``dO`` by
    :func:`_tangent`, and the rows' logsumexp ``L = m + log l`` (used only as that sum) moving by
    ``dL_i = sum_j P_ij dS_ij = c_i`` in its log-sum part."""
    return _forward(spec, q, k, v, bias, mask, drop)


@_forward_rows.defjvp
def _forward_rows_jvp(spec: _Spec, primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
    out, row_max, log_row_sum = _forward_rows(spec, *primals)
    residuals = (*primals, out, row_max, log_row_sum)
    live = tuple(tangents[:3]) + (() if primals[3] is None else (tangents[3],))
    parts = _tangent_parts(spec, residuals, live)
    d_out = _from_query_tiles(output_tangent(parts, _query_tiles(spec, out)))
    d_log_row_sum = _from_query_tiles(parts.c[..., None]).reshape(log_row_sum.shape)
    return (out, row_max, log_row_sum), (d_out, jnp.zeros_like(row_max), d_log_row_sum)


def _transpose(spec: _Spec, residuals: tuple[Any, ...], d_out: jax.Array, *, bias_gradient: bool = True
               ) -> tuple[jax.Array, ...]:
    """The FlashAttention-2 backward kernels: ``(dq, dk, dv)``, and ``dbias`` where there is a bias and
    ``bias_gradient`` (the ``dbias`` kernel is left out of the program otherwise)."""
    q, k, v, bias, mask, drop, out, row_max, log_row_sum = residuals
    # rowsum(dP~ * P~) = dO . O: the softmax backward's per-row term, dropout included.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = delta[:, :, None, :] if spec.lane_rows else delta[..., None]
    d_out = d_out.astype(q.dtype)
    args = (q, k, v, d_out, row_max, log_row_sum, delta, bias, mask, drop)
    d_k, d_v = _dkv(spec, *args)
    d_q = _dq(spec, *args)
    return (d_q, d_k, d_v) + (() if bias is None or not bias_gradient else (_bias_gradient(spec, *args),))


def _attention(spec: _Spec, q, k, v, bias, mask, drop):
    """The kernels' attention, differentiable in every mode (:func:`jdrop._linear.linear_map`): forward mode by the
    xla path's blockwise pass (:func:`_tangent`), reverse mode by the backward kernels (:func:`_transpose`).

    Inside ``shard_map`` on sharded operands, reverse mode only, as the xla path
    (:func:`jdrop.attention._kernel.attention`)."""
    args = (q, k, v, bias, mask, drop)
    if varying_axes(args):
        return reverse_only(_vjp_attention, spec, *args, where="inside jax.shard_map on sharded operands")
    return _every_mode(spec, *args)


def _with_residuals(spec: _Spec, q, k, v, bias, mask, drop):
    out, row_max, log_row_sum = _forward(spec, q, k, v, bias, mask, drop)
    return out, (q, k, v, bias, mask, drop, out, row_max, log_row_sum)


def _vjp_attention_bwd(spec: _Spec, residuals: tuple[Any, ...], d_out: jax.Array) -> tuple[Any, ...]:
    d_q, d_k, d_v, *d_bias = _transpose(spec, residuals, d_out)
    return d_q, d_k, d_v, d_bias[0] if d_bias else None, None, None


_vjp_attention = jax.custom_vjp(lambda spec, *args: _forward(spec, *args)[0], nondiff_argnums=(0,))
_vjp_attention.defvjp(_with_residuals, _vjp_attention_bwd)
_every_mode = jax.custom_jvp(lambda spec, *args: _forward(spec, *args)[0], nondiff_argnums=(0,))


@partial(_every_mode.defjvp, symbolic_zeros=True)
def _attention_jvp(spec: _Spec, primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[jax.Array, jax.Array]:
    q, k, v, bias, mask, drop = primals
    out, row_max, log_row_sum = _forward_rows(spec, q, k, v, bias, mask, drop)
    residuals = (q, k, v, bias, mask, drop, out, row_max, log_row_sum)
    # A bias held constant has no tangent leaf: neither pass computes its part.
    with_bias = bias is not None and not isinstance(tangents[3], SymbolicZero)
    live = tuple(tangents[:3]) + ((tangents[3],) if with_bias else ())
    apply = partial(_tangent, spec)
    return out, linear_map(apply, partial(_transpose, spec, bias_gradient=with_bias), residuals, live, out,
                           reference=jax.checkpoint(apply))


# ----------------------------------------------------------------------------------- entry point


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def vmem_estimate(block_q: int, block_k: int, depth: int, value_depth: int, itemsize: int,
                  extra_tile_bytes: int = 0) -> int:
    """Bytes of VMEM the largest of the TPU kernels (forward, dK/dV, dQ) takes for ``(block_q, block_k)`` tiles.

    Each kernel's blocks, double-buffered by the pipeline, plus its scratch and one live float32 ``(block_q,
    block_k)`` tile (the logits; the other tile temporaries live in vector registers or reuse it). Lanes pad to 128
    (head dims, the ``(block_q, 1)`` scratch columns), the lane-laid per-row residuals take 8 sublanes.
    ``extra_tile_bytes``: a bias or mask tile's bytes (double-buffered too). Validated against XLA:TPU's verdicts
    (``benchmarks/results/accelerator_tiles.json``): f32 forward 2048 x 2048 refused on v5e (19.46 MiB of 16),
    1024 x 1024 accepted.
    """
    d, dv = _round_up(depth, 128), _round_up(value_depth, 128)
    rows = 8 * block_q * 4  # a lane-laid per-row residual block
    q_side, k_side = block_q * (d + dv) * itemsize, block_k * (d + dv) * itemsize
    blocks = {
        "forward": (q_side + k_side + 2 * rows + extra_tile_bytes, 2 * block_q * 128 * 4 + block_q * dv * 4),
        "dkv": (q_side + 2 * k_side + 3 * rows + extra_tile_bytes, block_k * (d + dv) * 4),
        "dq": (q_side + k_side + block_q * d * itemsize + 3 * rows + extra_tile_bytes, block_q * d * 4),
    }
    return max(2 * pipelined + scratch for pipelined, scratch in blocks.values()) + block_q * block_k * 4


def _converts_factors(dropout_mask: str | None) -> bool:
    """Whether the kernels convert the float32 dropout-factor tile into the product's layout through shared memory
    (the threefry-based masks); hash8's few ops are recomputed in that layout instead, and no dropout has none."""
    return dropout_mask in ("exact", "fast16", "fast8")


_SMEM_MEASURED = {("exact", 2): (64, 128, 256), ("exact", 4): (64, 128, 256), ("fast16", 2): (128,),
                  ("fast8", 2): (128,), ("hash8", 2): (128,), (None, 2): (128,), (None, 4): (128,)}
"""``(dropout_mask, itemsize): head dims`` where the forward and dQ rules were measured (``hash8``: as without
dropout; float32's rules do not depend on the mask, and fast16's equal exact's)."""


def _row_kernel_smem(kernel: str, bq: int, bk: int, depth: int, value_depth: int, itemsize: int,
                     dropout_mask: str | None) -> tuple[int, bool]:
    """The forward and dQ kernels' shared memory without bias or mask tiles (see :func:`shared_memory_estimate`)."""
    warps = 4 if depth <= 64 else 8
    rows = min(bq, 16 * warps)  # rows of a tile one layout conversion moves at a time
    loaded = bq * depth * itemsize + (0 if kernel == "forward" else bq * value_depth * itemsize)  # q (and dO)
    key_side = bk * (depth + value_depth) * itemsize
    mode = "exact" if itemsize == 4 and dropout_mask is not None else dropout_mask
    if depth not in _SMEM_MEASURED.get((mode, itemsize), ()):
        return loaded + key_side, False  # the explicit buffers once: a lower bound
    if itemsize == 4:  # tf32 products read both operands K-major: the value (key) tile is transposed for bq >= 64
        transposed = (value_depth if kernel == "forward" else depth) if bq >= 64 else 0
        scratch = 4 * bk * (max(rows, transposed) if kernel == "forward" else transposed)
        return loaded + key_side + scratch, True
    stages = 2 if warps == 8 and bq == 64 else 1
    if bq >= 128:
        scratch = 4 * rows * bk * (2 if depth >= 256 or dropout_mask == "fast8" else 1)
    elif _converts_factors(dropout_mask):
        scratch = 4 * bq * bk if bq >= 64 or bk <= 4 * warps else 2 * bq * bk
    else:
        scratch = 0 if stages == 2 else 2 * bq * bk
    return loaded + stages * key_side + scratch, True


def shared_memory_estimate(kernel: str, block_q: int, block_k: int, depth: int, value_depth: int, itemsize: int,
                           dropout_mask: str | None = "exact", *, bias: bool = False,
                           mask: bool = False) -> tuple[int, bool]:
    """Bytes of shared memory Triton gives one of the GPU kernels on Hopper (sm_90), and whether that is exact.

    ``kernel``: ``"forward"``, ``"dq"``, ``"dkv"`` or ``"dbias"``; ``depth``/``value_depth``: the head dims as the
    kernels see them (padded to powers of 2, at least 16); ``itemsize``: the inputs' bytes per element;
    ``dropout_mask``: the mode, or None without dropout; ``bias``/``mask``: whether the kernels read those tiles.

    Triton's allocator gives a kernel the largest end offset of its buffers, of two kinds. *Explicit* buffers
    live through the loop over the other operand's tiles: the tiles a warp-group product (``wgmma``) reads from
    shared memory, staged by the software pipeline (``num_stages=2``) in ``n`` copies, and the tiles loaded once
    before the loop. *Scratch* buffers of the loop body share one region, as large as the largest of them: a
    layout conversion (of at most ``16 W`` rows at a time, ``W`` the warps: 4 for ``D <= 64``, else 8), a 16-bit
    probability tile a product reads from shared memory, a float32 operand transposed for tf32 (whose products
    read both operands K-major). With ``Q = bq D s``, ``dO = bq Dv s``, ``K = bk D s``, ``V = bk Dv s`` (``s`` the
    itemsize) and ``r = min(bq, 16 W)``:

    - forward ``Q + n (K + V) + scratch``, dQ ``Q + dO + n (K + V) + scratch``. 16-bit: ``n = 2`` at ``bq = 64``
      with 8 warps, else 1; scratch ``4 r bk`` for ``bq >= 128`` (twice that at ``D = 256`` and for fast8); below,
      the float32 dropout-factor tile's conversion ``4 bq bk`` (threefry masks, for ``bq = 64`` or ``bk <= 4 W``)
      or the probability tile ``2 bq bk`` (none when ``n = 2`` without a conversion). float32: ``n = 1``,
      scratch ``4 bk max(r, Dv)`` (forward) and ``4 bk D`` (dQ) for ``bq >= 64``, else ``4 r bk`` and 0;
    - dK/dV, whatever the dropout or bias: 16-bit ``K + V + n (Q + dO) + 3 (4 bq) + 4 bq bk`` (``n = 2`` for
      ``bq >= 64``; the three float32 per-row residuals; the conversion of the logit-sized tiles); float32
      ``K + V + 3 (4 bq) + max(Q + min(Q, 2048 W), 8 bq bk)``: the query tile with its transpose, done through
      ``2048 W`` bytes of scratch at a time, or the two float32 logit-sized tiles (``P~``, ``dS``) the
      products read;
    - a mask adds its int8 tile, ``bq bk``, to each kernel (16-bit); a bias its tile, ``s bq bk``, to the
      forward and dQ kernels where it is staged (16-bit ``bq >= 128``, float32 ``bq >= 64``, at head dim 128);
      with both, the larger of the two.

    Which buffers a kernel gets follows Triton's choices (how many pipeline copies, which tile it rematerializes
    in the product's layout rather than converting): the rules above are those the toolchain made over
    ``block_q, block_k`` in 16..256 at head dims 64, 128 and 256, 16-bit and float32 inputs, with and without
    dropout (``benchmarks/results/h100_shared_memory.json``), where the estimate is exact. Elsewhere it is a lower
    bound (``exact`` False), checked on every measured point: the forward and dQ kernels with a bias and a mask
    (their tiles share scratch by rules not modelled) or with a bias at another head dim than 128, a float32 mask
    (not measured), a head dim or dropout mode where the rules were not measured (the explicit buffers once) and
    the bias-gradient kernel (a query tile).

    Returns:
      ``(bytes, exact)``.

    Example:
      >>> shared_memory_estimate("dkv", 128, 128, 128, 128, 2)  # bfloat16, head dim 128: past H100's 232448
      (263680, True)
    """
    q_tile, k_tile, v_tile = (block_q * depth * itemsize, block_k * depth * itemsize,
                              block_k * value_depth * itemsize)
    mask_tile = block_q * block_k if mask else 0
    if kernel == "dbias":
        return q_tile, False
    if kernel == "dkv":
        residuals = 3 * 4 * block_q
        if depth not in (64, 128, 256):  # not measured: the key-side tiles, a query tile and the residuals
            return k_tile + v_tile + q_tile + residuals, False
        if itemsize == 4:  # query-side tiles transposed through scratch, 2048 W bytes at a time, or staged
            warps = 4 if depth <= 64 else 8
            query_side = max(q_tile + min(q_tile, 2048 * warps), 8 * block_q * block_k)
            return k_tile + v_tile + residuals + query_side, not mask
        stages = 2 if block_q >= 64 else 1
        do_tile = block_q * value_depth * itemsize
        need = k_tile + v_tile + stages * (q_tile + do_tile) + residuals + 4 * block_q * block_k + mask_tile
        return need, True
    if kernel not in ("forward", "dq"):
        raise ValueError(f"`kernel` must be 'forward', 'dq', 'dkv' or 'dbias', got {kernel!r}.")
    need, exact = _row_kernel_smem(kernel, block_q, block_k, depth, value_depth, itemsize, dropout_mask)
    if not bias:
        return need + (mask_tile if itemsize == 2 else 0), exact and not (mask and itemsize == 4)
    # A bias tile is staged for 16-bit bq >= 128 and float32 bq >= 64 (measured at head dim 128).
    staged = depth == 128 and block_q >= (64 if itemsize == 4 else 128)
    staged_bias = itemsize * block_q * block_k if staged else 0
    return need + max(staged_bias, mask_tile if itemsize == 2 else 0), exact and depth == 128 and not mask


def check_shared_memory(spec: _Spec, kernel: str, depth: int, value_depth: int, itemsize: int) -> None:
    """Raises ``ValueError`` naming ``block_q``/``block_k`` when a GPU kernel's tiles need more shared memory than
    the compile target's thread block can take (:data:`SHARED_MEMORY_BYTES`; :func:`shared_memory_estimate`), at
    trace time, before XLA:GPU compiles (and refuses) the kernel. Only where the estimate is exact or a lower
    bound above the limit: a tile the compiler takes is never refused."""
    limit = SHARED_MEMORY_BYTES.get(spec.target or "")
    if limit is None or spec.target is None:
        return
    need, exact = shared_memory_estimate(kernel, spec.block_q, spec.block_k, depth, value_depth, itemsize,
                                         spec.mask_mode if spec.has_dropout else None, bias=spec.has_bias,
                                         mask=spec.has_mask)
    if need > limit:
        raise ValueError(
            f"`block_q`={spec.block_q} and `block_k`={spec.block_k} need {'' if exact else 'at least '}{need} bytes "
            f"of shared memory in the {_KERNEL_NAMES[kernel]} kernel (head dims {depth}/{value_depth} as padded, "
            f"{itemsize}-byte inputs), more than the {limit} bytes a thread block can take on {spec.target.upper()}; "
            "pass smaller tiles (the defaults, None, fit).")


def check_vmem(target: str | None, block_q: int, block_k: int, depth: int, value_depth: int, itemsize: int,
               extra_tile_bytes: int = 0) -> None:
    """Raises ``ValueError`` naming ``block_q``/``block_k`` when the tiles' :func:`vmem_estimate` exceeds the TPU
    target's scoped VMEM (:data:`SCOPED_VMEM_BYTES`), before XLA:TPU compiles (and refuses) the kernels."""
    limit = SCOPED_VMEM_BYTES.get(target or "")
    need = vmem_estimate(block_q, block_k, depth, value_depth, itemsize, extra_tile_bytes)
    if limit is not None and need > limit:
        raise ValueError(
            f"`block_q`={block_q} and `block_k`={block_k} need about {need / 2**20:.1f} MiB of VMEM per kernel "
            f"(head dims {depth}/{value_depth}, {itemsize}-byte inputs), more than TPU {target}'s scoped "
            f"{limit / 2**20:.0f} MiB; pass smaller tiles (the defaults, None, fit).")


def target_platform() -> str:
    """The platform the kernels are traced for: the abstract mesh's device's (``jax.sharding.use_abstract_mesh``
    of a mesh of compile-only devices from ``jax.experimental.topologies``), else the default backend's."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    return abstract.platform if abstract is not None else jax.default_backend()


def compile_target() -> str | None:
    """The device the kernels compile for, as a key of :data:`TARGET_BLOCKS` (``"h100"``, ``"v4"``, ``"v5e"``,
    ``"v6e"``), or None: the abstract mesh's device (a compile-only target) or the default device."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    if abstract is not None:
        kind = abstract.device_kind
    else:
        kind = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else ""
    return next((name for marker, name in _TARGETS if marker in kind), None)


def tile_sizes(backend: str, q_length: int, k_length: int, block_q: int | None, block_k: int | None,
               mode: str = "exact", *, target: str | None = None, itemsize: int = 4) -> tuple[int, int]:
    """The ``(block_q, block_k)`` of a backend's kernels: the requested (checked) or default tiles, shrunk to fit.

    Defaults: :data:`TARGET_BLOCKS` for ``(target, itemsize)`` where it has them, else :data:`DEFAULT_BLOCKS`.

    TPU: ``block_q`` a multiple of 32 (the sublane tiling of int8 and 16-bit buffers), ``block_k`` of 128 (lanes);
    GPU: powers of 2 (Triton's tensors), at least 16 (its matrix units). Fast masks need ``block_q`` to be a
    multiple of their group block (32 rows for ``"fast16"`` and ``"hash8"``, 64 for ``"fast8"``).

    Raises:
      ValueError: naming ``block_q`` or ``block_k`` when a requested tile breaks its backend's rule.
    """
    default_q, default_k = TARGET_BLOCKS.get((target, itemsize), DEFAULT_BLOCKS[backend])
    span = _dropout_mask.group_rows(mode)
    q_unit, k_unit = (math.lcm(32, span), 128) if backend == "tpu" else (max(16, span), 16)
    for name, block, unit in (("block_q", block_q, q_unit), ("block_k", block_k, k_unit)):
        if block is None:
            continue
        if backend == "tpu":
            good, rule = block % unit == 0, f"a multiple of {unit}"
        else:
            good, rule = block & (block - 1) == 0, f"a power of 2, at least {unit}"
        if block < unit or not good:
            raise ValueError(f"`{name}` must be {rule} for the {backend} kernels (dropout_mask={mode!r}), got {block}.")
    bq = default_q if block_q is None else block_q
    bk = default_k if block_k is None else block_k
    if backend == "tpu":
        bq, bk = min(bq, _round_up(q_length, q_unit)), min(bk, _round_up(k_length, k_unit))
    else:
        bq = min(bq, max(q_unit, _next_power_of_2(q_length)))
        bk = min(bk, max(k_unit, _next_power_of_2(k_length)))
    return max(bq, q_unit), max(bk, k_unit)


_forced: list[tuple[str, bool]] = []


@contextlib.contextmanager
def kernels_for(backend: str, *, interpret: bool = True) -> Iterator[None]:
    """Within it, ``implementation="pallas"`` uses ``backend``'s kernels, by default under Pallas's interpreter.

    For tests and smoke runs on a CPU: ``interpret=True`` runs the kernels there (slowly: every grid step is a
    loop iteration of plain XLA ops); ``interpret=False`` lets a CPU lower them for their device (``jax.jit(f)
    .trace(...).lower(lowering_platforms=("tpu",))``). The choice is made when a function is traced: a function
    jitted inside keeps it.
    """
    check_backend(backend)
    _forced.append((backend, bool(interpret)))
    try:
        yield
    finally:
        _forced.pop()


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
    return backend


def check_interpret(interpret: Any) -> Any:
    """``interpret`` as :func:`jdrop.dot_product_attention` takes it: None, a bool or a ``pltpu.InterpretParams``."""
    if interpret is None or isinstance(interpret, (bool, np.bool_, pltpu.InterpretParams)):
        return bool(interpret) if isinstance(interpret, np.bool_) else interpret
    raise TypeError(f"`interpret` must be None, True, False or a jax.experimental.pallas.tpu.InterpretParams, got "
                    f"{type(interpret).__name__}: {interpret!r}.")


def resolve_backend(interpret: Any = None) -> tuple[str, Any]:
    """``(backend, interpret)`` of the kernels for :func:`jdrop.dot_product_attention`'s ``interpret``.

    None: those of :func:`kernels_for` within it, else those of :func:`target_platform` (the compile target's:
    a compile-only TPU or GPU device's, under ``jax.sharding.use_abstract_mesh`` of a mesh of it, which is how
    a CPU host compiles ``implementation="pallas"`` ahead of time for an accelerator; otherwise the default
    backend's), compiled. True: that platform's kernels (a CPU's: the TPU kernels), interpreted. A
    ``pltpu.InterpretParams``: the TPU kernels under the TPU interpreter. Within :func:`kernels_for`, its backend.

    Raises:
      ValueError: on a CPU, for compiled kernels outside :func:`kernels_for` (they need a TPU or a GPU), or for a
        ``pltpu.InterpretParams`` within ``kernels_for("gpu")``.
      TypeError: for an ``interpret`` of another type.
    """
    interpret = check_interpret(interpret)
    if _forced:
        backend, forced = _forced[-1]
        interpret = forced if interpret is None else interpret
    else:
        platform = target_platform()
        backend = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(platform, "")
        if not backend and not interpret:
            raise ValueError(
                f"implementation='pallas' needs a TPU (Mosaic kernels) or a GPU (Triton kernels); the target platform "
                f"is {platform!r}. Use implementation='xla' (or None, the default) here, interpret=True to run the "
                "kernels under Pallas's interpreter, or, to compile ahead of time for an accelerator from this host, "
                "trace under jax.sharding.use_abstract_mesh of a mesh of its compile-only devices "
                "(jax.experimental.topologies)."
            )
        backend = backend or "tpu"
    if isinstance(interpret, pltpu.InterpretParams):
        if backend == "gpu" and _forced:
            raise ValueError("`interpret`: a pltpu.InterpretParams runs the TPU kernels, not the GPU kernels that "
                             "kernels_for('gpu') asks for; pass interpret=True there.")
        backend = "tpu"
    return backend, bool(interpret) if interpret is None else interpret


def _fit_shared_memory(target: str, tiles: tuple[int, int], chosen: tuple[bool, bool], least: tuple[int, int],
                       widths: tuple[int, int], itemsize: int, options: dict[str, Any]) -> tuple[int, int]:
    """Default GPU tiles (those not ``chosen`` by the caller) halved, the larger first and none below ``least``,
    until every kernel's :func:`shared_memory_estimate` (with ``options``: the dropout mode, bias, mask) fits the
    target's :data:`SHARED_MEMORY_BYTES` (e.g. head dim 256 on H100)."""
    kernels = ("forward", "dq", "dkv", "dbias") if options["bias"] else ("forward", "dq", "dkv")
    bq, bk = tiles

    def need(bq: int, bk: int) -> int:
        return max(shared_memory_estimate(k, bq, bk, *widths, itemsize, options["mode"], bias=options["bias"],
                                          mask=options["mask"])[0] for k in kernels)

    while need(bq, bk) > SHARED_MEMORY_BYTES[target]:
        free = [(size, axis) for axis, (size, fixed, low) in enumerate(zip((bq, bk), chosen, least))
                if not fixed and size // 2 >= low]
        if not free:
            break  # the caller's tiles: check_shared_memory names them when a kernel is built
        axis = max(free)[1]
        bq, bk = (bq // 2, bk) if axis == 0 else (bq, bk // 2)
    return bq, bk


def _checked_tiles(backend: str, layout: Layout, block_q: int | None, block_k: int | None, mode: str, interpret: Any,
                   query: jax.Array, value: jax.Array, options: dict[str, Any]) -> tuple[int, int, str | None]:
    """``(block_q, block_k, target)``: :func:`tile_sizes` for the compile target (its defaults), checked against its
    VMEM on TPU (:func:`check_vmem`; bias/mask tiles counted at 4 bytes an element); on a GPU target with a
    shared-memory limit, default tiles shrunk to fit it (the caller's tiles are checked per kernel, as each is
    built: :func:`check_shared_memory`). ``options``: the dropout mode (None without dropout), bias, mask."""
    target = None if interpret is not False else compile_target()
    itemsize = query.dtype.itemsize
    bq, bk = tile_sizes(backend, layout.q_length, layout.k_length, block_q, block_k, mode, target=target,
                        itemsize=itemsize)
    if backend == "tpu":
        n_tiles = options["bias"] + options["mask"]
        check_vmem(target, bq, bk, query.shape[-1], value.shape[-1], itemsize, n_tiles * 4 * bq * bk)
    elif target in SHARED_MEMORY_BYTES:
        widths = (max(16, _next_power_of_2(query.shape[-1])), max(16, _next_power_of_2(value.shape[-1])))
        least = (max(16, _dropout_mask.group_rows(mode)), 16)  # tile_sizes' GPU units
        bq, bk = _fit_shared_memory(target, (bq, bk), (block_q is not None, block_k is not None), least, widths,
                                    itemsize, options)
    return bq, bk, target


def attention(
    layout: Layout,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None,
    mask: jax.Array | None,
    drop: Drop | None,
    *,
    dropout: DropoutMode,
    dropout_mask: str,
    precision: Any,
    is_causal: bool,
    block_q: int | None,
    block_k: int | None,
    backend: str,
    interpret: Any,
) -> jax.Array:
    """The Pallas path of :func:`jdrop.dot_product_attention` for checked inputs, ``(batch..., Tq, Hq, Dv)``.

    ``query`` ``(batch..., Tq, Hq, D)`` is already scaled by ``1/sqrt(D)``; ``key``/``value`` are
    ``(batch..., Tk, Hk, D | Dv)`` in its dtype; ``bias``/``mask`` (bool) broadcast to ``(batch..., Hq, Tq, Tk)``;
    ``drop`` holds the key data, the threshold of ``dropout_mask``'s test and the factor.

    Raises:
      ValueError: for float64 inputs, or tiles the backend's kernels cannot take.
    """
    if query.dtype == jnp.float64:
        raise ValueError("implementation='pallas' takes float16, bfloat16 and float32 inputs (TPUs have no float64, "
                         "and Triton's is far slower); use implementation='xla' for float64.")
    options = {"mode": None if dropout == DropoutMode.NONE else dropout_mask, "bias": bias is not None,
               "mask": mask is not None}
    bq, bk, target = _checked_tiles(backend, layout, block_q, block_k, dropout_mask, interpret, query, value, options)
    layout = layout._replace(block_q=bq, block_k=bk)
    batch, q_padded, k_padded = layout.batch, layout.n_q * bq, layout.n_k * bk
    # Triton's tiles are powers of 2 of at least 16 along every axis, the head dims included.
    width = (lambda d: d) if backend == "tpu" else (lambda d: max(16, _next_power_of_2(d)))

    def kernel_layout(x: jax.Array, length: int) -> jax.Array:  # (batch..., T, H, d) -> (B, H, T_pad, width)
        x = x.reshape(batch, *x.shape[-3:])
        return _pad_axis(_pad_axis(x, 1, length), 3, width(x.shape[-1])).transpose(0, 2, 1, 3)

    q, k, v = kernel_layout(query, q_padded), kernel_layout(key, k_padded), kernel_layout(value, k_padded)
    bias = None if bias is None else layout.internal(bias)
    if mask is not None:
        # Mosaic has no bool buffers: int32 on TPU, int8 (a quarter of the traffic) on GPU.
        mask = layout.internal(mask).astype(jnp.int32 if backend == "tpu" else jnp.int8)
    per_element = dropout == DropoutMode.PER_ELEMENT
    spec = _Spec(
        q_length=layout.q_length,
        k_length=layout.k_length,
        block_q=bq,
        block_k=bk,
        q_heads=layout.q_heads,
        group=layout.group,
        causal=is_causal,
        skip_causal=is_causal and mask is None,
        dropout=dropout,
        mask_mode=dropout_mask,
        mask_rows=(batch * layout.q_heads if per_element else 1) * layout.q_length,
        bias_full=() if bias is None else tuple(d > 1 for d in bias.shape),
        mask_full=() if mask is None else tuple(d > 1 for d in mask.shape),
        precision=precision,
        backend=backend,
        interpret=interpret,
        target=target,
    )
    kernel_drop = None
    if drop is not None:
        key_data, threshold, factor = drop
        kernel_drop = ((key_data[0], key_data[1]), threshold, factor)
    out = _attention(spec, q, k, v, bias, mask, kernel_drop)[:, :, : layout.q_length, : value.shape[-1]]
    return out.transpose(0, 2, 1, 3).reshape(*layout.batch_shape, layout.q_length, layout.q_heads, value.shape[-1])
