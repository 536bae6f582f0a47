"""Tests of the Pallas kernels of jdrop.dot_product_attention, on CPU.

Both backends' kernels (the Mosaic shell for TPU, the Triton shell for GPU) run under Pallas's ``interpret=True``
and are compared with the xla path: the dropout masks exactly (value = identity makes each output row the dropped
probabilities, so its zeros are the dropped entries), outputs and gradients to a tolerance derived from a float64
reference. Then the non-interpreted kernels are lowered for ``tpu`` and ``cuda`` over a matrix of shapes and dtypes,
so that a block shape, dtype or op that Pallas's Mosaic or Triton lowering refuses fails here.
"""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import qkv_input, value_and_grads

import jdrop
from jdrop import masks
from jdrop.attention import _dropout_mask, _pallas

RNG = jax.random.key(7)
BACKENDS = _pallas.BACKENDS
XLA_BLOCKS = {"block_q": 8, "block_k": 16}


def _pallas_fn(backend, **options):
    """``jdrop.dot_product_attention(..., implementation="pallas")`` with ``backend``'s kernels, interpreted.

    Call it under ``jax.jit``: the interpreter is chosen when the function is traced, inside the context.
    """

    def attend(*args, **kwargs):
        with _pallas.kernels_for(backend):
            return jdrop.dot_product_attention(*args, implementation="pallas", **options, **kwargs)

    return attend


def _errors(actual, reference):
    """Per leaf, ``max |actual - reference| / max(1, max |reference|)`` in float64."""
    errors = []
    for a, r in zip(jax.tree.leaves(actual), jax.tree.leaves(reference)):
        a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
        errors.append(float(np.max(np.abs(a - r)) / max(1.0, float(np.max(np.abs(r))))))
    return np.asarray(errors)


# ------------------------------------------------------------------------------------- the mask, exactly


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_draw_flax_mask_exactly(backend):
    # value = identity: query t's output row is its dropped probabilities, so zeros = dropped entries.
    q_length, k_length, heads, kv_heads = 45, 33, 4, 2  # odd lengths, grouped queries
    q, k, _ = qkv_input(batch=2, q_length=q_length, k_length=k_length, heads=heads, kv_heads=kv_heads)
    v = jnp.broadcast_to(jnp.eye(k_length)[None, :, None, :], (2, k_length, kv_heads, k_length))
    for broadcast in (False, True):
        options = {"dropout_rng": RNG, "dropout_rate": 0.5, "broadcast_dropout": broadcast}
        out = jax.jit(_pallas_fn(backend, **options))(q, k, v)
        shape = (1, 1, q_length, k_length) if broadcast else (2, heads, q_length, k_length)
        keep = np.broadcast_to(jax.random.bernoulli(RNG, 0.5, shape), (2, heads, q_length, k_length))
        np.testing.assert_array_equal(np.asarray(out).transpose(0, 2, 1, 3) != 0, keep)


def _whole_mask(mode, rate, heads, q_length, k_length, rows=None):
    """The mask of ``(heads, q_length, k_length)`` per-head dropout drawn as one tile per head (``rows`` rows)."""
    key_data, threshold, factor = _dropout_mask.operands(RNG, rate, jnp.float32, mode)
    rows = q_length if rows is None else rows

    @jax.jit
    def draw(key_data, threshold):
        first = _dropout_mask.first_rows(rows, mode).astype(jnp.uint32)
        head_row = (jnp.arange(heads, dtype=jnp.uint32) * np.uint32(q_length))[:, None, None]
        cols = jnp.arange(k_length, dtype=jnp.uint32)[None, :]
        return _dropout_mask.tile_keep_at(key_data, head_row + first, cols, k_length, heads * q_length, threshold,
                                          mode)

    bits = _dropout_mask.bits(mode)
    keep = float(np.ceil(np.float32(1 - rate) * 2**bits) / 2**bits)
    np.testing.assert_allclose(factor, np.float32(1 / keep), rtol=1e-7)  # inverted scaling by the realised keep
    return np.asarray(draw(key_data, threshold))[:, :q_length], keep


@pytest.mark.parametrize("mode", ["fast16", "fast8"])
def test_fast_mask_realised_rate_and_independence_within_groups(mode):
    bits, n = _dropout_mask.bits(mode), _dropout_mask.group_size(mode)
    span = _dropout_mask.group_rows(mode)
    rate = 0.3
    keep_mask, keep = _whole_mask(mode, rate, heads=4, q_length=8 * span, k_length=2048)
    assert keep == np.ceil((1 - rate) * 2**bits) / 2**bits  # the documented realised keep probability
    total = keep_mask.size
    # Rate: 5 binomial standard errors, 5 sqrt(p (1 - p) / N) (N = 2**20 elements: 2.2e-3, below fast8's
    # 3.1e-3 distance from 1 - rate, so the test tells the realised probability from the nominal one).
    assert abs(keep_mask.mean() - keep) <= 5 * np.sqrt(keep * (1 - keep) / total)
    # Group members (rows 8 apart in a block of `span` rows, one threefry call): every pair kept together with
    # probability p**2, within 5 sqrt(p**2 (1 - p**2) / groups).
    members = keep_mask.reshape(4, -1, n, _dropout_mask.SUBLANES, 2048)
    groups = total // n
    for a in range(n):
        for b in range(a + 1, n):
            both = (members[:, :, a] & members[:, :, b]).mean()
            assert abs(both - keep**2) <= 5 * np.sqrt(keep**2 * (1 - keep**2) / groups), (a, b)
    # Neighbours in a row belong to different groups (different counters).
    both = (keep_mask[..., :-1] & keep_mask[..., 1:]).mean()
    assert abs(both - keep**2) <= 5 * np.sqrt(keep**2 * (1 - keep**2) / keep_mask[..., 1:].size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_masks_are_the_same_for_every_tiling_in_both_paths(backend):
    # value = identity, per-head dropout, odd lengths: the kernels' fast mask, the xla path's (other tiles) and
    # the mask drawn as one tile per head are one mask.
    q_length, k_length, heads = 70, 33, 2
    q, k, _ = qkv_input(batch=1, q_length=q_length, k_length=k_length, heads=heads)
    v = jnp.broadcast_to(jnp.eye(k_length)[None, :, None, :], (1, k_length, heads, k_length))
    for mode in ("fast16", "fast8", "hash8"):
        options = {"dropout_rng": RNG, "dropout_rate": 0.5, "broadcast_dropout": False, "dropout_mask": mode}
        kernel = jax.jit(_pallas_fn(backend, **options))(q, k, v)
        xla = jax.jit(partial(jdrop.dot_product_attention, **options, **XLA_BLOCKS))(q, k, v)
        span = _dropout_mask.group_rows(mode)
        whole, _ = _whole_mask(mode, 0.5, heads, q_length, k_length, rows=-(-q_length // span) * span)
        np.testing.assert_array_equal(np.asarray(kernel)[0].transpose(1, 0, 2) != 0, whole)
        np.testing.assert_array_equal(np.asarray(xla)[0].transpose(1, 0, 2) != 0, whole)


# ------------------------------------------------------------------------------------- against float64


def _naive(q, k, v, bias, allowed, keep, keep_probability):
    """Attention by its formula: softmax(q k^T / sqrt(D) + bias, masked) * keep / keep_probability, then v."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k)
    if bias is not None:
        logits = logits + bias
    if allowed is not None:
        logits = jnp.where(allowed, logits, np.finfo(np.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if keep is not None:
        weights = weights * keep / keep_probability
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


CASES = {
    # per-head dropout, causal (tiles above the diagonal skipped, key tiles past every query), grouped queries,
    # odd lengths
    "causal-gqa-per-head": ({"q_length": 45, "k_length": 300, "kv_heads": 2},
                            {"is_causal": True, "broadcast_dropout": False}, False, False),
    # broadcast dropout, a per-head bias (differentiated), a padding mask with a fully masked row
    "bias-mask-broadcast": ({"q_length": 37, "k_length": 45}, {"broadcast_dropout": True}, True, True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_match_float64_reference(backend, case):
    shapes, options, with_bias, with_mask = CASES[case]
    q, k, v = qkv_input(**shapes)
    batch, q_length, heads = q.shape[:3]
    k_length = k.shape[1]
    rng = np.random.default_rng(3)
    bias = jnp.asarray(rng.standard_normal((heads, q_length, k_length)), jnp.float32) if with_bias else None
    mask = None
    if with_mask:
        lengths = np.asarray([k_length, 20])
        mask = (np.arange(k_length) < lengths[:, None])[:, None, None, :] & np.ones((q_length, 1), bool)
        mask[:, :, 3] = False  # a fully masked row: uniform, as in flax
        mask = jnp.asarray(mask)
    rate = 0.3
    options = {**options, "dropout_rng": RNG, "dropout_rate": rate}
    args = (q, k, v) if bias is None else (q, k, v, bias)

    def call(fn):
        def attend(q, k, v, bias=None):
            return fn(q, k, v, bias=bias, mask=mask, **options)
        return value_and_grads(attend, *args)

    pallas = call(_pallas_fn(backend))
    xla = call(partial(jdrop.dot_product_attention, **XLA_BLOCKS))
    shape = (1, 1, q_length, k_length) if options["broadcast_dropout"] else (batch, heads, q_length, k_length)
    keep = np.asarray(jax.random.bernoulli(RNG, np.float32(1 - rate), shape))
    keep_probability = float(masks.realised_keep(masks.keep_threshold(jnp.float32(1 - rate))))
    allowed = None if mask is None else np.asarray(mask)
    if options.get("is_causal"):
        allowed = np.tril(np.ones((q_length, k_length), bool))
    with jax.enable_x64(True):
        wide = [jnp.asarray(np.asarray(x), jnp.float64) for x in args]

        def naive(q, k, v, bias=None):
            return _naive(q, k, v, bias, allowed, keep, keep_probability)

        reference = value_and_grads(naive, *wide)
        reference = jax.tree.map(np.asarray, reference)
    xla_error, pallas_error = _errors(xla, reference), _errors(pallas, reference)
    # The kernels round differently from the xla path (e.g. P * factors vs exp(S - L + log factors)), not worse:
    # within 4x the xla path's float32 error (1-2e-7 here, a few ulps), floored at float32's eps.
    np.testing.assert_array_less(pallas_error, 4 * np.maximum(xla_error, np.finfo(np.float32).eps))
    np.testing.assert_array_equal(np.asarray(pallas[0]) == 0, np.asarray(xla[0]) == 0)


# ------------------------------------------------------------------------------------- rates


@pytest.mark.parametrize("backend", BACKENDS)
def test_traced_rate_compiles_once_rate_zero_is_no_dropout_rate_one_gives_zeros(backend):
    q, k, v = qkv_input(q_length=21, k_length=19, heads=2)
    chex.clear_trace_counter()  # parametrized: the same function once per backend

    @jax.jit
    @chex.assert_max_traces(n=1)
    def attend(rate):
        return value_and_grads(_pallas_fn(backend, dropout_rng=RNG, dropout_rate=rate), q, k, v)

    plain = jax.jit(_pallas_fn(backend))(q, k, v)
    np.testing.assert_allclose(attend(0.0)[0], plain, rtol=0, atol=1e-6)
    exact = jax.jit(partial(jdrop.dot_product_attention, dropout_rng=RNG, dropout_rate=0.3, **XLA_BLOCKS))(q, k, v)
    np.testing.assert_allclose(attend(0.3)[0], exact, rtol=0, atol=2e-6)
    out, grads = attend(1.0)
    np.testing.assert_array_equal(out, 0.0)
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)
    assert np.all(np.isnan(attend(1.5)[0]))


# ------------------------------------------------------------------------------------- lowering for the devices


LOWERING_CASES = {
    # name: (q_length, k_length, heads, kv_heads, options)
    "odd-lengths": (300, 257, 4, 4, {"dropout_rate": 0.1}),
    "causal-gqa-per-head": (256, 256, 4, 2, {"dropout_rate": 0.1, "is_causal": True, "broadcast_dropout": False}),
    "bias-mask": (200, 130, 2, 1, {"dropout_rate": 0.1, "bias": True, "mask": True}),
    "no-dropout": (128, 384, 2, 2, {}),
    "fast16-causal-per-head": (256, 200, 4, 2, {"dropout_rate": 0.1, "is_causal": True, "broadcast_dropout": False,
                                                "dropout_mask": "fast16"}),
    "fast8": (300, 257, 2, 2, {"dropout_rate": 0.1, "dropout_mask": "fast8"}),
    "hash8-causal-per-head": (256, 200, 4, 2, {"dropout_rate": 0.1, "is_causal": True, "broadcast_dropout": False,
                                               "dropout_mask": "hash8"}),
    "hash8": (300, 257, 2, 2, {"dropout_rate": 0.1, "dropout_mask": "hash8"}),
}


def _lowered(platform, dtype, depth, case, argnums=None):
    q_length, k_length, heads, kv_heads, options = LOWERING_CASES[case]
    options = dict(options)
    with_bias, with_mask = options.pop("bias", False), options.pop("mask", False)
    backend = "tpu" if platform == "tpu" else "gpu"
    args = [jax.ShapeDtypeStruct((2, q_length, heads, depth), dtype),
            jax.ShapeDtypeStruct((2, k_length, kv_heads, depth), dtype),
            jax.ShapeDtypeStruct((2, k_length, kv_heads, depth), dtype)]
    if with_bias:
        args.append(jax.ShapeDtypeStruct((1, heads, q_length, k_length), jnp.float32))
    mask = jnp.ones((2, 1, 1, k_length), bool) if with_mask else None

    def loss(q, k, v, bias=None):
        with _pallas.kernels_for(backend, interpret=False):
            out = jdrop.dot_product_attention(q, k, v, bias, mask, dropout_rng=RNG, implementation="pallas",
                                              **options)
        return jnp.sum(out.astype(jnp.float32))

    argnums = tuple(range(len(args))) if argnums is None else argnums
    return jax.jit(jax.grad(loss, argnums=argnums)).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _kernel_calls(text):
    return sum(text.count(f"stablehlo.custom_call @{target}") for target in ("tpu_custom_call", "__gpu$xla.gpu.triton"))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("depth", [64, 128])
def test_kernels_lower_for_tpu_and_cuda(platform, dtype, depth):
    for case in LOWERING_CASES:
        text = _lowered(platform, dtype, depth, case)
        # forward, dK/dV, dQ (and dbias with a bias): every kernel became a Mosaic or Triton call.
        assert _kernel_calls(text) == 3 + LOWERING_CASES[case][4].get("bias", False), case


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_bias_gradient_kernel_runs_only_when_that_gradient_is_used(platform):
    # A bias held constant has no tangent, so the backward pass leaves the dbias kernel out of the program (no
    # (B, H, Tq, Tk) buffer for a constant bias); differentiated, the bias gets it.
    unused = _lowered(platform, jnp.bfloat16, 64, "bias-mask", argnums=(0, 1, 2))
    assert "jdrop_attention_dbias" not in unused
    assert _kernel_calls(unused) == 3
    used = _lowered(platform, jnp.bfloat16, 64, "bias-mask", argnums=(0, 1, 2, 3))
    [line] = [line for line in used.splitlines() if "jdrop_attention_dbias" in line]
    assert "has_side_effect" not in line


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_vmapped_kernels_lower(platform):
    # Per-example keys under vmap: the batched dropout scalars keep block shapes Mosaic accepts.
    q, k, v = qkv_input(q_length=64, k_length=64, heads=2, depth=64)
    keys = jax.random.split(RNG, 2)

    def loss(q, k, v, rng):
        with _pallas.kernels_for("tpu" if platform == "tpu" else "gpu", interpret=False):
            out = jdrop.dot_product_attention(q, k, v, dropout_rng=rng, dropout_rate=0.1, implementation="pallas")
        return jnp.sum(out)

    step = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))
    assert _kernel_calls(step.trace(q, k, v, keys).lower(lowering_platforms=(platform,)).as_text()) == 3


def test_vmap_over_keys_equals_one_call_per_example():
    q, k, v = qkv_input(q_length=21, k_length=19, heads=2)
    keys = jax.random.split(RNG, 2)
    attend = _pallas_fn("gpu", dropout_rate=0.3, broadcast_dropout=False)
    batched = jax.jit(jax.vmap(lambda q, k, v, r: attend(q, k, v, dropout_rng=r)))(q, k, v, keys)
    single = jax.jit(partial(jdrop.dot_product_attention, dropout_rate=0.3, broadcast_dropout=False))
    for i in range(2):
        np.testing.assert_allclose(batched[i], single(q[i], k[i], v[i], dropout_rng=keys[i]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- bad input


def test_bad_implementation_mask_mode_and_tiles_raise_clear_errors(x64):
    q, k, v = qkv_input(batch=1, q_length=4, k_length=4, heads=1)
    with pytest.raises(ValueError, match="`implementation` must be one of"):
        jdrop.dot_product_attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match="`dropout_mask` must be one of"):
        jdrop.dot_product_attention(q, k, v, dropout_mask="fast4")
    with pytest.raises(ValueError, match="needs a TPU .* or a GPU"):
        jdrop.dot_product_attention(q, k, v, implementation="pallas")  # this machine is a CPU
    with _pallas.kernels_for("gpu"), pytest.raises(ValueError, match="`block_q` must be a power of 2"):
        jdrop.dot_product_attention(q, k, v, implementation="pallas", block_q=48)
    with _pallas.kernels_for("tpu"), pytest.raises(ValueError, match="`block_k` must be a multiple of 128"):
        jdrop.dot_product_attention(q, k, v, implementation="pallas", block_k=64)
    with _pallas.kernels_for("gpu"), pytest.raises(ValueError, match="`block_q` must be a power of 2, at least 64"):
        jdrop.dot_product_attention(q, k, v, implementation="pallas", block_q=32, dropout_mask="fast8")
    with _pallas.kernels_for("gpu"), pytest.raises(ValueError, match="float64"):
        jdrop.dot_product_attention(q.astype(jnp.float64), k, v, implementation="pallas")
    with pytest.raises(ValueError, match="`backend` must be one of"), _pallas.kernels_for("cpu"):
        pass
