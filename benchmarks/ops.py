"""Op benchmark: one dropout call at rate 0.5, forward and value_and_grad, in every framework.

Each framework runs in its own worker process (``python -m benchmarks.ops --framework NAME``).
Two modes are timed, each jitted and after warm-up, as the median of many runs:

- ``fwd``: ``y = dropout(key, x)``. An ideal implementation reads ``x`` and writes ``y``:
  8 bytes per float32 element.
- ``vag``: ``jax.value_and_grad(lambda x: vdot(dropout(key, x), c))`` with a fixed cotangent
  ``c`` (a real array, as in a network, rather than the constant ones of ``sum``). An ideal
  implementation reads ``x`` and ``c`` and writes ``dx``: 12 bytes per element.

The reference ``copy`` is ``x * 2.0`` in the same two modes: what the memory system allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from benchmarks._common import cpu_count, format_number, log, markdown_table, time_call, worker_main

RATE = 0.5
FULL_SHAPES = ((4096, 4096), (256, 1024))
QUICK_SHAPES = ((1024, 1024), (256, 1024))
MODES = ("fwd", "vag")
BYTES_PER_ELEMENT = {"fwd": 8, "vag": 12}
"""Bytes an ideal float32 implementation moves per element: fwd reads x, writes y; vag also reads c."""

FRAMEWORKS = ("copy", "jdrop", "flax.linen", "flax.nnx", "equinox", "haiku", "jax.random", "torch")
BASELINE = "flax.linen.Dropout"
COPY = "copy (x * 2.0)"

DropoutFn = Callable[[Any, Any], Any]
"""``fn(key, x) -> y``: one framework's dropout at rate :data:`RATE`, training mode."""


def is_large(shape: Sequence[int]) -> bool:
    """Whether an array of ``shape`` is large (4 Mi elements or more): fewer timed runs suffice."""
    return math.prod(shape) >= 2**22


def run_counts(shape: Sequence[int], quick: bool) -> dict[str, Any]:
    """How long to time a measurement (``time_call`` keywords): 20 runs for a large array.

    A small array gets up to 200 runs, at least 30, and stops once the runs took 5 seconds.
    """
    if quick:
        return {"runs": 5} if is_large(shape) else {"runs": 30}
    return {"runs": 20} if is_large(shape) else {"runs": 200, "min_runs": 30, "budget_s": 5.0}


# ------------------------------------------------------------------------------------- candidates


def jax_candidates(framework: str) -> dict[str, DropoutFn]:
    """The dropout functions ``fn(key, x)`` of a JAX framework, by display name.

    Imports happen here, so a framework that is not installed fails only its own worker.
    """
    if framework == "copy":
        return {COPY: lambda key, x: x * 2.0}
    if framework == "jdrop":
        import jdrop

        return {f"jdrop[{p}]": partial(jdrop.dropout, rate=RATE, residual=p) for p in ("key", "bits", "mask")}
    if framework == "flax.linen":
        import flax.linen as nn

        module = nn.Dropout(RATE, deterministic=False)
        return {BASELINE: lambda key, x: module.apply({}, x, rngs={"dropout": key})}
    if framework == "flax.nnx":
        from flax import nnx

        layer = nnx.Dropout(RATE, deterministic=False)
        return {"flax.nnx.Dropout": lambda key, x: layer(x, rngs=key)}
    if framework == "equinox":
        import equinox as eqx

        layer = eqx.nn.Dropout(RATE)
        return {"equinox.nn.Dropout": lambda key, x: layer(x, key=key, inference=False)}
    if framework == "haiku":
        import haiku as hk

        return {"hk.dropout": lambda key, x: hk.dropout(key, RATE, x)}
    if framework == "jax.random":
        return {"bernoulli + where": _bernoulli_dropout}
    raise ValueError(f"{framework!r} is not a JAX framework")


def _bernoulli_dropout(key: Any, x: Any) -> Any:
    """Dropout as one writes it by hand: a bernoulli mask and a select."""
    import jax
    import jax.numpy as jnp

    keep = 1.0 - RATE
    return jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep, 0.0)


# ------------------------------------------------------------------------------------- timing


def time_jax(fn: DropoutFn, shape: Sequence[int], mode: str, **counts: Any) -> dict[str, float]:
    """Times one JAX dropout function in one mode: jitted, after warm-up, median of many runs.

    ``counts`` are :func:`time_call`'s ``runs``, ``min_runs``, ``budget_s`` and ``calls_per_run``
    (> 1 queues that many calls before blocking).
    """
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    key = jax.random.key(0)
    if mode == "fwd":
        step = jax.jit(fn)
        args: tuple[Any, ...] = (key, x)
    else:
        cotangent = jax.random.normal(jax.random.key(2), shape, jnp.float32)
        step = jax.jit(jax.value_and_grad(lambda x, c, key: jnp.vdot(fn(key, x), c)))
        args = (x, cotangent, key)
    return time_call(lambda: step(*args), jax.block_until_ready, **counts)


def time_torch(shape: Sequence[int], mode: str, threads: int, **counts: Any) -> dict[str, float]:
    """Times ``torch.nn.functional.dropout`` on CPU, float32, in one mode (eager, median of many runs)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    if mode == "fwd":

        def call() -> Any:
            with torch.no_grad():
                return F.dropout(x, RATE, training=True)

    else:
        cotangent = torch.randn(*shape, generator=generator)
        x.requires_grad_(True)

        def call() -> Any:
            loss = torch.vdot(F.dropout(x, RATE, training=True).reshape(-1), cotangent.reshape(-1))
            (dx,) = torch.autograd.grad(loss, x)
            return loss.detach(), dx

    return time_call(call, lambda out: out, **counts)


def torch_candidates() -> dict[str, int]:
    """Thread counts to run torch with, by display name: one per core, and one thread.

    One thread is there too because torch's thread pool, unlike XLA's, loses badly when other
    processes compete for the cores.
    """
    cores = cpu_count()
    candidates = {f"torch F.dropout ({cores} threads)": cores}
    if cores > 1:
        candidates["torch F.dropout (1 thread)"] = 1
    return candidates


def measure(framework: str, quick: bool) -> dict[str, Any]:
    """Every candidate of ``framework`` at every shape and mode: the worker's result."""
    if framework == "torch":
        candidates: dict[str, Any] = torch_candidates()
    else:
        import jax

        candidates = jax_candidates(framework)
        log(f"{framework}: JAX backend {jax.default_backend()}")
    records = []
    for shape in QUICK_SHAPES if quick else FULL_SHAPES:
        for name, candidate in candidates.items():
            for mode in MODES:
                counts = run_counts(shape, quick)
                if framework == "torch":
                    timing = time_torch(shape, mode, threads=candidate, **counts)
                else:
                    timing = time_jax(candidate, shape, mode, **counts)
                records.append({"framework": framework, "name": name, "shape": list(shape), "mode": mode, **timing})
                log(f"  {name:28s} {'x'.join(map(str, shape)):>10s} {mode}: {timing['median_ms']:9.3f} ms")
    return {"framework": framework, "records": records}


# ------------------------------------------------------------------------------------- summary


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds to each record its speed-up over flax.linen, its time over copy, and its GB/s.

    ``speedup_vs_flax = t(flax.linen) / t``; ``vs_copy = t / t(copy)``; ``gb_per_s`` counts the
    bytes an ideal implementation moves (:data:`BYTES_PER_ELEMENT`).
    """
    by_key = {(r["name"], tuple(r["shape"]), r["mode"]): r for r in records}
    summary = []
    for record in records:
        shape, mode = tuple(record["shape"]), record["mode"]
        median = record["median_ms"]
        flax = by_key.get((BASELINE, shape, mode))
        copy = by_key.get((COPY, shape, mode))
        summary.append(
            {
                **record,
                "speedup_vs_flax": flax["median_ms"] / median if flax else None,
                "vs_copy": median / copy["median_ms"] if copy else None,
                "gb_per_s": BYTES_PER_ELEMENT[mode] * math.prod(shape) / (median * 1e6),
            }
        )
    return summary


def title(quick: bool) -> str:
    """The heading of the op table."""
    shapes = ", ".join("x".join(map(str, shape)) for shape in (QUICK_SHAPES if quick else FULL_SHAPES))
    return f"Op benchmark: dropout at rate {RATE}, float32, shapes {shapes}"


def table(summary: Sequence[dict[str, Any]]) -> str:
    """One Markdown table of the op benchmark, grouped by shape and mode."""
    headers = ("shape", "mode", "implementation", "median ms", "p25-p75 ms", "speed-up vs flax.linen", "x copy", "GB/s")
    rows = [
        (
            "x".join(map(str, r["shape"])),
            r["mode"],
            r["name"],
            r["median_ms"],
            f"{format_number(r['p25_ms'])}-{format_number(r['p75_ms'])}",
            r["speedup_vs_flax"],
            r["vs_copy"],
            r["gb_per_s"],
        )
        for r in sorted(summary, key=lambda r: (-math.prod(r["shape"]), MODES.index(r["mode"])))
    ]
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> None:
    """Worker entry point: ``python -m benchmarks.ops --framework NAME [--quick] [--out PATH]``."""
    worker_main(__doc__.splitlines()[0], FRAMEWORKS, measure, argv)


if __name__ == "__main__":
    main()
