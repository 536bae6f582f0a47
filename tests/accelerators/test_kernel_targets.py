"""jdrop's Pallas kernels compiled for real accelerator targets, without a device (slow: minutes).

Each compile runs in its own process of an environment with the target's toolchain, under the compile watchdog
(:func:`benchmarks.accelerator_tiles.run_case`, through :mod:`benchmarks._watchdog`): a compiler that loops fails the
test with the case it was compiling. The environments are found through ``JDROP_TPU_PYTHON`` (``jax[tpu]`` pinned
to the project's jax) and ``JDROP_GPU_PYTHON`` (``jax-cuda12-plugin`` and ``nvidia-cuda-nvcc-cu12``); the H100
target config through ``JDROP_H100_TARGET_CONFIG`` (default ``tests/accelerators/h100_sxm.txtpb``). Without them
the tests are skipped.
"""

import itertools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from _util import pallas_calls

import jdrop
from benchmarks import accelerator_tiles
from jdrop.attention import _dropout_mask, _pallas

needs_tpu = pytest.mark.skipif(not os.environ.get("JDROP_TPU_PYTHON"),
                               reason="JDROP_TPU_PYTHON (the python of a jax[tpu] environment) is not set")
needs_gpu = pytest.mark.skipif(
    not os.environ.get("JDROP_GPU_PYTHON") or not Path(accelerator_tiles.h100_config()).exists(),
    reason="JDROP_GPU_PYTHON (a jax-cuda12-plugin environment) is not set, or the H100 target config is missing")


def _compiled(case, **watchdog):
    result = accelerator_tiles.run_case(case, **watchdog)
    assert result["ok"], f"{result['error']}: {result.get('message', '')} ({result['case']})"
    return result


# ------------------------------------------------------------------------------------- H100


H100_MATRIX = list(itertools.product(("bfloat16", "float32"), (64, 128), (False, True), _dropout_mask.MODES))


@needs_gpu
@pytest.mark.parametrize(("dtype", "depth", "causal", "mode"), H100_MATRIX)
def test_h100_compiles_value_and_grad_with_dropout(dtype, depth, causal, mode):
    # XLA:GPU's Triton pipeline once looped on the dK/dV kernel (memory past 18 GB) for every dropout mask.
    _compiled({"target": "h100", "dtype": dtype, "depth": depth, "causal": causal, "dropout_mask": mode,
               "length": 1024, "batch": 2, "heads": 4}, timeout=120, memory_gib=8)


@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_h100_default_tiles_fit_registers_and_shared_memory(dtype):
    result = _compiled({"target": "h100", "dtype": dtype, "length": 1024, "registers": True}, timeout=150)
    assert {k["kernel"] for k in result["kernels"]} == {"jdrop_attention_forward", "jdrop_attention_dkv",
                                                        "jdrop_attention_dq"}
    for kernel in result["kernels"]:
        if dtype == "bfloat16":  # float32's dK/dV spills at every tile (the fewest bytes at the default, 32 x 64)
            assert kernel["spill_stores_bytes"] == kernel["spill_loads_bytes"] == 0, kernel
        assert kernel["registers"] <= 255, kernel  # sm_90's per-thread limit
        assert kernel["shared_memory_bytes"] <= 232448, kernel  # H100's per-block opt-in limit


@needs_gpu
@pytest.mark.parametrize(("dtype", "fits", "refused", "kernel", "need"), [
    ("bfloat16", (128, 64), (128, 128), "dK/dV", 263680),  # 198144 bytes at most vs 263680
    ("float32", (128, 64), (64, 128), "dQ", 262144),  # 229376 (of 232448) vs 262144
])
def test_h100_shared_memory_boundary_compiles_or_raises_jdrops_error(dtype, fits, refused, kernel, need):
    # The tile that fits compiles; the one past the 232448 bytes a thread block takes raises jdrop's ValueError
    # while tracing, where XLA:GPU would refuse it at compile time ("Shared memory size limit exceeded").
    case = {"target": "h100", "dtype": dtype, "length": 1024}
    _compiled({**case, "block_q": fits[0], "block_k": fits[1]}, timeout=300)
    result = accelerator_tiles.run_case({**case, "block_q": refused[0], "block_k": refused[1]}, timeout=300)
    assert not result["ok"] and result["error"] == "ValueError", result
    assert f"`block_q`={refused[0]} and `block_k`={refused[1]} need {need} bytes" in result["message"], result
    assert f"{kernel} kernel" in result["message"] and "232448" in result["message"]


@needs_gpu
def test_h100_pallas_compiles_ahead_of_time_from_the_abstract_mesh_alone():
    # The public way: under jax.sharding.use_abstract_mesh of a compile-only H100, implementation="pallas" takes the
    # Triton kernels, compiled (no _pallas.kernels_for), and its default tiles.
    _compiled({"target": "h100", "length": 1024, "kernels_for": False}, timeout=300)


# ------------------------------------------------------------------------------------- TPU


@needs_tpu
@pytest.mark.parametrize("chip", ["v5e", "v6e", "v4"])
def test_tpu_compiles_value_and_grad_with_dropout(chip):
    for causal, mode in ((True, "exact"), (False, "fast8")):
        _compiled({"target": chip, "causal": causal, "dropout_mask": mode, "length": 2048, "batch": 2, "heads": 4})


@needs_tpu
def test_tpu_pallas_compiles_ahead_of_time_from_the_abstract_mesh_alone():
    _compiled({"target": "v5e", "length": 1024, "kernels_for": False})


@needs_tpu
def test_tpu_pallas_temporaries_not_above_xla_path():
    # value_and_grad w.r.t. q, k, v; B=4, T=8192, H=8, D=128, bf16, dropout 0.1: the kernels' per-row residuals
    # once took 128x their size in (Tq, 1) lane-padded layouts (0.56 GiB against the xla path's 0.25 on v5e).
    case = {"target": "v5e", "batch": 4, "length": 8192, "heads": 8}
    pallas = _compiled(case, timeout=300)
    xla = _compiled({**case, "implementation": "xla"}, timeout=300)
    assert pallas["temp_bytes"] <= xla["temp_bytes"], (pallas["temp_bytes"], xla["temp_bytes"])


@needs_tpu
def test_tpu_cost_analysis_sees_the_kernels_cost_estimates():
    case = {"target": "v5e", "what": "fwd", "length": 1024, "heads": 2, "causal": True, "block_q": 128, "block_k": 128}
    compiled = _compiled(case)
    q = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)

    def attend(q):
        return jdrop.dot_product_attention(q, q, q, dropout_rng=jax.random.key(0), dropout_rate=0.1, is_causal=True,
                                           implementation="pallas", block_q=128, block_k=128)

    with _pallas.kernels_for("tpu", interpret=False):
        jaxpr = jax.make_jaxpr(attend)(q)
    estimates = list(pallas_calls(jaxpr.jaxpr).values())
    assert len(estimates) == 1
    # XLA:TPU adds the kernel's estimate to the few flops of the ops around it (scaling, transposes).
    assert estimates[0].flops <= compiled["flops"] <= 1.02 * estimates[0].flops
    assert estimates[0].transcendentals <= compiled["transcendentals"] <= 1.02 * estimates[0].transcendentals


@needs_tpu
def test_tpu_tiles_past_vmem_raise_jdrops_error_before_compiling():
    # XLA:TPU refuses this forward (19.4 MiB of v5e's 16 MiB scoped VMEM; see benchmarks/results); jdrop says so first.
    result = accelerator_tiles.run_case({"target": "v5e", "dtype": "float32", "what": "fwd", "rate": 0.0,
                                         "length": 2048, "block_q": 2048, "block_k": 2048}, timeout=120)
    assert not result["ok"] and result["error"] == "ValueError", result
    assert "`block_q`=2048 and `block_k`=2048" in result["message"] and "v5e" in result["message"]
