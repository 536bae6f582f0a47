"""Step benchmark: training steps per second of the 4-layer MLP of :mod:`benchmarks.models`.

One worker process per framework (``python -m benchmarks.step --framework NAME``) runs the
jitted, donating SGD step on random data and reports the median time per step after warm-up.
The network and batch are the memory benchmark's (batch 512 x width 4096, 4 hidden layers,
dropout 0.5), about 2 s a step on a 2-core CPU. Per element that goes through dropout the matrix
products of a width-4096 layer cost about 6 * 4096 flops, so dropout is a small part of any step:
what a framework can save is the time of its mask generation (flax, equinox and haiku draw bits
with a rolled threefry loop and store a mask; jdrop fuses the bits into the multiply).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks._common import log, markdown_table, time_call, worker_main
from benchmarks.models import BASELINE, FRAMEWORKS, Config, make_step, variants

FULL = Config(batch=512, width=4096, depth=4)
QUICK = Config(batch=32, width=512, depth=4)
RUNS = {False: 8, True: 5}
REFERENCE = "flax.linen"
POLICIES = ("key",)
"""Residual policies of the ``jdrop.dropout`` MLP timed here (the op benchmark times all three)."""


def time_steps(variant: Any, cfg: Config, runs: int) -> dict[str, float]:
    """Median wall time of one training step (parameters threaded from step to step)."""
    import jax
    import jax.numpy as jnp

    step, opt_init = make_step(variant.loss, cfg)
    params = jax.jit(variant.init)(jax.random.key(0))
    state = [params, opt_init(params)]
    x = jax.random.normal(jax.random.key(1), (cfg.batch, cfg.width), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (cfg.batch,), 0, cfg.classes)
    key = jax.random.key(3)

    def one_step() -> Any:
        state[0], state[1], loss = step(state[0], state[1], x, y, key)
        return loss

    return time_call(one_step, jax.block_until_ready, runs=runs)


def measure(framework: str, quick: bool) -> dict[str, Any]:
    """Steps per second of every variant of ``framework``: the worker's result."""
    cfg = QUICK if quick else FULL
    records = []
    for name, variant in variants(framework, cfg, POLICIES).items():
        base = {"framework": framework, "name": name, "batch": cfg.batch, "width": cfg.width, "depth": cfg.depth}
        if isinstance(variant, str):
            records.append({**base, "note": variant})
            log(f"  {name:24s}: {variant}")
            continue
        timing = time_steps(variant, cfg, RUNS[quick])
        records.append({**base, **timing})
        log(f"  {name:24s}: {timing['median_ms']:9.1f} ms / step")
    return {"framework": framework, "records": records}


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
    """Worker entry point: ``python -m benchmarks.step --framework NAME [--quick] [--out PATH]``."""
    worker_main(__doc__.splitlines()[0], FRAMEWORKS, measure, argv)


if __name__ == "__main__":
    main()
