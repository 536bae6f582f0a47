"""Memory benchmark: the compiled temporary memory and compile time of an MLP training step.

For each framework (one worker process each: ``python -m benchmarks.memory --framework NAME``)
the SGD step of :mod:`benchmarks.models` is lowered from abstract shapes (no data, no
parameters allocated) and compiled, at 4 and 8 hidden layers; XLA's
``compiled.memory_analysis()`` then says how many temporary bytes the step needs beyond its
arguments and outputs. Dropout's cost is the difference to the step without dropout, per
element that goes through dropout (``batch * width * depth``): 1 byte for a stored bool mask,
4 for stored random bits or a stored copy of the dropped activations, 0 when the backward pass
regenerates the mask from the key.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from benchmarks._common import MiB, log, markdown_table, worker_main
from benchmarks.models import BASELINE, FRAMEWORKS, Config, batch_specs, make_step, variants

FULL = {"batch": 512, "width": 4096}
QUICK = {"batch": 64, "width": 512}
DEPTHS = (4, 8)


def configs(quick: bool) -> list[Config]:
    """The networks measured: batch 512 x width 4096 at each depth (tiny ones when ``quick``)."""
    return [Config(depth=depth, **(QUICK if quick else FULL)) for depth in DEPTHS]


COMPILE_REPEATS = 3
"""Compilations per step: compile time is the median (one compilation varies by +-30% on a busy CPU)."""


def compile_step(variant: Any, cfg: Config, repeats: int = COMPILE_REPEATS) -> dict[str, Any]:
    """Lowers and compiles one variant's step from abstract shapes; its memory and compile time.

    The step is traced, lowered and compiled once untimed (Python imports and other one-time
    costs of a library's first use), then ``repeats`` times from cleared caches
    (``jax.clear_caches``), as a fresh program would be; ``lower_s`` (tracing + lowering) and
    ``compile_s`` (XLA) are the medians, ``total_s_runs`` every timed run's sum.
    """
    import statistics

    import jax

    step, opt_init = make_step(variant.loss, cfg)
    params = jax.eval_shape(variant.init, jax.random.key(0))
    opt_state = jax.eval_shape(opt_init, params)
    lower_s, compile_s = [], []
    for _ in range(repeats + 1):
        jax.clear_caches()
        start = time.perf_counter()
        lowered = step.lower(params, opt_state, *batch_specs(cfg))
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
        lower_s.append(lowered_at - start)
        compile_s.append(compiled_at - lowered_at)
    lower_s, compile_s = lower_s[1:], compile_s[1:]  # the untimed warm-up
    stats = compiled.memory_analysis()
    return {
        "temp_bytes": stats.temp_size_in_bytes,
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "alias_bytes": stats.alias_size_in_bytes,
        "lower_s": statistics.median(lower_s),
        "compile_s": statistics.median(compile_s),
        "total_s_runs": [a + b for a, b in zip(lower_s, compile_s)],
    }


def measure(framework: str, quick: bool) -> dict[str, Any]:
    """Every variant of ``framework`` at every depth: the worker's result."""
    import jax
    import jax.numpy as jnp

    # The first compilation in a process also initialises XLA; keep that out of the timings.
    jax.jit(lambda v: v + 1).lower(jnp.zeros(())).compile()
    records = []
    for cfg in configs(quick):
        for name, variant in variants(framework, cfg).items():
            base = {"framework": framework, "name": name, "depth": cfg.depth, "batch": cfg.batch, "width": cfg.width}
            if isinstance(variant, str):
                records.append({**base, "note": variant})
                log(f"  {name:24s} depth {cfg.depth}: {variant}")
                continue
            result = compile_step(variant, cfg, repeats=1 if quick else COMPILE_REPEATS)
            records.append({**base, "dropped_elements": cfg.dropped_elements, **result})
            log(
                f"  {name:24s} depth {cfg.depth}: temp {result['temp_bytes'] / MiB:9.1f} MiB, "
                f"compile {result['compile_s']:.2f} s"
            )
    return {"framework": framework, "records": records}


# ------------------------------------------------------------------------------------- summary


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: temp at each depth against the no-dropout step.

    - ``temp_ratio``: ``temp / temp(no dropout)`` at the smaller depth.
    - ``extra_bytes_per_dropped``: ``(temp - temp(no dropout)) / (batch * width * depth)``.
    - ``growth_bytes_per_dropped``: how much faster temp grows from the smaller to the larger
      depth than without dropout, per element the extra layers drop.
    """
    shallow, deep = DEPTHS
    by_key = {(r["name"], r["depth"]): r for r in records}
    names = list(dict.fromkeys(r["name"] for r in records))
    base_shallow, base_deep = by_key.get((BASELINE, shallow)), by_key.get((BASELINE, deep))
    rows = []
    for name in names:
        low, high = by_key.get((name, shallow)), by_key.get((name, deep))
        row: dict[str, Any] = {"name": name, "note": (low or high or {}).get("note")}
        if low and "temp_bytes" in low:
            row["temp_mib"] = low["temp_bytes"] / MiB
            row["compile_s"] = low["lower_s"] + low["compile_s"]
            if base_shallow and "temp_bytes" in base_shallow:
                row["temp_ratio"] = low["temp_bytes"] / base_shallow["temp_bytes"]
                if name != BASELINE:
                    row["extra_bytes_per_dropped"] = (low["temp_bytes"] - base_shallow["temp_bytes"]) / low[
                        "dropped_elements"
                    ]
        if high and "temp_bytes" in high:
            row["temp_mib_deep"] = high["temp_bytes"] / MiB
            row["compile_s_deep"] = high["lower_s"] + high["compile_s"]
            if low and "temp_bytes" in low and base_shallow and base_deep and name != BASELINE:
                base_growth = base_deep["temp_bytes"] - base_shallow["temp_bytes"]
                growth = high["temp_bytes"] - low["temp_bytes"] - base_growth
                row["growth_bytes_per_dropped"] = growth / (high["dropped_elements"] - low["dropped_elements"])
        rows.append(row)
    return rows


def title(quick: bool) -> str:
    """The heading of the memory table."""
    cfg = configs(quick)[0]
    return (
        f"Memory benchmark: MLP training step (SGD, donated parameters), batch {cfg.batch} x width {cfg.width}, "
        f"dropout {cfg.rate} after each hidden layer"
    )


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The memory benchmark as one Markdown table."""
    shallow, deep = DEPTHS
    headers = (
        "variant",
        f"temp MiB ({shallow} layers)",
        "x no-dropout",
        "extra B / dropped elt",
        f"temp MiB ({deep} layers)",
        f"growth {shallow}->{deep} B / dropped elt",
        f"compile s ({shallow})",
        f"compile s ({deep})",
    )
    body = []
    for row in rows:
        if row.get("note") and "temp_mib" not in row:
            body.append((row["name"], row["note"], None, None, None, None, None, None))
            continue
        body.append(
            (
                row["name"],
                row.get("temp_mib"),
                row.get("temp_ratio"),
                row.get("extra_bytes_per_dropped"),
                row.get("temp_mib_deep"),
                row.get("growth_bytes_per_dropped"),
                row.get("compile_s"),
                row.get("compile_s_deep"),
            )
        )
    return markdown_table(headers, body)


def main(argv: Sequence[str] | None = None) -> None:
    """Worker entry point: ``python -m benchmarks.memory --framework NAME [--quick] [--out PATH]``."""
    worker_main(__doc__.splitlines()[0], FRAMEWORKS, measure, argv)


if __name__ == "__main__":
    main()
