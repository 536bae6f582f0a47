"""The Pallas kernels' public debugging mode and cost estimates, on CPU.

``interpret=`` of :func:`jdrop.dot_product_attention` runs the kernels under Pallas's interpreters: a few small
cases run under the TPU interpreter with its race detector (two simulated cores, NaN-filled fresh memory,
out-of-bounds reads raising) and must report no race and agree with the xla path. Every ``pallas_call`` carries a
``pl.CostEstimate``; its numbers are checked against a count by hand for a small problem, the causal tile count
against a brute-force count of the tiles that hold a visible logit, and the mask's integer ops against the
threefry the kernels run.
"""

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import pallas_calls, qkv_input, value_and_grads
from jax.experimental.pallas import tpu as pltpu

import jdrop
from jdrop import masks
from jdrop.attention import _dropout_mask, _pallas

RNG = jax.random.key(11)
RACE_CHECKING = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, uninitialized_memory="nan",
                                      out_of_bounds_reads="raise")

# ------------------------------------------------------------------------------------- interpret=


INTERPRETER_CASES = {
    # causal, per-head exact dropout, several query and key tiles (tiles above the diagonal skipped)
    "causal-per-head": ({"batch": 1, "q_length": 256, "k_length": 256, "heads": 1, "depth": 16},
                        {"is_causal": True, "broadcast_dropout": False, "block_q": 128, "block_k": 128}, False),
    # grouped queries, a differentiated bias, a padding mask, padded lengths, broadcast fast16 dropout
    "gqa-bias-mask-fast16": ({"batch": 2, "q_length": 64, "k_length": 200, "heads": 2, "kv_heads": 1, "depth": 16},
                             {"broadcast_dropout": True, "dropout_mask": "fast16", "block_q": 32}, True),
}


def _float32_bound(reference, n_terms):
    """A float32 sum of ``n_terms`` products, by two orders of summation, differs by at most ``2 n eps max|x|``
    (Higham's ``gamma_n`` bound, for each order), with ``max|x|`` the leaf's largest magnitude (at least 1)."""
    return 2 * n_terms * np.finfo(np.float32).eps * max(1.0, float(np.max(np.abs(np.asarray(reference)))))


@pytest.mark.parametrize("case", list(INTERPRETER_CASES))
def test_tpu_interpreter_with_race_detection_matches_xla_path(case, capfd):
    shapes, options, with_mask_and_bias = INTERPRETER_CASES[case]
    q, k, v = qkv_input(**shapes)
    batch, q_length, heads = q.shape[:3]
    k_length = k.shape[1]
    bias = mask = None
    if with_mask_and_bias:
        bias = jnp.asarray(np.random.default_rng(2).standard_normal((heads, q_length, k_length)), jnp.float32)
        mask = jnp.asarray(np.arange(k_length) < np.asarray([k_length, 150])[:, None])[:, None, None, :]
    options = {**options, "dropout_rng": RNG, "dropout_rate": 0.25}
    args = (q, k, v) if bias is None else (q, k, v, bias)

    def call(**extra):
        def attend(q, k, v, bias=None):
            return jdrop.dot_product_attention(q, k, v, bias, mask, **options, **extra)
        return value_and_grads(attend, *args)

    pallas = call(implementation="pallas", interpret=RACE_CHECKING)
    captured = capfd.readouterr()
    assert "RACE DETECTED" not in captured.out + captured.err  # the detector prints each race it finds
    xla = call(implementation="xla")
    # The dropout masks are one mask (flax's: fast16 in both paths), so the zeros of the outputs coincide.
    np.testing.assert_array_equal(np.asarray(pallas[0]) == 0, np.asarray(xla[0]) == 0)
    terms = max(q_length, k_length) * shapes["depth"]
    for got, want in zip(jax.tree.leaves(pallas), jax.tree.leaves(xla)):
        assert not np.any(np.isnan(np.asarray(got)))  # no NaN-filled (uninitialized) memory was read into a result
        np.testing.assert_allclose(got, want, rtol=0, atol=_float32_bound(want, terms))


def test_interpret_true_runs_kernels_on_cpu_and_interpret_checks():
    q, k, v = qkv_input(batch=1, q_length=40, k_length=72, heads=2)
    options = {"dropout_rng": RNG, "dropout_rate": 0.3, "is_causal": True}
    xla = jax.jit(partial(jdrop.dot_product_attention, **options))(q, k, v)
    pallas = jax.jit(partial(jdrop.dot_product_attention, implementation="pallas", interpret=True, **options))(q, k, v)
    np.testing.assert_array_equal(np.asarray(pallas) == 0, np.asarray(xla) == 0)
    np.testing.assert_allclose(pallas, xla, rtol=0, atol=_float32_bound(xla, 72 * 8))
    if jax.default_backend() == "cpu":
        for compiled in (None, False):
            with pytest.raises(ValueError, match="interpret=True"):
                jdrop.dot_product_attention(q, k, v, implementation="pallas", interpret=compiled)
    with pytest.raises(ValueError, match="`interpret` applies to implementation='pallas' only"):
        jdrop.dot_product_attention(q, k, v, interpret=True)
    with pytest.raises(TypeError, match="`interpret` must be None, True, False or"):
        jdrop.dot_product_attention(q, k, v, implementation="pallas", interpret="yes")
    assert _pallas.resolve_backend(RACE_CHECKING) == ("tpu", RACE_CHECKING)
    with _pallas.kernels_for("gpu"):
        assert _pallas.resolve_backend(True) == ("gpu", True)
        with pytest.raises(ValueError, match="runs the TPU kernels"):
            _pallas.resolve_backend(RACE_CHECKING)


# ------------------------------------------------------------------------------------- cost estimates


def _estimates(backend, shape, dtype, **options):
    q = jax.ShapeDtypeStruct(shape, dtype)
    bias = jax.ShapeDtypeStruct((1, shape[2], shape[1], shape[1]), jnp.float32)

    def loss(q, k, v, bias):
        out = jdrop.dot_product_attention(q, k, v, bias, dropout_rng=RNG, implementation="pallas", **options)
        return jnp.sum(out.astype(jnp.float32))

    with _pallas.kernels_for(backend, interpret=False):
        jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, q, q, bias)
    return pallas_calls(jaxpr.jaxpr)


@pytest.mark.parametrize("backend", _pallas.BACKENDS)
def test_every_pallas_call_has_the_hand_counted_cost(backend):
    # B = H = 1, T = 256, D = Dv = 128 (no padding on either backend), float32, causal, exact dropout, a full
    # (1, 1, T, T) float32 bias, tiles 128 x 128: of the 2 x 2 tiles, 3 are on or below the diagonal.
    calls = _estimates(backend, (1, 256, 1, 128), jnp.float32, is_causal=True, dropout_rate=0.1, block_q=128,
                       block_k=128)
    assert set(calls) == {"jdrop_attention_forward", "jdrop_attention_dkv", "jdrop_attention_dq",
                          "jdrop_attention_dbias"}
    logits = 3 * 128 * 128
    mask_ops = 117 + 2 + 4  # per logit: one threefry call, its counter, then xor, shift, compare, select
    per_logit = {  # softmax ops + bias add + causal compare/select + the multiply by the factors
        "jdrop_attention_forward": 3 + 1 + 2 + 1, "jdrop_attention_dkv": 5 + 1 + 2 + 1,
        "jdrop_attention_dq": 5 + 1 + 2 + 1, "jdrop_attention_dbias": 5 + 1 + 2 + 1}
    products = {  # float flops per logit of the tile products (2 per multiply-add, D = Dv = 128)
        "jdrop_attention_forward": 2 * 2 * 128, "jdrop_attention_dkv": 2 * 4 * 128, "jdrop_attention_dq": 2 * 3 * 128,
        "jdrop_attention_dbias": 2 * 2 * 128}
    tile, row_block = 128 * 128 * 4, 128 * 256 * 4  # a float32 bias tile; a (128, D + Dv) float32 q|dO or k|v block
    moved = {
        # per query tile: q in, out and 2 residual rows out; per visited tile: k|v and the bias tile
        "jdrop_attention_forward": 2 * (row_block + 2 * 128 * 4) + 3 * (row_block + tile),
        # per visited tile: q|dO, 3 residual rows and the bias tile; per key tile: k|v in and dk|dv out
        "jdrop_attention_dkv": 3 * (row_block + 3 * 128 * 4 + tile) + 2 * 2 * row_block,
        # per query tile: q|dO, 3 residual rows, dq out (128 x 128); per visited tile: k|v and the bias tile
        "jdrop_attention_dq": 2 * (row_block + 3 * 128 * 4 + 128 * 128 * 4) + 3 * (row_block + tile),
        # per visited tile: q|dO, k|v, 3 residual rows, the bias tile; every dS tile out
        "jdrop_attention_dbias": 3 * (2 * row_block + 3 * 128 * 4 + tile) + 4 * tile}
    for name, cost in calls.items():
        assert cost.flops == logits * (products[name] + per_logit[name] + mask_ops), name
        rows = 256 if name == "jdrop_attention_forward" else 0  # the forward pass's log per row
        corrections = 3 * 128 if name == "jdrop_attention_forward" else 0  # its running max's exp, per visited tile
        assert cost.transcendentals == logits + corrections + rows, name
        assert cost.bytes_accessed == moved[name], name


def test_cost_scales_with_the_mask_and_the_dtype():
    base = _estimates("tpu", (2, 512, 2, 64), jnp.bfloat16, dropout_rate=0.1)["jdrop_attention_dq"]
    fast8 = _estimates("tpu", (2, 512, 2, 64), jnp.bfloat16, dropout_rate=0.1,
                       dropout_mask="fast8")["jdrop_attention_dq"]
    plain = _estimates("tpu", (2, 512, 2, 64), jnp.bfloat16)["jdrop_attention_dq"]
    logits = 2 * 2 * 512 * 512
    assert base.flops - plain.flops == logits * (1 + 117 + 2 + 4)  # exact mask: a threefry call per logit
    assert fast8.flops - plain.flops == logits * (1 + 5) + logits // 8 * (117 + 2)  # one per group of 8
    assert base.bytes_accessed == plain.bytes_accessed  # the dropout scalars are not counted


def test_visited_tiles_is_the_count_of_tiles_holding_a_visible_logit():
    for block_q, block_k, length in ((32, 128, 256), (128, 128, 384), (256, 128, 512), (64, 256, 512)):
        spec = _pallas._Spec(length, length, block_q, block_k, 1, 1, True, True, _pallas.DropoutMode.NONE, "exact",
                             length, (), (), None, "tpu", False)
        n_q, n_k = length // block_q, length // block_k
        rows, cols = np.arange(length)[:, None], np.arange(length)[None, :]
        visible = (cols <= rows).reshape(n_q, block_q, n_k, block_k).any(axis=(1, 3))
        assert _pallas.visited_tiles(spec, n_q, n_k) == visible.sum()
        full = spec._replace(skip_causal=False)
        assert _pallas.visited_tiles(full, n_q, n_k) == n_q * n_k


def test_threefry_op_count_is_the_kernels_threefry():
    # THREEFRY_OPS counts the elementwise uint32 ops of one call (the key schedule's 2 xors are per tile).
    words = jnp.zeros((4,), jnp.uint32)
    jaxpr = jax.make_jaxpr(masks.threefry2x32)(jnp.uint32(1), jnp.uint32(2), words, words)
    assert sum(eqn.outvars[0].aval.shape == (4,) for eqn in jaxpr.jaxpr.eqns) == _dropout_mask.THREEFRY_OPS


# ------------------------------------------------------------------------------------- default tiles per target


def test_default_tiles_per_target_follow_the_tile_rules():
    assert _pallas.compile_target() is None  # a CPU: no accelerator target
    assert _pallas.tile_sizes("gpu", 4096, 4096, None, None, target=None, itemsize=2) == _pallas.DEFAULT_BLOCKS["gpu"]
    for (target, itemsize), blocks in _pallas.TARGET_BLOCKS.items():
        backend = "gpu" if target == "h100" else "tpu"
        assert _pallas.tile_sizes(backend, 8192, 8192, None, None, target=target, itemsize=itemsize) == blocks
        assert _pallas.tile_sizes(backend, 8192, 8192, *blocks) == blocks  # tiles the backend's rules accept
        # short sequences shrink the defaults as before
        assert _pallas.tile_sizes(backend, 40, 40, None, None, target=target, itemsize=itemsize) <= blocks


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "accelerator_tiles.json"


def test_vmem_check_names_the_tiles_before_the_compiler():
    with pytest.raises(ValueError, match=r"`block_q`=2048 and `block_k`=2048 need about .* MiB of VMEM .* v5e"):
        _pallas.check_vmem("v5e", 2048, 2048, 128, 128, 4)
    _pallas.check_vmem("v5e", 1024, 1024, 128, 128, 4)  # accepted by XLA:TPU (see the results)
    _pallas.check_vmem(None, 4096, 4096, 128, 128, 4)  # no TPU target known: the compiler judges
    for (target, itemsize), blocks in _pallas.TARGET_BLOCKS.items():
        if target in _pallas.SCOPED_VMEM_BYTES:
            _pallas.check_vmem(target, *blocks, 256, 256, itemsize, 4 * blocks[0] * blocks[1])


def test_vmem_estimate_agrees_with_the_tpu_compilers_verdicts():
    # The tiles XLA:TPU compiled or refused (without jdrop's check), recorded by benchmarks.accelerator_tiles.
    verdicts = [r for r in json.loads(RESULTS.read_text())["results"]
                if r["case"]["target"] in _pallas.SCOPED_VMEM_BYTES and (r["ok"] or r["error"] == "VmemOom")]
    assert any(not r["ok"] for r in verdicts) and any(r["ok"] for r in verdicts)
    for result in verdicts:
        case = result["case"]
        bq, bk = case["block_q"], case["block_k"]
        need = _pallas.vmem_estimate(bq, bk, case["depth"], case["depth"], np.dtype(case["dtype"]).itemsize)
        fits = need <= _pallas.SCOPED_VMEM_BYTES[case["target"]]
        assert fits == result["ok"], (case, need / 2**20, result.get("vmem_mib"))
