"""The H100 shared-memory model of the Triton kernels (``_pallas.shared_memory_estimate``) against what the
toolchain's Triton gave every kernel of the recorded grid, and jdrop's own error for tiles past the limit.

The data: ``benchmarks/results/h100_shared_memory.json`` (``python -m benchmarks.accelerator_tiles shared-memory``
in the GPU toolchain's environment): per case, each kernel's shared memory as Triton for sm_90a allocates it, the
figure XLA:GPU compares with the card's 232448 bytes. No toolchain is needed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import jdrop
from jdrop.attention import _pallas

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "h100_shared_memory.json"
LIMIT = _pallas.SHARED_MEMORY_BYTES["h100"]


def _points():
    """``(case, kernel, bytes)`` of every kernel of every recorded case."""
    for row in json.loads(DATA.read_text())["results"]:
        for kernel, (_warps, measured) in row.get("kernels", {}).items():
            yield row["case"], kernel, measured


def _estimate(case, kernel):
    def width(d):
        return max(16, 1 << (d - 1).bit_length())

    itemsize = jnp.dtype(case["dtype"]).itemsize
    mode = case.get("dropout_mask", "exact") if case.get("rate", 0.1) > 0 else None
    return _pallas.shared_memory_estimate(kernel, case["block_q"], case["block_k"], width(case["depth"]),
                                          width(case["depth"]), itemsize, mode, bias=case.get("bias", False),
                                          mask=case.get("mask", False))


def test_the_grid_covers_every_kernel_tile_head_dim_and_dtype():
    points = list(_points())
    kernels = {kernel for _, kernel, _ in points}
    assert kernels == {"forward", "dq", "dkv", "dbias"}
    assert {case["depth"] for case, _, _ in points} == {64, 96, 128, 256}
    assert {case["dtype"] for case, _, _ in points} == {"bfloat16", "float16", "float32"}
    assert {(case["block_q"], case["block_k"]) for case, _, _ in points} == {
        (bq, bk) for bq in (16, 32, 64, 128, 256) for bk in (16, 32, 64, 128, 256)}


def test_the_model_is_exact_or_a_lower_bound_on_every_measured_kernel():
    wrong = []
    for case, kernel, measured in _points():
        estimate, exact = _estimate(case, kernel)
        if (estimate != measured) if exact else (estimate > measured):
            wrong.append((case, kernel, measured, estimate, exact))
    assert not wrong, wrong[:10]


def test_the_model_refuses_exactly_the_tiles_the_compiler_refuses():
    # Exact estimates decide as the compiler does; a lower bound refuses only tiles the compiler refuses too (the
    # test above), and lets through to XLA:GPU's own error the refused tiles listed in PASS_THROUGH.
    passed_refused, wrongly_refused = [], []
    for case, kernel, measured in _points():
        estimate, _ = _estimate(case, kernel)
        if estimate > LIMIT >= measured:
            wrongly_refused.append((case, kernel))
        if measured > LIMIT >= estimate:
            passed_refused.append((case["dtype"], case["depth"], case["block_q"], case["block_k"], kernel))
    assert not wrongly_refused
    assert sorted(set(passed_refused)) == sorted(PASS_THROUGH)


PASS_THROUGH: list[tuple[str, int, int, int, str]] = []
"""Refused kernels whose estimate is a lower bound under the limit: XLA:GPU, not jdrop, refuses them."""


def test_the_error_names_the_tiles_the_bytes_and_the_limit():
    spec = _pallas._Spec(4096, 4096, 128, 128, 8, 1, False, False, _pallas.DropoutMode.PER_ELEMENT, "exact", 4096,
                         (), (), None, "gpu", False, "h100")
    with pytest.raises(ValueError) as error:
        _pallas.check_shared_memory(spec, "dkv", 128, 128, 2)
    message = str(error.value)
    assert "`block_q`=128 and `block_k`=128" in message and "263680 bytes" in message
    assert "dK/dV kernel" in message and "232448 bytes" in message and "H100" in message
    assert "pass smaller tiles" in message
    _pallas.check_shared_memory(spec._replace(target=None), "dkv", 128, 128, 2)  # no known limit: no check
    _pallas.check_shared_memory(spec, "forward", 128, 128, 2)  # 163840 bytes: fits


def _attend(q, block_q=None, block_k=None):
    return jdrop.dot_product_attention(q, q, q, dropout_rng=jax.random.key(0), dropout_rate=0.1,
                                       implementation="pallas", block_q=block_q, block_k=block_k).sum()


def test_h100_tiles_past_shared_memory_raise_at_trace_time(monkeypatch):
    # An H100 compile target without the toolchain: the abstract device's kind is what compile_target() reads.
    monkeypatch.setattr(_pallas, "compile_target", lambda: "h100")
    q = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
    with _pallas.kernels_for("gpu", interpret=False):
        jax.eval_shape(lambda q: _attend(q, 128, 128), q)  # the forward kernel fits (163840 bytes)
        with pytest.raises(ValueError, match=r"`block_q`=128 and `block_k`=128 need 263680 bytes .* dK/dV"):
            jax.eval_shape(jax.grad(lambda q: _attend(q, 128, 128)), q)
        jax.eval_shape(jax.grad(lambda q: _attend(q, 128, 64)), q)  # 198144 bytes: the default tiles fit


def test_default_h100_tiles_shrink_to_fit_shared_memory(monkeypatch):
    # Head dim 256, 16-bit: the default 128 x 64 needs 361984 bytes in dK/dV (measured: the grid's 128 x 64 at
    # head dim 256); tiles left to jdrop halve, the larger first, until every kernel fits: 64 x 64 (213760).
    assert _pallas.shared_memory_estimate("dkv", 128, 64, 256, 256, 2)[0] > LIMIT
    options = {"mode": "exact", "bias": False, "mask": False}
    assert _pallas._fit_shared_memory("h100", (128, 64), (False, False), (16, 16), (256, 256), 2, options) == (64, 64)
    # A caller's block_q is kept: block_k alone cannot make room, and the dK/dV kernel's check names the tiles.
    assert _pallas._fit_shared_memory("h100", (128, 64), (True, False), (16, 16), (256, 256), 2, options) == (128, 16)
    # No tile below the mode's least block_q (fast8: 64): float32 at head dim 512 keeps block_q at 64.
    fast8 = {"mode": "fast8", "bias": True, "mask": True}
    bq, bk = _pallas._fit_shared_memory("h100", (128, 64), (False, False), (64, 16), (512, 512), 4, fast8)
    assert bq == 64 and bk >= 16
    monkeypatch.setattr(_pallas, "compile_target", lambda: "h100")
    q = jax.ShapeDtypeStruct((1, 1024, 2, 256), jnp.bfloat16)
    with _pallas.kernels_for("gpu", interpret=False):
        jax.eval_shape(jax.grad(_attend), q)  # the defaults, shrunk: no error
        with pytest.raises(ValueError, match=r"`block_q`=128 and `block_k`=16 need .* dK/dV kernel"):
            jax.eval_shape(jax.grad(lambda q: _attend(q, block_q=128)), q)


def test_the_model_agrees_with_xla_gpus_own_verdicts():
    # Full H100 compiles by XLA:GPU (benchmarks/results/accelerator_tiles.json, value_and_grad, head dim 128,
    # exact dropout, no jdrop check): it refused exactly the tiles whose largest kernel the model puts past the limit.
    tiles = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "accelerator_tiles.json"
    verdicts = [r for r in json.loads(tiles.read_text())["results"] if r["case"]["target"] == "h100"]
    assert any(r["ok"] for r in verdicts) and any(not r["ok"] for r in verdicts)
    for result in verdicts:
        case = result["case"]
        need = max(_estimate(case, kernel)[0] for kernel in ("forward", "dq", "dkv"))
        assert (need <= LIMIT) == result["ok"], (case, need, result.get("message"))
        if not result["ok"]:
            assert f"requested {need}," in result["message"]  # XLA:GPU's figure is the model's


def _abstract_mesh(device_kind, platform):
    """A one-device abstract mesh of an accelerator, as ``Mesh([compile-only device]).abstract_mesh`` gives (those
    devices need the target's toolchain; tests/accelerators uses the real ones)."""
    from jax._src.mesh import AbstractDevice  # no public constructor

    device = AbstractDevice(device_kind=device_kind, num_cores=None, platform=platform)
    return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
                                  "NVIDIA GH200 480GB"])
def test_pallas_compiles_for_the_abstract_meshs_gpu_and_checks_its_shared_memory(kind):
    q = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(_abstract_mesh(kind, "gpu")):
        assert _pallas.resolve_backend(None) == ("gpu", False)  # no kernels_for: the target's kernels, compiled
        assert _pallas.compile_target() == "h100"  # H200 and GH200: the same SM and limit
        jax.eval_shape(jax.grad(_attend), q)
        with pytest.raises(ValueError, match=r"`block_q`=128 and `block_k`=128 need 263680 bytes"):
            jax.eval_shape(jax.grad(lambda q: _attend(q, 128, 128)), q)


def test_pallas_compiles_for_the_abstract_meshs_tpu_and_refuses_a_cpu_target():
    with jax.sharding.use_abstract_mesh(_abstract_mesh("TPU v5 lite", "tpu")):
        assert _pallas.resolve_backend(None) == ("tpu", False)
        assert _pallas.compile_target() == "v5e"
    with pytest.raises(ValueError, match=r"needs a TPU .* target platform is 'cpu'.*use_abstract_mesh"):
        _pallas.resolve_backend(None)
