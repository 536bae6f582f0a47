"""Sequence-parallel attention benchmark: per-device memory, step time and balance of the ring on 1-8 devices.

``python -m benchmarks --only sequence_parallel`` (or the worker, ``python -m benchmarks.sequence_parallel
--framework all``, which starts JAX with ``--xla_force_host_platform_device_count=8``) measures the training
step ``jit(grad(vdot(jdrop.sequence_parallel_attention(q, k, v), dout)))``, causal, dropout 0.1, for q, k, v
of shape (B=1, T, H=4, D=64) with the sequence sharded over N simulated CPU devices, in both layouts:

- ``contiguous``: device d holds positions [d T/N, (d + 1) T/N); the steps above the diagonal are skipped;
- ``zigzag`` (``load_balance=True``, the default for causal attention): device d holds chunks d and 2N - 1 - d
  of 2N.

Memory is XLA's ``compiled.memory_analysis()`` of the SPMD program, which is per device (exact,
deterministic: compiled from abstract shapes). Balance is counted from the ring's own schedule
(``jdrop.attention._ring``) and the kernel's tile loops: the attention weights (visited tiles x tile size,
masked parts of diagonal tiles included) that each device computes at each step of the forward pass. The
ring advances in lock step (a device waits for the next shard), so a step lasts as long as its busiest
device: the critical path is the sum over steps of the largest count, and the balance is
``total / (N x critical path)`` (1 = every device busy at every step).

Times are medians of steps run round-robin over the N values in one process. The simulated devices are
threads sharing this machine's cores, so they measure total work and overheads, not a speed-up: N devices
here do not compute N times faster. They show the price of the ring's extra steps and transfers.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from benchmarks._common import MiB, log, markdown_table, round_robin, worker_main

FRAMEWORKS = ("all",)
"""One worker measures every configuration (round-robin timing needs them in one process)."""
DEVICES = (1, 2, 4, 8)
LAYOUTS = ("contiguous", "zigzag")
BATCH, HEADS, DEPTH, RATE = 1, 4, 64, 0.1
LENGTHS = {False: {"memory": (4096, 16384), "time": 4096}, True: {"memory": (256,), "time": 256}}
ROUNDS = {False: 3, True: 2}
BLOCK_Q, BLOCK_K = 256, 128  # jdrop's defaults
MIN_TIMEOUT_S = 1800.0


def schedule_work(layout: str, devices: int, length: int, block_q: int = BLOCK_Q,
                  block_k: int = BLOCK_K) -> list[list[int]]:
    """Attention weights each device computes at each ring step of causal attention: ``work[step][device]``.

    Whole tiles count (``block_q x block_k`` each, the masked part of a diagonal tile too).

    Evaluated from the ring's schedule (:func:`jdrop.attention._ring._schedule`) and the kernel's per-row
    tile counts (:func:`jdrop.attention._kernel._visible_k_blocks`) at concrete positions.
    """
    from jdrop.attention import _kernel, _ring

    layout = layout if devices > 1 else "contiguous"
    chunks = _ring.chunks_of(layout, devices, length // devices, length // devices, True)
    chunk = length // devices // chunks
    ring = _ring.Ring("seq", devices, layout, chunks, chunk, chunk, None, None, None, None, 1, 1)
    bq, bk = min(block_q, chunk), min(block_k, chunk)
    cfg = _kernel.Config(block_q=bq, block_k=bk, k_length=chunk, group=1, causal=True, skip_causal=True,
                         dropout=_kernel.DropoutMode.NONE, dropout_shape=(1, 1, length, length), bias_full=(),
                         precision=None)
    diagonal_cfg, off_cfg = _ring._step_configs(cfg)
    n_q, n_k = math.ceil(chunk / bq), math.ceil(chunk / bk)
    work = []
    for step in range(devices):
        row = []
        for me in range(devices):
            src = (me - step) % devices
            step_cfg = diagonal_cfg if step == 0 else off_cfg
            q_index, k_index, visible = _ring._schedule(ring, cfg, step == 0, me, src)
            visible = [True] * len(q_index) if visible is None else [bool(v) for v in visible]
            q_starts = [int(s) for s in _ring.chunk_starts(layout, devices, me, chunk, chunks)]
            k_starts = [int(s) for s in _ring.chunk_starts(layout, devices, src, chunk, chunks)]
            tiles = 0
            for a, b, seen in zip(q_index, k_index, visible):
                if seen:
                    offsets = _kernel.Offsets(q=q_starts[int(a)], k=k_starts[int(b)])
                    tiles += sum(max(0, int(_kernel._visible_k_blocks(step_cfg, i, n_k, offsets))) for i in range(n_q))
            row.append(tiles * bq * bk)
        work.append(row)
    return work


def balance(work: list[list[int]]) -> dict[str, Any]:
    """Total weights, the critical path (sum over steps of the busiest device) and ``total / (N x critical)``."""
    total = sum(map(sum, work))
    critical = sum(map(max, work))
    return {"weights": total, "critical_weights": critical, "balance": total / (len(work[0]) * critical)}


def _step(mesh: Any, layout: str) -> Any:
    import jax
    import jax.numpy as jnp

    import jdrop

    def loss(q: Any, k: Any, v: Any, d_out: Any) -> Any:
        out = jdrop.sequence_parallel_attention(q, k, v, mesh=mesh, dropout_rng=jax.random.key(1), dropout_rate=RATE,
                                                is_causal=True, load_balance=layout == "zigzag")
        return jnp.vdot(out, d_out)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _mesh(devices: int) -> Any:
    import jax
    import numpy as np
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()[:devices]), ("seq",))


def _specs(mesh: Any, length: int) -> list[Any]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(None, "seq"))
    return [jax.ShapeDtypeStruct((BATCH, length, HEADS, DEPTH), jnp.float32, sharding=sharding)] * 4


def measure(framework: str, quick: bool) -> dict[str, Any]:
    """Memory and balance of every (layout, N, T), and round-robin step times at one T: the worker's result."""
    del framework
    import jax
    import numpy as np

    assert jax.device_count() >= max(DEVICES), "run as python -m benchmarks.sequence_parallel (8 CPU devices)"
    records: list[dict[str, Any]] = []
    for length in LENGTHS[quick]["memory"]:
        for layout in LAYOUTS:
            for devices in DEVICES:
                mesh = _mesh(devices)
                start = time.perf_counter()
                analysis = _step(mesh, layout).lower(*_specs(mesh, length)).compile().memory_analysis()
                record = {"kind": "memory", "layout": layout, "devices": devices, "length": length,
                          "temp_bytes": analysis.temp_size_in_bytes,
                          "argument_bytes": analysis.argument_size_in_bytes,
                          "compile_s": time.perf_counter() - start,
                          **balance(schedule_work(layout, devices, length))}
                records.append(record)
                log(f"  {layout:10s} N={devices} T={length:6d}: temp {record['temp_bytes'] / MiB:8.1f} MiB per device, "
                    f"balance {record['balance']:.2f}")
    length = LENGTHS[quick]["time"]
    runners = {}
    for layout in LAYOUTS:
        for devices in DEVICES:
            mesh = _mesh(devices)
            specs = _specs(mesh, length)
            args = [jax.device_put(np.random.default_rng(i).standard_normal(s.shape).astype(np.float32), s.sharding)
                    for i, s in enumerate(specs)]
            step = _step(mesh, layout)

            def run(step: Any = step, args: list[Any] = args) -> float:
                start = time.perf_counter()
                jax.block_until_ready(step(*args))
                return time.perf_counter() - start

            first = run()
            log(f"  {layout:10s} N={devices} T={length}: first step (compile + run) {first:.1f} s")
            runners[(layout, devices)] = run
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    times = round_robin({f"{layout}/{devices}": run for (layout, devices), run in runners.items()}, ROUNDS[quick])
    for name, ts in times.items():
        layout, devices = name.split("/")
        records.append({"kind": "time", "layout": layout, "devices": int(devices), "length": length,
                        "median_s": statistics.median(ts), "min_s": min(ts), "runs": len(ts), "load_average": load})
        log(f"  {name:14s} T={length}: {statistics.median(ts):.2f} s / step")
    return {"framework": "all", "records": records}


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (T, layout, N): per-device temp MiB and its ratio to N=1, balance, and step time."""
    memory = {(r["length"], r["layout"], r["devices"]): r for r in records if r["kind"] == "memory"}
    times = {(r["length"], r["layout"], r["devices"]): r for r in records if r["kind"] == "time"}
    rows = []
    for key in sorted(set(memory) | set(times)):
        length, layout, devices = key
        mem, timing = memory.get(key), times.get(key)
        one = memory.get((length, layout, 1))
        rows.append({
            "length": length,
            "layout": layout,
            "devices": devices,
            "temp_mib": mem["temp_bytes"] / MiB if mem else None,
            "temp_vs_one_device": mem["temp_bytes"] / one["temp_bytes"] if mem and one else None,
            "critical_mweights": mem["critical_weights"] / 1e6 if mem else None,
            "balance": mem["balance"] if mem else None,
            "median_s": timing["median_s"] if timing else None,
        })
    return rows


def title(quick: bool) -> str:
    """The heading of the sequence-parallel table."""
    size = "tiny sizes" if quick else f"B={BATCH}, H={HEADS}, D={DEPTH}"
    return (f"Sequence-parallel attention: causal training step, dropout {RATE}, {size}, N simulated CPU devices "
            "(memory per device is exact; times share this machine's cores: not a speed-up)")


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The sequence-parallel benchmark as one Markdown table."""
    headers = ("T", "layout", "N", "temp MiB / device", "temp x N=1", "critical path (M weights)", "balance",
               "median s / step")
    body = [(r["length"], r["layout"], r["devices"], r["temp_mib"], r["temp_vs_one_device"], r["critical_mweights"],
             r["balance"], r["median_s"]) for r in rows]
    return markdown_table(headers, body)


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    worker_main(__doc__.splitlines()[0], FRAMEWORKS, measure, None)
