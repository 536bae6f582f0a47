"""Sequence-parallel (ring) attention: the single-device call's outputs, gradients and mask on 1, 2, 4 and 8 devices.

The 8-device checks run in one subprocess (``tests/sequence_parallel_checks.py``: the device count is
fixed when JAX starts), which measures and writes JSON; the assertions are here. Tolerances are derived
from float64: the ring sums the same terms in another order (per step, per chunk), so its error against
naive float64 attention must stay within a small multiple of the single-device call's own error against
it, plus a few float32 roundings of the largest value. A few checks need no second device and run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import exclusive
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jdrop

ROOT = Path(__file__).resolve().parents[1]
CHECKS = Path(__file__).with_name("sequence_parallel_checks.py")
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="session")
def measured(tmp_path_factory):
    # One run for the whole session, even when pytest-xdist spreads this file's tests over several workers: they
    # share the parent of their base temporary directories, and the first one to take the lock runs the checks.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "sequence_parallel_checks.json"
    with exclusive(shared / "sequence_parallel_checks.lock"):
        if not out.exists():
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
            env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
            partial_out = out.with_suffix(".partial")
            proc = subprocess.run([sys.executable, str(CHECKS), str(partial_out)], env=env, capture_output=True,
                                  text=True, timeout=900)
            assert proc.returncode == 0, proc.stderr[-4000:]
            partial_out.rename(out)
    return json.loads(out.read_text())


def _tolerance(single_error: float, scale: float) -> float:
    # The single-device float32 call's own error against float64, times 4 (a different summation order may
    # double the rounding error and still be as accurate), plus 16 float32 roundings of the largest value.
    return 4.0 * single_error + 16.0 * EPS32 * scale


def _assert_matches_references(record: dict, single_error: float, where: str) -> None:
    assert record["mask_equal"], f"{where}: the dropout pattern is not flax's mask"
    tol = _tolerance(single_error, record["scale"])
    for reference in ("jdrop", "flax", "float64"):
        error = record[f"error_vs_{reference}"]
        assert error <= tol, f"{where}: output/gradients differ from {reference} by {error:.3g} > {tol:.3g}"


@pytest.mark.integration  # one subprocess with 8 simulated devices runs every ring check: minutes
@pytest.mark.parametrize("devices", [1, 2, 4, 8])
@pytest.mark.parametrize("case", ["broadcast", "causal_per_element"])
def test_ring_equals_single_device_flax_and_float64(measured, case, devices):
    # broadcast: flax's defaults (one mask for all rows and heads), contiguous shards. causal_per_element:
    # is_causal with one mask per batch row and head, load-balanced (zigzag) shards. T = 48, tiles 4 x 5:
    # shards of 48, 24, 12, 6 rows (zigzag chunks of 24, 12, 6, 3) end in padded tiles.
    _assert_matches_references(measured[f"{case}/{devices}"], measured[f"{case}/single_error_vs_float64"],
                               f"{case} on {devices} devices")


@pytest.mark.integration  # one subprocess with 8 simulated devices runs every ring check: minutes
@pytest.mark.parametrize("mesh", ["data2_seq4", "data2_seq2_heads2"])
def test_batch_and_head_sharding_compose_with_the_ring(measured, mesh):
    # Grouped queries (4 heads, 2 key/value heads), a key-padding mask and a key bias (B, 1, 1, T) that travel
    # with the keys (the bias's gradient comes home around the ring), causal, one mask per batch row and head:
    # each batch and head shard draws its part of the (B, H, T, T) mask.
    _assert_matches_references(measured[f"meshes/{mesh}"], measured["meshes/single_error_vs_float64"], mesh)


@pytest.mark.integration  # one subprocess with 8 simulated devices runs every ring check: minutes
def test_single_device_attention_inside_a_data_parallel_shard_map(measured):
    # Without axis_name, inside shard_map over the batch: the loop carries take the operands' mesh axes, and a
    # bias replicated over the devices gets the sum of their gradients. Same order of terms per example as
    # unsharded, except the bias gradient's sum over the batch (float32 tolerance on the largest value).
    record = measured["data_parallel"]
    assert record["error_vs_jdrop"] <= 16 * EPS32 * record["scale"]


@pytest.mark.integration  # one subprocess with 8 simulated devices runs every ring check: minutes
def test_traced_rate_rate_zero_and_rate_one(measured):
    # One executable for every rate; rate 0 and 0.3 equal the single-device call (float tolerance: same order of
    # terms within a tile, another across shards), rate 1 gives zeros and zero gradients, 1.5 NaN.
    for rate in ("0.0", "0.3"):
        assert measured[f"rate/{rate}"]["error_vs_jdrop"] <= 64 * EPS32
    assert measured["rate/1.0"]["all_zero"] and measured["rate/1.0"]["error_vs_jdrop"] == 0.0
    assert measured["rate/1.5"]["all_nan"]


@pytest.mark.integration  # one subprocess with 8 simulated devices runs every ring check: minutes
def test_bfloat16_is_as_accurate_as_the_single_device_call(measured):
    record = measured["bfloat16"]
    assert record["dtype"] == "bfloat16"
    # The partial outputs and gradient sums stay in float32 across the ring, so the ring rounds to bfloat16 once,
    # as the single-device call does: its error against float64 is the single call's, within a bfloat16 ulp.
    bf16_eps = float(jnp.finfo(jnp.bfloat16).eps)
    assert record["error_vs_float64"] <= record["single_error_vs_float64"] + bf16_eps * record["scale"]


@pytest.mark.integration  # one subprocess with 8 simulated devices runs every ring check: minutes
def test_flax_attention_fn_inside_shard_map(measured):
    # linen's MultiHeadDotProductAttention with attention_fn=partial(jdrop.dot_product_attention, axis_name="seq")
    # applied inside shard_map (parameters replicated, the sequence sharded over 4 devices) gives the unsharded
    # layer's output and parameter gradients, and flax's own attention's, for the same dropout rng.
    record = measured["flax_recipe"]
    tol = 4.0 * record["single_error_vs_flax"] + 16.0 * EPS32 * record["scale"]
    assert record["error_vs_jdrop"] <= tol and record["error_vs_flax"] <= tol


@pytest.mark.integration  # one subprocess with 8 simulated devices runs every ring check: minutes
def test_readme_recipe_runs_and_equals_one_device(measured):
    # The sequence-parallel guide's flax language model, batch over 2 devices and sequence over 4 (zigzag), one SGD
    # step: the loss and the updated parameters of the same step on one device (a mean over 8 x 128 tokens: float32
    # tolerance).
    record = measured["readme_recipe"]
    assert record["loss_error"] <= 1e-5 * abs(record["loss"])
    assert record["params_error"] <= 1e-5


@pytest.mark.integration  # one subprocess with 8 simulated devices runs every ring check: minutes
def test_per_device_memory_falls_as_devices_grow(measured):
    memory = {int(n): v for n, v in measured["memory"].items()}  # causal, load-balanced, T = 2048
    assert memory[8] < memory[4] < memory[2] < memory[1]
    # From 4 devices on the shards dominate: twice the devices, half the memory (5% slack for loop buffers).
    assert memory[8] <= 0.55 * memory[4]
    # The ring holds a second key/value shard in flight (and their gradients in the backward pass): per
    # device, at most 2.5x a single device's memory divided by N, i.e. still O(T / N).
    for n in (2, 4, 8):
        assert memory[n] <= 2.5 * memory[1] / n, (n, memory)


@pytest.mark.parametrize(("attempt", "message"), [
    ("length_not_divisible", "must be a multiple of 4"),
    ("zigzag_odd_shard", "local lengths must be even"),
    ("full_mask", "varies along both queries and keys"),
    ("undeclared_batch_axis", "batch_axis_name"),
    ("key_varies_along_ring", "varies along the sequence axis"),
    ("causal_cross_lengths", "query and key shards of one length"),
])
@pytest.mark.integration  # one subprocess with 8 simulated devices runs every ring check: minutes
def test_unsupported_inputs_raise_clear_errors(measured, attempt, message):
    assert measured[f"error/{attempt}"] is not None, f"{attempt} was accepted"
    assert message in measured[f"error/{attempt}"]


@pytest.mark.integration  # one subprocess with 8 simulated devices runs every ring check: minutes
def test_zigzag_layout_is_the_documented_permutation(measured):
    # Device d holds chunks d and 2N - 1 - d (of 2N); to_zigzag moves contiguous shards there, from_zigzag back.
    assert measured["layouts"] == {"positions_are_zigzag": True, "to_zigzag_permutes": True, "round_trip": True}


# ------------------------------------------------------------------------------------- one device, in process


def _one_device_mesh():
    return Mesh(np.array(jax.devices()[:1]), ("seq",))


def test_axis_name_outside_shard_map_raises():
    q = jnp.ones((1, 8, 2, 4))
    with pytest.raises(ValueError, match="not a bound mesh axis"):
        jdrop.dot_product_attention(q, q, q, axis_name="seq")
    with pytest.raises(TypeError, match="axis_name"):
        jdrop.dot_product_attention(q, q, q, axis_name=3)


def test_options_the_ring_cannot_honour_raise():
    q = jnp.ones((1, 8, 2, 4))
    inside = partial(jax.shard_map, mesh=_one_device_mesh(), in_specs=P(None, "seq"), out_specs=P(None, "seq"))
    with pytest.raises(ValueError, match="sequence_layout"):
        inside(lambda q: jdrop.dot_product_attention(q, q, q, axis_name="seq", sequence_layout="striped"))(q)
    with pytest.raises(ValueError, match="module"):
        inside(lambda q: jdrop.dot_product_attention(q, q, q, axis_name="seq", module=object()))(q)
    with pytest.raises(ValueError, match="`implementation` is not supported by sequence-parallel"):
        inside(lambda q: jdrop.dot_product_attention(q, q, q, axis_name="seq", implementation="pallas"))(q)
    with pytest.raises(ValueError, match="`dropout_mask` is not supported by sequence-parallel"):
        inside(lambda q: jdrop.dot_product_attention(q, q, q, axis_name="seq", dropout_mask="fast16"))(q)
    with pytest.raises(ValueError, match="mesh"):
        jdrop.sequence_parallel_attention(q, q, q, mesh=_one_device_mesh(), axis_name="sequence")


def test_sequence_positions_and_zigzag_round_trip_on_one_device():
    # On one device every layout is the sequence in order; the multi-device permutation is checked with the ring.
    inside = partial(jax.shard_map, mesh=_one_device_mesh(), in_specs=P(None, "seq"), out_specs=P(None, "seq"))
    x = jnp.arange(12.0).reshape(1, 12, 1, 1)
    np.testing.assert_array_equal(inside(lambda x: jdrop.attention.to_zigzag(x, "seq"))(x), x)
    positions = jax.shard_map(lambda: jdrop.attention.sequence_positions(12, "seq", "zigzag")[None],
                              mesh=_one_device_mesh(), in_specs=(), out_specs=P(None, "seq"))()
    np.testing.assert_array_equal(positions[0], np.arange(12))


def test_zigzag_schedule_gives_every_device_the_same_causal_work_at_every_step():
    # Counted from the ring's own schedule and the kernel's tile loops (benchmarks.sequence_parallel): both
    # layouts compute the same weights in all, but contiguous shards leave devices idle at most steps.
    from benchmarks.sequence_parallel import balance, schedule_work

    for devices in (2, 4, 8):
        zigzag = schedule_work("zigzag", devices, 4096)
        contiguous = schedule_work("contiguous", devices, 4096)
        assert all(len(set(step)) == 1 for step in zigzag), zigzag  # every device, every step: the same work
        assert balance(zigzag)["balance"] == 1.0
        assert balance(zigzag)["weights"] == balance(contiguous)["weights"]
        # Contiguous: the critical path is N - 1/2 blocks, of N / 2 ideal (tile rounding aside).
        assert balance(contiguous)["balance"] < 0.7
