"""What the attention dropout mask costs: integer ops per element, counted, and step times, measured.

``python -m benchmarks.attention_mask`` prints three tables:

1. Ops per attention element of the mask of each ``dropout_mask`` mode (``"exact"``: one threefry-2x32 call per
   element, flax's mask; ``"fast16"`` / ``"fast8"``: one call per 4 / 8 elements), counted from the jaxpr of
   the tile function the xla path and the Pallas kernels share (``keep_factors``): every equation's output
   elements, by primitive, divided by the tile's elements. Integer and bool results are the mask's arithmetic;
   iotas, broadcasts, reshapes and int32/uint32 conversions (bit casts on every target) are listed apart as
   layout; the float ops are the final select of the factor.
2. The mask draw alone: one call's per-head factors ``(B, H, T, T)``, as XLA compiles the tile function (one
   fusion), per mode, round-robin.
3. The training step (forward and backward) of ``jdrop.dot_product_attention`` (the xla path) on this machine
   for each mode, timed round-robin in one process (B=4, H=8, D=64, rate 0.1, per-head dropout, the costliest
   for the mask, and flax's default broadcast dropout), with the no-dropout step as the reference.

On a CPU the threefry runs on the vector units beside the products, so the ratio of step times is a lower
bound of what the mask costs where the products run on tensor cores or an MXU (4 D flops per element there,
at a much higher rate than integer ops).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import log, machine_description, markdown_table, round_robin

MODES = ("exact", "fast16", "fast8")
LAYOUT = frozenset({"iota", "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "convert_element_type"})
TILE = (64, 128)
BATCH, HEADS, DEPTH, RATE = 4, 8, 64, 0.1


def _equations(jaxpr: Any):
    """Every equation of a jaxpr, nested jaxprs (pjit, closed calls) flattened."""
    from jax.extend import core

    for eqn in jaxpr.eqns:
        inner = list(core.jaxprs_in_params(eqn.params))
        if inner:
            for sub in inner:
                yield from _equations(sub)
        else:
            yield eqn


def ops_per_element(mode: str, tile: tuple[int, int] = TILE) -> dict[str, Any]:
    """Ops per element of one ``tile`` of the mask (per-head dropout), counted from the jaxpr.

    The tile function is the one both paths run: the rows that draw counters (``first_rows``), their flat indices
    in the ``(B * H * Tq, Tk)`` mask (``masks.index_words``), the keep decisions (``tile_keep``) and the factors.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from jdrop import masks
    from jdrop.attention import _dropout_mask

    n_rows, n_cols = tile

    def tile_factors(k0, k1, threshold, factor, head_row, row0, col0):
        rows = head_row + (row0 + _dropout_mask.first_rows(n_rows, mode)).astype(jnp.uint32)
        cols = (col0 + lax.broadcasted_iota(jnp.int32, (1, n_cols), 1)).astype(jnp.uint32)
        high, low = masks.index_words(rows, cols, 4096, n_rows=2**16)
        keep = _dropout_mask.tile_keep((k0, k1), high, low, threshold, mode)
        return jnp.where(keep, factor, jnp.zeros_like(factor))

    u32, i32 = jnp.zeros((), jnp.uint32), jnp.zeros((), jnp.int32)
    jaxpr = jax.make_jaxpr(tile_factors)(u32, u32, u32, jnp.zeros((), jnp.float32), u32, i32, i32).jaxpr
    elements = n_rows * n_cols
    integer: Counter[str] = Counter()
    layout: Counter[str] = Counter()
    floating: Counter[str] = Counter()
    for eqn in _equations(jaxpr):
        for var in eqn.outvars:
            size = math.prod(var.aval.shape)
            name = eqn.primitive.name
            if name in LAYOUT:
                layout[name] += size
            elif np.issubdtype(var.aval.dtype, np.integer) or var.aval.dtype == np.bool_:
                integer[name] += size
            else:
                floating[name] += size

    def per_element(counts: Counter[str]) -> dict[str, float]:
        return {name: count / elements for name, count in sorted(counts.items())}

    return {
        "mode": mode,
        "tile": list(tile),
        "integer_ops_per_element": sum(integer.values()) / elements,
        "layout_ops_per_element": sum(layout.values()) / elements,
        "float_ops_per_element": sum(floating.values()) / elements,
        "integer_by_primitive": per_element(integer),
        "layout_by_primitive": per_element(layout),
        "float_by_primitive": per_element(floating),
    }


def _timed(fn: Any, *args: Any) -> Any:
    """A runner for :func:`round_robin`: one call of the compiled ``fn`` (compiled here, outside the timing)."""
    import time

    import jax

    jax.block_until_ready(fn(*args))

    def run() -> float:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - start

    return run


def draw_times(length: int, rounds: int) -> list[dict[str, Any]]:
    """Median times (ms) of drawing one attention call's per-head mask factors alone, ``(B, H, T, T)``, per mode.

    The tile function of the ops count over the whole array as XLA compiles it (one fusion): what the mask
    itself costs on this machine, apart from the attention around it.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from jdrop import masks
    from jdrop.attention import _dropout_mask

    def draw(mode: str) -> Any:
        @jax.jit
        def factors(key_data: Any, threshold: Any, factor: Any) -> Any:
            heads = (jnp.arange(BATCH * HEADS, dtype=jnp.uint32) * np.uint32(length)).reshape(BATCH, HEADS, 1, 1)
            rows = heads + _dropout_mask.first_rows(length, mode).astype(jnp.uint32)
            cols = lax.broadcasted_iota(jnp.uint32, (1, length), 1)
            high, low = masks.index_words(rows, cols, length, n_rows=BATCH * HEADS * length)
            keep = _dropout_mask.tile_keep(key_data, high, low, threshold, mode)
            return jnp.where(keep, factor, jnp.zeros_like(factor))

        key = jax.random.key(1)
        if mode == "exact":
            threshold = masks.keep_threshold(jnp.float32(1 - RATE))
            operands = (jax.random.key_data(key), threshold, jnp.float32(1 / (1 - RATE)))
        else:
            operands = _dropout_mask.operands(key, RATE, jnp.float32, mode)
        return _timed(factors, *operands)

    times = round_robin({mode: draw(mode) for mode in MODES}, rounds)
    return [{"name": mode, "length": length, "median_ms": 1e3 * statistics.median(t),
             "vs_exact": statistics.median(a / b for a, b in zip(t, times["exact"]))} for mode, t in times.items()]


def step_times(length: int, rounds: int, broadcast: bool) -> list[dict[str, Any]]:
    """Median step times (ms) of the xla path per mode and without dropout, round-robin in one process."""
    import jax
    import jax.numpy as jnp

    import jdrop

    rng = jax.random.key(1)
    args = [jax.random.normal(key, (BATCH, length, HEADS, DEPTH)) for key in jax.random.split(jax.random.key(0), 4)]

    def step(**options: Any) -> Any:
        def loss(q: Any, k: Any, v: Any, dout: Any) -> Any:
            return jnp.vdot(jdrop.dot_product_attention(q, k, v, broadcast_dropout=broadcast, **options), dout)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    steps = {"no dropout": step()}
    steps.update({mode: step(dropout_rng=rng, dropout_rate=RATE, dropout_mask=mode) for mode in MODES})

    times = round_robin({name: _timed(fn, *args) for name, fn in steps.items()}, rounds)

    def paired(name: str, reference: str) -> float:
        """The median of per-round ratios: a slow round of a shared machine slows both steps of the pair."""
        return statistics.median(a / b for a, b in zip(times[name], times[reference]))

    return [{"name": name, "length": length, "broadcast_dropout": broadcast, "times_ms": [1e3 * x for x in t],
             "median_ms": 1e3 * statistics.median(t), "vs_no_dropout": paired(name, "no dropout"),
             "vs_exact": paired(name, "exact") if name != "no dropout" else None}
            for name, t in times.items()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, help="JSON path")
    args = parser.parse_args(argv)
    counts = [ops_per_element(mode) for mode in MODES]
    print("## Mask ops per attention element (counted from the jaxpr of one 64x128 tile)\n")
    print(markdown_table(("mode", "integer ops", "layout ops", "float ops"),
                         [(c["mode"], c["integer_ops_per_element"], c["layout_ops_per_element"],
                           c["float_ops_per_element"]) for c in counts]))
    log(f"timing the mask draw alone, T={args.length}")
    draws = draw_times(args.length, args.rounds)
    print(f"\n## Drawing one call's per-head mask factors alone, (B={BATCH}, H={HEADS}, T, T) at T={args.length}, "
          "round-robin\n")
    print(markdown_table(("mask", "median ms", "vs exact (paired)"),
                         [(r["name"], r["median_ms"], r["vs_exact"]) for r in draws]))
    records = []
    for broadcast in (False, True):
        log(f"timing T={args.length}, broadcast_dropout={broadcast}")
        records += step_times(args.length, args.rounds, broadcast)
    print(f"\n## xla path step time, T={args.length} (B={BATCH}, H={HEADS}, D={DEPTH}, rate {RATE}), round-robin\n")
    print(markdown_table(("mask", "broadcast_dropout", "median ms", "vs no dropout (paired)", "vs exact (paired)"),
                         [(r["name"], r["broadcast_dropout"], r["median_ms"], r["vs_no_dropout"], r["vs_exact"])
                          for r in records]))
    if args.out is not None:
        report = {"machine": machine_description(), "ops": counts, "draws": draws, "steps": records}
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
