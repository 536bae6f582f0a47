"""``value_and_grad`` of dropout with each PRNG implementation: jdrop's residual policies against plain bernoulli.

``python -m benchmarks.key_impls`` times ``jit(value_and_grad(lambda x: vdot(dropout(key, x, 0.5), c)))`` on a
2048 x 2048 float32 input for typed keys of threefry2x32, rbg and unsafe_rbg, with

- ``bernoulli``: ``where(jax.random.bernoulli(key, 0.5, x.shape), x / 0.5, 0)``, differentiated by JAX (it keeps
  the bool mask for the backward pass): the reference, what flax's and equinox's Dropout compile to;
- ``jdrop[default]`` (``residual=None``: ``"key"`` for threefry, ``"mask"`` for the others) and ``jdrop[key]``,
  ``jdrop[bits]``, ``jdrop[mask]``.

All candidates of all implementations run round-robin (a slow minute of a shared machine falls on every one);
each call is timed on its own and the median reported, with its ratio to ``bernoulli`` of the same key. The
result goes to ``benchmarks/results/key-impls-<machine>.json`` with the machine and its load average.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks._common import ROOT, log, machine_description, markdown_table, round_robin

SHAPE = (2048, 2048)
RATE = 0.5
IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
POLICIES = (None, "key", "bits", "mask")
REFERENCE = "bernoulli"


def candidates(impl: str, shape: tuple[int, ...] = SHAPE) -> dict[str, Callable[[], float]]:
    """Each candidate's one-call timer (seconds) for keys of ``impl``, compiled and warmed up."""
    import jax
    import jax.numpy as jnp

    import jdrop

    key = jax.random.key(0, impl=impl)
    x = jax.random.normal(jax.random.key(1), shape)
    c = jax.random.normal(jax.random.key(2), shape)

    def bernoulli(key: Any, x: jax.Array) -> jax.Array:
        return jnp.where(jax.random.bernoulli(key, 1.0 - RATE, x.shape), x / (1.0 - RATE), 0.0)

    ops: dict[str, Callable[[Any, jax.Array], jax.Array]] = {REFERENCE: bernoulli}
    for policy in POLICIES:
        ops[f"jdrop[{policy or 'default'}]"] = lambda key, x, policy=policy: jdrop.dropout(key, x, RATE,
                                                                                             residual=policy)
    timers = {}
    for name, op in ops.items():
        # c is an argument: a closed-over 2048 x 2048 constant would be folded into the program at compile time.
        step = jax.jit(jax.value_and_grad(lambda x, c, key, op=op: jnp.vdot(op(key, x), c)))
        jax.block_until_ready(step(x, c, key))

        def timer(step: Any = step) -> float:
            start = time.perf_counter()
            jax.block_until_ready(step(x, c, key))
            return time.perf_counter() - start

        timers[f"{impl} {name}"] = timer
    return timers


def measure(rounds: int, shape: tuple[int, ...] = SHAPE) -> dict[str, Any]:
    """Median milliseconds per call of every candidate, and its ratio to bernoulli with the same implementation."""
    import os

    timers = {name: timer for impl in IMPLS for name, timer in candidates(impl, shape).items()}
    load_before = os.getloadavg()
    times = round_robin(timers, rounds)
    rows = []
    for impl in IMPLS:
        reference = statistics.median(times[f"{impl} {REFERENCE}"])
        for name in [n for n in timers if n.startswith(f"{impl} ")]:
            median = statistics.median(times[name])
            rows.append({"impl": impl, "candidate": name.split(" ", 1)[1], "median_ms": 1e3 * median,
                         "ratio_to_bernoulli": median / reference})
    return {"shape": list(shape), "rate": RATE, "rounds": rounds, "rows": rows, "load_before": load_before,
            "load_after": os.getloadavg(), "machine": machine_description()}


def table(result: dict[str, Any]) -> str:
    """The markdown table of BENCHMARKS.md."""
    rows = [[row["impl"], row["candidate"], f"{row['median_ms']:.1f}", f"{row['ratio_to_bernoulli']:.2f}"]
            for row in result["rows"]]
    return markdown_table(["key", "candidate", "median ms", "/ bernoulli"], rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="a tiny input and 2 rounds (the smoke test)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "key-impls-cpu-2core.json"))
    args = parser.parse_args(argv)
    shape = (64, 64) if args.quick else SHAPE
    result = measure(2 if args.quick else args.rounds, shape)
    print(table(result))
    if not args.quick:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
