"""Step benchmark: training steps per second of the 4-layer MLP of :mod:`benchmarks.models`.

One worker process (``python -m benchmarks.step --framework NAME [--framework NAME ...]``)
builds the jitted, donating SGD step of every framework it is given, on random data, and times
them round-robin: step ``r`` of every variant runs before step ``r + 1`` of any (the order
rotating each round), so a slow minute of a shared machine slows every variant alike instead of
whichever process ran then. The network and batch are the memory benchmark's (batch 512 x width
4096, 4 hidden layers, dropout 0.5), about 2 s a step on a 2-core CPU. Per element that goes
through dropout the matrix products of a width-4096 layer cost about 6 * 4096 flops, so dropout
is a small part of any step: what a framework can save is the time of its mask generation (flax,
equinox and haiku draw bits with a rolled threefry loop and store a mask; jdrop fuses the bits
into the multiply, and jdrop.mlp reads ReLU layers' masks from their activations).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import StepRunner, log, markdown_table, round_robin
from benchmarks.models import BASELINE, FRAMEWORKS, Config, make_step, variants

FULL = Config(batch=512, width=4096, depth=4)
QUICK = Config(batch=32, width=512, depth=4)
RUNS = {False: 8, True: 5}
REFERENCE = "flax.linen"
POLICIES = ("key",)
"""Residual policies of the ``jdrop.dropout`` MLP timed here (the op benchmark times all three)."""
ALL = "interleaved"
"""The framework name under which ``python -m benchmarks`` runs every framework in one worker."""


def _runner(variant: Any, cfg: Config) -> StepRunner:
    """One variant's jitted step with fresh parameters and a fixed batch."""
    import jax
    import jax.numpy as jnp

    step, opt_init = make_step(variant.loss, cfg)
    params = jax.jit(variant.init)(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (cfg.batch, cfg.width), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (cfg.batch,), 0, cfg.classes)
    return StepRunner(step, params, opt_init(params), x, y, jax.random.key(3))


def measure(frameworks: Sequence[str], quick: bool) -> dict[str, Any]:
    """Steps per second of every variant of ``frameworks``, timed round-robin: the worker's result."""
    cfg = QUICK if quick else FULL
    records: dict[str, dict[str, Any]] = {}
    runners: dict[str, StepRunner] = {}
    for framework in frameworks:
        for name, variant in variants(framework, cfg, POLICIES).items():
            base = {"framework": framework, "name": name, "batch": cfg.batch, "width": cfg.width, "depth": cfg.depth}
            if isinstance(variant, str):
                records[name] = {**base, "note": variant}
                log(f"  {name:24s}: {variant}")
                continue
            runners[name] = _runner(variant, cfg)
            first = runners[name]()  # tracing + compilation + the first step
            runners[name]()  # warm-up
            records[name] = {**base, "first_call_ms": first * 1e3}
            log(f"  {name:24s}: first call {first:.1f} s")
    times = round_robin(runners, RUNS[quick])
    for name, ts in times.items():
        quartiles = statistics.quantiles(ts, n=4) if len(ts) > 1 else ts * 3
        records[name].update(
            median_ms=statistics.median(ts) * 1e3,
            p25_ms=quartiles[0] * 1e3,
            p75_ms=quartiles[2] * 1e3,
            min_ms=min(ts) * 1e3,
            runs=len(ts),
        )
        log(f"  {name:24s}: {records[name]['median_ms']:9.1f} ms / step")
    return {"framework": ",".join(frameworks), "records": list(records.values())}


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds steps/s, the speed-up over flax.linen and the time over the step without dropout."""
    by_name = {r["name"]: r for r in records if "median_ms" in r}
    reference, baseline = by_name.get(REFERENCE), by_name.get(BASELINE)
    rows = []
    for record in records:
        row = dict(record)
        if "median_ms" in record:
            row["steps_per_s"] = 1e3 / record["median_ms"]
            row["speedup_vs_flax"] = reference["median_ms"] / record["median_ms"] if reference else None
            row["vs_no_dropout"] = record["median_ms"] / baseline["median_ms"] if baseline else None
        rows.append(row)
    return rows


def title(quick: bool) -> str:
    """The heading of the step table."""
    cfg = QUICK if quick else FULL
    return f"Step benchmark: {cfg.depth}-layer MLP training step (SGD), batch {cfg.batch} x width {cfg.width}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The step benchmark as one Markdown table."""
    headers = (
        "variant",
        "batch x width x layers",
        "median ms / step",
        "min ms",
        "steps/s",
        "speed-up vs flax.linen",
        "x no-dropout",
        "first call s",
    )
    body = []
    for row in rows:
        size = f"{row['batch']}x{row['width']}x{row['depth']}"
        if "median_ms" not in row:
            body.append((row["name"], size, row.get("note"), None, None, None, None, None))
            continue
        body.append(
            (
                row["name"],
                size,
                row["median_ms"],
                row["min_ms"],
                row["steps_per_s"],
                row["speedup_vs_flax"],
                row["vs_no_dropout"],
                row["first_call_ms"] / 1e3,
            )
        )
    return markdown_table(headers, body)


def main(argv: Sequence[str] | None = None) -> None:
    """Worker entry point: ``python -m benchmarks.step --framework NAME [...] [--quick] [--out PATH]``.

    ``--framework interleaved`` (what ``python -m benchmarks`` passes) stands for every framework;
    further ``--framework`` options then narrow it down.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", action="append", required=True, choices=(ALL, *FRAMEWORKS))
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs (a smoke test)")
    parser.add_argument("--out", type=Path, help="where to write the JSON result")
    args = parser.parse_args(argv)
    chosen = [f for f in args.framework if f != ALL] or list(FRAMEWORKS)
    result = measure([f for f in FRAMEWORKS if f in chosen], args.quick)
    text = json.dumps(result, indent=1)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
