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
    PYTHONPATH=. python -m benchmarks.accelerator_tiles shared-memory --jobs 2

``case`` prints one JSON line (the result); ``sweep`` runs the tile ladders below, ``shared-memory`` the H100
shared-memory grid (:func:`shared_memory_cases`, each Triton kernel's bytes without XLA:GPU's compile; the data
``tests/test_shared_memory_model.py`` checks jdrop's model against), each case in a worker of the target's
environment under the compile watchdog (:mod:`benchmarks._watchdog`), and write the results JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import _watchdog

ROOT = Path(__file__).resolve().parent.parent
TPU_TARGETS = ("v4", "v5e", "v6e")
GPU_TARGETS = ("h100",)
DEFAULT_CASE = {"target": "v5e", "dtype": "bfloat16", "depth": 128, "length": 1024, "batch": 1, "heads": 1,
                "causal": False, "rate": 0.1, "dropout_mask": "exact", "what": "vag", "implementation": "pallas",
                "block_q": None, "block_k": None, "registers": False, "unchecked": False, "bias": False,
                "mask": False, "kv_heads": None, "shared_memory": False, "kernels_for": True}
"""A case: the target, the inputs ``(batch, length, heads, depth)``, the options, and ``what``: ``"fwd"`` (the
output) or ``"vag"`` (``value_and_grad`` of its sum w.r.t. q, k, v, and the bias when there is one);
``unchecked``: without jdrop's VMEM and shared-memory checks, to record the compiler's own verdict on the tiles;
``bias``/``mask``: a full ``(batch, heads, length, length)`` float bias (in the inputs' dtype) / random bool mask;
``kv_heads``: fewer key/value heads than query heads (grouped queries); ``shared_memory`` (H100): only each Triton
kernel's shared memory, by the toolchain's Triton (what XLA:GPU checks against the card's limit), without
XLA:GPU's compile; ``kernels_for``: pick the backend with ``_pallas.kernels_for`` (False: from the abstract mesh's
device alone, the public way)."""


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
    kv = x if not case["kv_heads"] else jax.ShapeDtypeStruct(
        (case["batch"], case["length"], case["kv_heads"], case["depth"]), x.dtype, sharding=replicated)
    key_data = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    square = (case["batch"], case["heads"], case["length"], case["length"])
    bias = jax.ShapeDtypeStruct(square, x.dtype, sharding=replicated) if case["bias"] else None
    pallas = case["implementation"] == "pallas"

    def attend(q, k, v, key_data, bias):
        mask = None
        if case["mask"]:
            mask = jax.random.bernoulli(jax.random.wrap_key_data(key_data), 0.9, square)
        out = jdrop.dot_product_attention(
            q, k, v, bias=bias, mask=mask, dropout_rng=jax.random.wrap_key_data(key_data),
            dropout_rate=case["rate"], is_causal=case["causal"], implementation=case["implementation"],
            dropout_mask=case["dropout_mask"], block_q=case["block_q"] if pallas else None,
            block_k=case["block_k"] if pallas else None)
        return jnp.sum(out.astype(jnp.float32))

    argnums = (0, 1, 2, 4) if case["bias"] else (0, 1, 2)
    fn = attend if case["what"] == "fwd" else jax.value_and_grad(attend, argnums=argnums)
    backend = "gpu" if case["target"] in GPU_TARGETS else "tpu"
    forced = _pallas.kernels_for(backend, interpret=False) if case["kernels_for"] else contextlib.nullcontext()
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), forced:
        return jax.jit(fn).lower(x, kv, kv, key_data, bias)


def _triton_kernels(lowered: Any, registers: bool = True) -> list[dict[str, Any]]:
    """Shared memory (and with ``registers``: registers and spills) of each Triton kernel of a lowering, by the
    plugin's Triton (the same pipeline and shared-memory figure XLA:GPU checks against the card) and ptxas."""
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
        name = str(config["name"]).strip('"')
        if not registers:
            kernels.append({"kernel": name, "num_warps": warps, "num_stages": stages,
                            "shared_memory_bytes": int(compiled.smem_bytes)})
            continue
        ptx = Path(f"/tmp/jdrop-{os.getpid()}.ptx")
        ptx.write_text(compiled.asm)
        report = subprocess.run([ptxas_path, "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull], capture_output=True,
                                text=True, check=True).stderr
        ptx.unlink()
        kernels.append({"kernel": name, "num_warps": warps, "num_stages": stages,
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
        _pallas.SHARED_MEMORY_BYTES.clear()
    try:
        lowered = _lowered(case)
        if case["shared_memory"]:
            return {**result, "ok": True, "kernels": _triton_kernels(lowered, registers=False),
                    "seconds": round(time.perf_counter() - start, 1)}
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


def _worker() -> None:
    """``python -m benchmarks.accelerator_tiles worker``: compiles the cases on stdin (JSON, one a line), each
    reported by the watchdog's protocol (:mod:`benchmarks._watchdog`), its result as the event's ``info``."""
    _watchdog.die_with_parent()
    for line in (line.strip() for line in sys.stdin):
        if not line:
            continue
        _watchdog.emit(start=line)
        start = time.perf_counter()
        result = compile_case(json.loads(line))
        _watchdog.emit(done=line, ok=result["ok"], seconds=time.perf_counter() - start,
                       message=result.get("message", ""), info=result)


def run_cases(cases: Sequence[dict[str, Any]], *, timeout: float = 150, memory_gib: float = 8,
              progress: bool = False) -> list[dict[str, Any]]:
    """:func:`compile_case` of each case in a worker of its target's environment, under the compile watchdog
    (:func:`benchmarks._watchdog.run_jobs`): a case past ``timeout`` seconds or ``memory_gib`` of resident memory
    is killed and reported as such (a compiler that loops is a result naming its case, not a hang of the run).
    ``progress``: each result printed to stderr as a JSON line as it comes."""
    cases = [{**DEFAULT_CASE, **case} for case in cases]
    results: dict[str, dict[str, Any]] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1",
           "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    for python in dict.fromkeys(python_for(case["target"]) for case in cases):
        if python is None:
            raise RuntimeError("no environment for a case's target: set JDROP_TPU_PYTHON / JDROP_GPU_PYTHON")
        names = [json.dumps(case) for case in cases if python_for(case["target"]) == python]
        def report(outcome: _watchdog.Result) -> None:
            print(json.dumps(outcome.info or vars(outcome)), file=sys.stderr, flush=True)

        watched = _watchdog.run_jobs([python, "-m", "benchmarks.accelerator_tiles", "worker"], names,
                                     timeout_s=timeout, max_rss_bytes=int(memory_gib * 2**30), env=env,
                                     on_result=report if progress else None)
        for name, outcome in watched.items():
            results[name] = outcome.info if outcome.status in ("ok", "error") else {
                "case": json.loads(name), "ok": False, "error": outcome.status, "message": outcome.message,
                "seconds": round(outcome.seconds, 1)}
    return [results[json.dumps(case)] for case in cases]


def run_case(case: dict[str, Any], *, timeout: float = 150, memory_gib: float = 8) -> dict[str, Any]:
    """:func:`run_cases` of one case."""
    return run_cases([case], timeout=timeout, memory_gib=memory_gib)[0]


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


SMEM_TILES = (16, 32, 64, 128, 256)
SMEM_VARIANTS: tuple[dict[str, Any], ...] = (
    {"rate": 0.0}, {"dropout_mask": "fast16"}, {"dropout_mask": "fast8"}, {"dropout_mask": "hash8"},
    {"causal": True}, {"bias": True}, {"mask": True}, {"bias": True, "mask": True, "rate": 0.0},
    {"heads": 4, "kv_heads": 2}, {"dtype": "float16"})
"""Options that change the kernels' code, each measured over the whole tile grid at head dim 128."""


def _write_shared_memory(path: Path, results: list[dict[str, Any]]) -> None:
    """The grid's results, one compact row per case: the case's non-default options and each kernel's bytes."""
    rows = []
    for result in results:
        case = {k: v for k, v in result["case"].items() if v != DEFAULT_CASE.get(k) or k in ("dtype", "depth")}
        for k in ("target", "length", "shared_memory", "unchecked"):
            case.pop(k, None)
        row: dict[str, Any] = {"case": case}
        if result.get("ok"):
            row["kernels"] = {k["kernel"].removeprefix("jdrop_attention_"): [k["num_warps"], k["shared_memory_bytes"]]
                              for k in result["kernels"]}
        else:
            row["error"] = f"{result.get('error')}: {result.get('message', '')}"[:300]
        rows.append(row)
    header = {"command": "JDROP_GPU_PYTHON=... PYTHONPATH=. python -m benchmarks.accelerator_tiles shared-memory "
                         "--jobs 2",
              "what": "shared memory (bytes) of each Triton kernel of value_and_grad, [num_warps, bytes], by the "
                      "Triton of jax-cuda12-plugin for sm_90a (XLA:GPU refuses a kernel past 232448 bytes); "
                      "defaults: T=512, B=1, H=1, dropout 0.1 exact, non-causal, no bias/mask",
              "toolchains": {"jax": "0.10.2", "jax-cuda12-plugin": "0.10.2"},
              "checked_by": "tests/test_shared_memory_model.py (jdrop.attention._pallas.shared_memory_estimate)"}
    path.write_text(json.dumps({**header, "results": rows}, indent=None, separators=(",", ":")).replace(
        '{"case"', '\n{"case"') + "\n")


def shared_memory_cases() -> list[dict[str, Any]]:
    """The H100 shared-memory grid, value_and_grad (so every kernel): ``block_q``, ``block_k`` in
    :data:`SMEM_TILES` at head dims 64 and 128, bfloat16 and float32, exact dropout; tiles up to 128 (larger ones
    need more than the limit there) at head dim 256 (both dtypes) and 96 (bfloat16; padded to 128 for Triton); and
    each of :data:`SMEM_VARIANTS` at head dim 128, tiles 32 to 128, in bfloat16 (float32 too for no dropout and a
    bias)."""
    base = {"target": "h100", "length": 512, "shared_memory": True, "unchecked": True}
    tiles = [(bq, bk) for bq in SMEM_TILES for bk in SMEM_TILES]
    small = [(bq, bk) for bq, bk in tiles if max(bq, bk) <= 128]
    middle = [(bq, bk) for bq, bk in small if min(bq, bk) >= 32]
    cases = [{**base, "dtype": dtype, "depth": depth, "block_q": bq, "block_k": bk}
             for depth in (64, 128) for dtype in ("bfloat16", "float32") for bq, bk in tiles]
    cases += [{**base, "dtype": dtype, "depth": 256, "block_q": bq, "block_k": bk}
              for dtype in ("bfloat16", "float32") for bq, bk in small]
    cases += [{**base, "dtype": "bfloat16", "depth": 96, "block_q": bq, "block_k": bk} for bq, bk in small]
    for variant in SMEM_VARIANTS:
        dtypes = [variant.get("dtype", "bfloat16")]
        dtypes += ["float32"] if variant in ({"rate": 0.0}, {"bias": True}) else []
        least = 64 if variant.get("dropout_mask") == "fast8" else 16  # fast8's row groups: block_q >= 64
        cases += [{**base, "dtype": dtype, "depth": 128, "block_q": bq, "block_k": bk, **variant}
                  for dtype in dtypes for bq, bk in middle if bq >= least]
    return cases


def _parallel(cases: list[dict[str, Any]], jobs: int, timeout: float) -> list[dict[str, Any]]:
    """:func:`run_cases` over ``jobs`` workers at once (each still watched), results in the cases' order."""
    import concurrent.futures

    chunks = [cases[i::jobs] for i in range(jobs)]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        done = list(pool.map(lambda chunk: run_cases(chunk, timeout=timeout, progress=True), chunks))
    results = [None] * len(cases)
    for i, chunk in enumerate(done):
        results[i::jobs] = chunk
    return results  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("case", help="compile one case here and print its result as a JSON line")
    one.add_argument("case", help="JSON object overriding DEFAULT_CASE")
    sub.add_parser("worker", help="compile the cases on stdin (JSON lines) for the watchdog (benchmarks._watchdog)")
    many = sub.add_parser("sweep", help="the tile ladders, each case in a subprocess under a watchdog")
    many.add_argument("--targets", nargs="+", default=[*GPU_TARGETS, *TPU_TARGETS])
    many.add_argument("--timeout", type=float, default=150)
    many.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accelerator_tiles.json")
    smem = sub.add_parser("shared-memory", help="the H100 shared-memory grid (shared_memory_cases), watched")
    smem.add_argument("--jobs", type=int, default=1, help="workers at once (compiles run one at a time in each)")
    smem.add_argument("--timeout", type=float, default=300)
    smem.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "h100_shared_memory.json")
    args = parser.parse_args(argv)
    if args.command == "case":
        print(json.dumps(compile_case(json.loads(args.case))), flush=True)
        return
    if args.command == "worker":
        _worker()
        return
    if args.command == "shared-memory":
        _write_shared_memory(args.out, _parallel(shared_memory_cases(), args.jobs, args.timeout))
        return
    targets = [t for t in args.targets if python_for(t)]
    results = run_cases(sweep_cases(targets), timeout=args.timeout, progress=True)
    args.out.write_text(json.dumps({"command": "python -m benchmarks.accelerator_tiles sweep", "results": results},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
