"""What the accelerator compilers say of jdrop's Pallas kernels, without a device: accepted tiles, registers, memory.

Each case compiles ``jdrop.dot_product_attention(..., implementation="pallas")`` (or its ``value_and_grad``) for a
compile-only device, in its own process under a time and memory watchdog (a compile that loops is a result, not a
hang of the run):

- TPU (``v4``, ``v5e``, ``v6e``): ``jax.experimental.topologies.get_topology_desc(platform="tpu", ...)`` in an
  environment with ``jax[tpu]`` (libtpu) pinned to the project's jax; traced under the target's abstract mesh so
  that Pallas's chip rules see it. Reports XLA:TPU's ``memory_analysis()`` temporaries and ``cost_analysis()``,
  and whether Mosaic accepts the tiles (a tile that does not fit VMEM fails with ``CompileTimeScopedVmemOom``).
- H100 (``h100``): ``get_topology_desc(platform="cuda", target_config=<XLA's h100_sxm.txtpb>, topology="1x1x1")``
  in an environment with ``jax-cuda12-plugin`` and ``nvidia-cuda-nvcc-cu12``, ``JAX_PLATFORMS=cpu``. With
  ``--registers``, each kernel's Triton IR (the ``__gpu$xla.gpu.triton`` custom call's ``ir``) is compiled to PTX
  by the plugin's Triton and assembled by ``ptxas -arch=sm_90a -v``: registers, spills and shared memory.

Usage (``JDROP_TPU_PYTHON`` / ``JDROP_GPU_PYTHON``: the python of such an environment; the H100 target config from
``JDROP_H100_TARGET_CONFIG``, default ``tests/accelerators/h100_sxm.txtpb``)::

    PYTHONPATH=. $JDROP_TPU_PYTHON -m benchmarks.accelerator_tiles case '{"target": "v5e", "block_q": 512}'
    PYTHONPATH=. python -m benchmarks.accelerator_tiles sweep --out benchmarks/results/accelerator_tiles.json

``case`` prints one JSON line (the result); ``sweep`` runs the tile ladders below in subprocesses and writes the
results JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TPU_TARGETS = ("v4", "v5e", "v6e")
GPU_TARGETS = ("h100",)
DEFAULT_CASE = {"target": "v5e", "dtype": "bfloat16", "depth": 128, "length": 1024, "batch": 1, "heads": 1,
                "causal": False, "rate": 0.1, "dropout_mask": "exact", "what": "vag", "implementation": "pallas",
                "block_q": None, "block_k": None, "registers": False, "unchecked": False}
"""A case: the target, the inputs ``(batch, length, heads, depth)``, the options, and ``what``: ``"fwd"`` (the
output) or ``"vag"`` (``value_and_grad`` of its sum w.r.t. q, k, v); ``unchecked``: without jdrop's VMEM check, to
record XLA:TPU's own verdict on the tiles."""


def python_for(target: str) -> str | None:
    """The python of the environment that compiles for ``target`` (``JDROP_TPU_PYTHON`` / ``JDROP_GPU_PYTHON``)."""
    return os.environ.get("JDROP_GPU_PYTHON" if target in GPU_TARGETS else "JDROP_TPU_PYTHON")


def h100_config() -> str:
    return os.environ.get("JDROP_H100_TARGET_CONFIG", str(ROOT / "tests" / "accelerators" / "h100_sxm.txtpb"))


# ------------------------------------------------------------------------------------- in the target's environment


def _device(target: str) -> Any:
    from jax.experimental import topologies

    if target in GPU_TARGETS:
        topology = topologies.get_topology_desc(platform="cuda", target_config=Path(h100_config()).read_text(),
                                                topology="1x1x1")
    else:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=f"{target}:1x1",
                                                chip_config_name="default", chips_per_host_bounds=(1, 1, 1),
                                                num_slices=1)
    return topology.devices[0]


def _lowered(case: dict[str, Any]) -> Any:
    import jax
    import jax.numpy as jnp

    import jdrop
    from jdrop.attention import _pallas

    mesh = jax.sharding.Mesh([_device(case["target"])], ("x",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x = jax.ShapeDtypeStruct((case["batch"], case["length"], case["heads"], case["depth"]), jnp.dtype(case["dtype"]),
                             sharding=replicated)
    key_data = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    pallas = case["implementation"] == "pallas"

    def attend(q, k, v, key_data):
        out = jdrop.dot_product_attention(
            q, k, v, dropout_rng=jax.random.wrap_key_data(key_data), dropout_rate=case["rate"],
            is_causal=case["causal"], implementation=case["implementation"], dropout_mask=case["dropout_mask"],
            block_q=case["block_q"] if pallas else None, block_k=case["block_k"] if pallas else None)
        return jnp.sum(out.astype(jnp.float32))

    fn = attend if case["what"] == "fwd" else jax.value_and_grad(attend, argnums=(0, 1, 2))
    backend = "gpu" if case["target"] in GPU_TARGETS else "tpu"
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), _pallas.kernels_for(backend, interpret=False):
        return jax.jit(fn).lower(x, x, x, key_data)


def _triton_kernels(lowered: Any) -> list[dict[str, Any]]:
    """Registers, spills and shared memory of each Triton kernel of a lowering, by the plugin's Triton and ptxas."""
    import jax
    from jax._src.lib import triton  # the plugin's Triton compiler: no public name for it

    ptxas = Path(sys.prefix).glob("lib/python3*/site-packages/nvidia/cuda_nvcc/bin/ptxas")
    ptxas_path = str(next(iter(ptxas)))
    calls: list[Any] = []

    def walk(operation: Any) -> None:
        for region in operation.regions:
            for block in region.blocks:
                for op in block.operations:
                    if op.operation.name == "stablehlo.custom_call" and "triton" in str(
                            op.attributes["call_target_name"]):
                        calls.append(op)
                    walk(op.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    kernels = []
    for op in calls:
        config = op.attributes["mhlo.backend_config"]
        warps, stages = (int(str(config[name]).split(":")[0]) for name in ("num_warps", "num_stages"))
        compiled = triton.compile("CUDA", config["ir"].value_bytes, "9.0", num_warps=warps, num_ctas=1,
                                  num_stages=stages)
        ptx = Path(f"/tmp/jdrop-{os.getpid()}.ptx")
        ptx.write_text(compiled.asm)
        report = subprocess.run([ptxas_path, "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull], capture_output=True,
                                text=True, check=True).stderr
        ptx.unlink()
        kernels.append({"kernel": str(config["name"]).strip('"'), "num_warps": warps, "num_stages": stages,
                        "shared_memory_bytes": int(compiled.smem_bytes),
                        "registers": int(re.search(r"Used (\d+) registers", report).group(1)),  # type: ignore
                        "spill_stores_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1)),  # type: ignore
                        "spill_loads_bytes": int(re.search(r"(\d+) bytes spill loads", report).group(1))})  # type: ignore
    del jax
    return kernels


def compile_case(case: dict[str, Any]) -> dict[str, Any]:
    """Compiles one case here (in the target's environment): what the compiler accepted and reported."""
    case = {**DEFAULT_CASE, **case}
    start = time.perf_counter()
    result: dict[str, Any] = {"case": case}
    if case["unchecked"]:
        from jdrop.attention import _pallas

        _pallas.SCOPED_VMEM_BYTES.clear()  # this process only: the compiler judges the tiles
    try:
        lowered = _lowered(case)
        if case["registers"]:
            result["kernels"] = _triton_kernels(lowered)
        compiled = lowered.compile()
    except Exception as error:  # noqa: BLE001 - the compiler's refusal is the result
        text = str(error)
        kind = "VmemOom" if "ScopedVmemOom" in text or "memory space vmem" in text else type(error).__name__
        scoped = (re.search(r"Scoped allocation with size ([0-9.]+)M and limit ([0-9.]+)M", text)
                  or re.search(r"Used ([0-9.]+)M of ([0-9.]+)M vmem", text))
        if scoped:
            result.update(vmem_mib=float(scoped.group(1)), vmem_limit_mib=float(scoped.group(2)))
        return {**result, "ok": False, "error": kind, "message": text.strip().splitlines()[0][:400] if text else "",
                "seconds": round(time.perf_counter() - start, 1)}
    memory = compiled.memory_analysis()
    costs = compiled.cost_analysis() or {}
    if isinstance(costs, list):
        costs = costs[0] if costs else {}
    return {**result, "ok": True, "seconds": round(time.perf_counter() - start, 1),
            "temp_bytes": int(memory.temp_size_in_bytes), "device_kind": _device(case["target"]).device_kind,
            "flops": float(costs.get("flops", 0.0)), "transcendentals": float(costs.get("transcendentals", 0.0)),
            "bytes_accessed": float(costs.get("bytes accessed", 0.0))}


# ------------------------------------------------------------------------------------- the watchdog


def run_case(case: dict[str, Any], *, timeout: float = 150, memory_gib: float = 12) -> dict[str, Any]:
    """:func:`compile_case` in a subprocess of the target's environment, killed past ``timeout`` seconds or
    ``memory_gib`` of address space (a compiler that loops is reported as such, with the kernel's case)."""
    case = {**DEFAULT_CASE, **case}
    python = python_for(case["target"])
    if python is None:
        raise RuntimeError(f"no environment for {case['target']}: set JDROP_TPU_PYTHON / JDROP_GPU_PYTHON")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1",
           "JAX_PLATFORMS": "cpu"}
    limit = int(memory_gib * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    start = time.perf_counter()
    try:
        done = subprocess.run([python, "-m", "benchmarks.accelerator_tiles", "case", json.dumps(case)], env=env,
                              capture_output=True, text=True, timeout=timeout, preexec_fn=cap, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"case": case, "ok": False, "error": f"timeout: still compiling after {timeout:.0f} s",
                "seconds": round(time.perf_counter() - start, 1)}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or [""])[-1][:400]
        return {"case": case, "ok": False, "error": f"exit {done.returncode} (memory cap {memory_gib} GiB?)",
                "message": tail, "seconds": round(time.perf_counter() - start, 1)}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------- the sweep

TPU_TILES = ((128, 128), (256, 256), (512, 512), (512, 1024), (1024, 1024))
VMEM_PROBES = ({"dtype": "float32", "what": "fwd", "rate": 0.0, "length": 2048, "block_q": 2048, "block_k": 2048},
               {"dtype": "float32", "what": "fwd", "rate": 0.0, "length": 4096, "block_q": 4096, "block_k": 4096})
"""Tiles past the scoped VMEM, compiled without jdrop's check: XLA:TPU's refusal and its numbers."""
GPU_TILES = ((32, 64), (64, 64), (64, 128), (128, 64), (128, 128))


def sweep_cases(targets: Sequence[str]) -> list[dict[str, Any]]:
    """The tile ladders: value_and_grad with exact dropout, D = 128, bfloat16 and float32 (T = 4096 on TPU)."""
    cases = []
    for target in targets:
        tiles = GPU_TILES if target in GPU_TARGETS else TPU_TILES
        for dtype in ("bfloat16", "float32"):
            for block_q, block_k in tiles:
                cases.append({"target": target, "dtype": dtype, "length": 4096, "block_q": block_q,
                              "block_k": block_k, "registers": target in GPU_TARGETS, "unchecked": True})
        if target in TPU_TARGETS:
            cases += [{"target": target, **probe, "unchecked": True} for probe in VMEM_PROBES]
    return cases


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("case", help="compile one case here and print its result as a JSON line")
    one.add_argument("case", help="JSON object overriding DEFAULT_CASE")
    many = sub.add_parser("sweep", help="the tile ladders, each case in a subprocess under a watchdog")
    many.add_argument("--targets", nargs="+", default=[*GPU_TARGETS, *TPU_TARGETS])
    many.add_argument("--timeout", type=float, default=150)
    many.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accelerator_tiles.json")
    args = parser.parse_args(argv)
    if args.command == "case":
        print(json.dumps(compile_case(json.loads(args.case))), flush=True)
        return
    targets = [t for t in args.targets if python_for(t)]
    results = []
    for case in sweep_cases(targets):
        results.append(run_case(case, timeout=args.timeout))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    args.out.write_text(json.dumps({"command": "python -m benchmarks.accelerator_tiles sweep", "results": results},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
