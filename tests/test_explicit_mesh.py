"""Explicit-axes meshes (``jax.make_mesh``'s default axis type, ``jax.set_mesh``, ``jax.reshard``).

``dot_product_attention`` (the xla path and the Pallas kernels, interpreted; and the ring with
``axis_name=`` inside ``jax.shard_map`` and ``sequence_parallel_attention``), ``jdrop.train_step`` and
``jdrop.distributed`` on explicitly sharded inputs: the outputs and gradients carry the inputs'
shardings and equal the single-device run. The checks need 8 simulated devices, fixed when JAX starts,
so they run in one subprocess (``tests/explicit_mesh_checks.py``), which writes JSON; the assertions
are here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EPS32 = float(np.finfo(np.float32).eps)
# The sharded program sums the same float32 terms as the single-device one, in another order (per device,
# then across devices): each output or gradient element is off by a few roundings of the largest term.
# Errors are relative to max(1, max |value|); 16 roundings leave room over the measured <= 3 eps.
TOLERANCE = 16 * EPS32


@pytest.fixture(scope="module")
def measured():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "explicit_mesh_checks.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


ATTENTION_CASES = [f"{impl}/{case}" for impl in ("xla", "pallas")
                   for case in ("broadcast", "per_element_causal", "masked_eval")]
RING_CASES = ["ring/shard_map", "ring/sequence_parallel_attention"]


@pytest.mark.parametrize("case", ATTENTION_CASES + RING_CASES)
def test_attention_keeps_shardings_and_equals_single_device(measured, case):
    r = measured[case]
    assert r["out_type"] == r["q_type"], r  # v has q's depth and sharding here: the output is sharded as q
    assert r["eager_type"] == r["q_type"], r
    assert r["grad_types"] == r["arg_types"], r
    assert r["out_error"] <= TOLERANCE and r["eager_error"] <= TOLERANCE, r
    assert r["grad_error"] <= TOLERANCE, r


def test_attention_on_eight_devices_keeps_batch_sharding(measured):
    assert measured["data8"]["out_type"] == "float32[8@data,16,4,8]"


@pytest.mark.parametrize("way", ["reshard", "distributed"])
def test_train_step_on_explicit_mesh_equals_single_device(measured, way):
    r = measured[f"train/{way}"]
    assert r["batch_type"] == "float32[32@data,12]", r
    # Three Adam steps: the gradients' batch sums reordered across 8 devices, as above.
    assert r["param_error"] <= TOLERANCE and r["loss_error"] <= TOLERANCE, r
