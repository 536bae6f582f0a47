"""Attention benchmark: memory and time of a training step of one attention call with dropout.

``python -m benchmarks --only attention`` (or the worker itself, ``python -m benchmarks.attention
--framework all``) measures, in one process, the step ``jit(grad(vdot(attention(q, k, v), dout)))``
for q, k, v of shape (B=4, T, H=8, D=64) and dropout rate 0.1, for:

- ``jdrop.dot_product_attention``: blockwise, the mask drawn tile by tile (flax's mask);
- ``flax.linen (dropout)``: ``flax.linen.dot_product_attention`` with dropout (the reference);
- ``flax.linen (no dropout)``: the same without dropout (what dropout costs flax);
- ``jdrop.attention_dropout``: flax's probabilities (``dot_product_attention_weights``) dropped by
  ``jdrop.attention_dropout`` (the mask regenerated from the key, the probabilities still stored);
- ``torch SDPA (dropout)``: ``torch.nn.functional.scaled_dot_product_attention(dropout_p=0.1)``
  forward and backward, timed only (when torch is installed).

All use flax's default ``broadcast_dropout=True`` (one (T, T) mask for all batch rows and heads).
Memory is XLA's ``compiled.memory_analysis()`` (deterministic: the step is compiled from abstract
shapes, never run): ``temp`` is the temporary memory beyond arguments and outputs, ``total`` adds
them, and the longest T whose total fits in 16 GiB is found by doubling, then bisecting, T. Times
are medians of steps run round-robin (step ``r`` of every variant before step ``r + 1`` of any), so
a slow minute of a shared machine slows every variant alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks._common import MiB, log, markdown_table, round_robin, worker_main

BATCH, HEADS, DEPTH, RATE = 4, 8, 64, 0.1
FRAMEWORKS = ("all",)
"""One worker measures every variant (round-robin timing needs them in one process)."""
JDROP, FLAX, FLAX_PLAIN, CORE, TORCH = (
    "jdrop.dot_product_attention",
    "flax.linen (dropout)",
    "flax.linen (no dropout)",
    "jdrop.attention_dropout",
    "torch SDPA (dropout)",
)
REFERENCE = FLAX
MEMORY_LENGTHS = {False: (256, 512, 1024, 2048, 4096, 8192), True: (64, 128, 256)}
TIME_LENGTHS = {False: (256, 512, 1024, 2048, 4096, 8192), True: (64, 128)}
QUADRATIC_TIME_LIMIT = {False: 2048, True: 128}
"""The longest T timed for the variants that store (B, H, T, T) arrays (flax at 4096 needs ~9 GiB)."""
ROUNDS = {256: 9, 512: 9, 1024: 7, 2048: 5, 4096: 3, 8192: 2}
BUDGET_BYTES = 16 * 2**30
FIT_SEARCH_LIMIT = 2**20


def _attention_functions() -> dict[str, Callable[..., Any]]:
    """The JAX variants: ``fn(q, k, v) -> out`` with q, k, v of shape (B, T, H, D)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import jdrop

    rng = jax.random.key(1)

    def core(q, k, v):
        weights = nn.dot_product_attention_weights(q, k)
        dropped = jdrop.attention_dropout(rng, weights, RATE, broadcast_dims=(0, 1))
        return jnp.einsum("...hqk,...khd->...qhd", dropped, v)

    return {
        JDROP: lambda q, k, v: jdrop.dot_product_attention(q, k, v, dropout_rng=rng, dropout_rate=RATE),
        FLAX: lambda q, k, v: nn.dot_product_attention(q, k, v, dropout_rng=rng, dropout_rate=RATE),
        FLAX_PLAIN: lambda q, k, v: nn.dot_product_attention(q, k, v),
        CORE: core,
    }


def _step(fn: Callable[..., Any]) -> Any:
    """The jitted training step of one attention call: gradients of ``vdot(fn(q, k, v), dout)``."""
    import jax
    import jax.numpy as jnp

    return jax.jit(jax.grad(lambda q, k, v, dout: jnp.vdot(fn(q, k, v), dout), argnums=(0, 1, 2)))


def _specs(length: int) -> list[Any]:
    import jax
    import jax.numpy as jnp

    return [jax.ShapeDtypeStruct((BATCH, length, HEADS, DEPTH), jnp.float32)] * 4


def compiled_memory(fn: Callable[..., Any], length: int) -> dict[str, Any]:
    """Temporary and total bytes of the step at ``length`` (compiled from abstract shapes, not run)."""
    start = time.perf_counter()
    analysis = _step(fn).lower(*_specs(length)).compile().memory_analysis()
    total = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
    return {
        "temp_bytes": analysis.temp_size_in_bytes,
        "total_bytes": total - analysis.alias_size_in_bytes,
        "compile_s": time.perf_counter() - start,
    }


def longest_fitting_length(fn: Callable[..., Any], start: int) -> int | None:
    """The longest T (to 1/16 of it) whose step fits in 16 GiB: doubling from ``start``, then bisection."""

    def fits(length: int) -> bool:
        return compiled_memory(fn, length)["total_bytes"] <= BUDGET_BYTES

    if not fits(start):
        return None
    low = start
    while 2 * low <= FIT_SEARCH_LIMIT and fits(2 * low):
        low *= 2
    if 2 * low > FIT_SEARCH_LIMIT:
        return low
    high, step = 2 * low, max(low // 16, 1)
    while high - low > step:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _torch_step(length: int) -> Callable[[], float] | None:
    """One timed forward + backward of torch's SDPA with dropout, or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, length, DEPTH, generator=generator, requires_grad=True) for _ in range(3))
    dout = torch.randn(BATCH, HEADS, length, DEPTH, generator=generator)

    def run() -> float:
        start = time.perf_counter()
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=RATE)
        torch.autograd.grad(out, (q, k, v), dout)
        return time.perf_counter() - start

    return run


def _jax_step(fn: Callable[..., Any], length: int) -> Callable[[], float]:
    import jax

    keys = jax.random.split(jax.random.key(0), 4)
    args = [jax.random.normal(key, (BATCH, length, HEADS, DEPTH)) for key in keys]
    step = _step(fn)

    def run() -> float:
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        return time.perf_counter() - start

    return run


def measure(framework: str, quick: bool) -> dict[str, Any]:
    """Memory at every length, the longest length in 16 GiB, and round-robin step times: the worker's result."""
    del framework  # one worker for all variants
    functions = _attention_functions()
    records: list[dict[str, Any]] = []
    for name, fn in functions.items():
        for length in MEMORY_LENGTHS[quick]:
            result = compiled_memory(fn, length)
            records.append({"kind": "memory", "name": name, "length": length, **result})
            log(f"  {name:28s} T={length:5d}: temp {result['temp_bytes'] / MiB:9.1f} MiB")
    if not quick:
        for name, fn in functions.items():
            longest = longest_fitting_length(fn, MEMORY_LENGTHS[quick][0])
            records.append({"kind": "fit", "name": name, "longest_length": longest})
            log(f"  {name:28s} longest T in 16 GiB: {longest}")
    for length in TIME_LENGTHS[quick]:
        quadratic_ok = length <= QUADRATIC_TIME_LIMIT[quick]
        runners: dict[str, Callable[[], float]] = {
            name: _jax_step(fn, length) for name, fn in functions.items() if name == JDROP or quadratic_ok
        }
        torch_step = _torch_step(length) if quadratic_ok else None
        if torch_step is not None:
            runners[TORCH] = torch_step
        first = {name: run() for name, run in runners.items()}  # compilation + the first step
        times = round_robin(runners, 2 if quick else ROUNDS[length])
        for name, ts in times.items():
            records.append(
                {
                    "kind": "time",
                    "name": name,
                    "length": length,
                    "median_ms": statistics.median(ts) * 1e3,
                    "min_ms": min(ts) * 1e3,
                    "runs": len(ts),
                    "first_call_ms": first[name] * 1e3,
                }
            )
            log(f"  {name:28s} T={length:5d}: {statistics.median(ts) * 1e3:9.1f} ms / step")
    return {"framework": "all", "records": records}


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, T): temp MiB, its ratio to flax's, step time and its ratio to flax's."""
    memory = {(r["name"], r["length"]): r for r in records if r["kind"] == "memory"}
    times = {(r["name"], r["length"]): r for r in records if r["kind"] == "time"}
    fits = {r["name"]: r["longest_length"] for r in records if r["kind"] == "fit"}
    names = list(dict.fromkeys(r["name"] for r in records))
    lengths = sorted({length for _, length in (*memory, *times)})
    rows = []
    for name in names:
        for length in lengths:
            mem, timing = memory.get((name, length)), times.get((name, length))
            if mem is None and timing is None:
                continue
            reference_mem, reference_time = memory.get((REFERENCE, length)), times.get((REFERENCE, length))
            rows.append(
                {
                    "name": name,
                    "length": length,
                    "temp_mib": mem["temp_bytes"] / MiB if mem else None,
                    "temp_vs_flax": mem["temp_bytes"] / reference_mem["temp_bytes"] if mem and reference_mem else None,
                    "median_ms": timing["median_ms"] if timing else None,
                    "time_vs_flax": timing["median_ms"] / reference_time["median_ms"]
                    if timing and reference_time
                    else None,
                    "longest_length_16gib": fits.get(name),
                }
            )
    return rows


def title(quick: bool) -> str:
    """The heading of the attention table."""
    size = "tiny sizes" if quick else f"B={BATCH}, H={HEADS}, D={DEPTH}"
    return f"Attention benchmark: training step of one attention call, dropout {RATE}, {size}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The attention benchmark as one Markdown table."""
    headers = ("variant", "T", "temp MiB", "temp x flax", "median ms / step", "time x flax", "longest T in 16 GiB")
    body = [
        (
            row["name"],
            row["length"],
            row["temp_mib"],
            row["temp_vs_flax"],
            row["median_ms"],
            row["time_vs_flax"],
            row["longest_length_16gib"],
        )
        for row in rows
    ]
    return markdown_table(headers, body)


if __name__ == "__main__":
    worker_main(__doc__.splitlines()[0], FRAMEWORKS, measure, None)
