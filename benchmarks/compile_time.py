"""Compile time of the MLP training step: jdrop.mlp (batch call and per-example vmap) vs flax.linen, in one process.

``python -m benchmarks.compile_time [--quick] [--rounds N]``: every round compiles each variant's step once
from cleared caches (tracing + lowering + XLA), the variants in turn, so that a slow minute of a shared
machine hits all of them alike; the table gives the minimum and median over rounds. The step is the memory
suite's (batch 512 x width 4096, SGD, donated parameters); compile time does not depend on the width much.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

from benchmarks._common import machine_description
from benchmarks.memory import FULL, QUICK
from benchmarks.models import BASELINE, Config, Variant, batch_specs, make_step, variants

DEPTHS = (4, 8)


def per_example_mlp(cfg: Config) -> Variant:
    """``jdrop.mlp`` as ``jdrop.train_step`` runs it: ``per_example`` with example keys by index (``mlp.apply``
    takes the batch with those keys at once, ``jdrop.train.takes_batch``)."""
    import functools

    import optax

    import jdrop

    def init(key: Any) -> Any:
        return jdrop.mlp.init(key, cfg.layer_sizes, activation="relu")

    def loss(params: Any, x: Any, y: Any, key: Any) -> Any:
        logits = jdrop.train.per_example(functools.partial(jdrop.mlp.apply, rates=cfg.rates), params, x, key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return Variant(init, loss)


def compile_seconds(variant: Variant, cfg: Config) -> float:
    """Seconds to trace, lower and compile the step from cleared caches, as a fresh program would."""
    import jax

    jax.clear_caches()
    start = time.perf_counter()
    step, opt_init = make_step(variant.loss, cfg)
    params = jax.eval_shape(variant.init, jax.random.key(0))
    step.lower(params, jax.eval_shape(opt_init, params), *batch_specs(cfg)).compile()
    return time.perf_counter() - start


def measure(quick: bool, rounds: int) -> dict[str, dict[int, list[float]]]:
    """Seconds per compilation, by variant and depth."""
    seconds: dict[str, dict[int, list[float]]] = {}
    for depth in DEPTHS:
        cfg = Config(depth=depth, **(QUICK if quick else FULL))
        chosen: dict[str, Variant] = {
            BASELINE: variants("none", cfg)[BASELINE],  # type: ignore[dict-item]
            "jdrop.mlp": variants("jdrop", cfg, policies=())["jdrop.mlp"],  # type: ignore[dict-item]
            "jdrop.mlp per example (vmap)": per_example_mlp(cfg),
            "flax.linen": variants("flax.linen", cfg)["flax.linen"],  # type: ignore[dict-item]
        }
        for variant in chosen.values():  # untimed: imports and one-time costs
            compile_seconds(variant, cfg)
        for _ in range(rounds):
            for name, variant in chosen.items():
                seconds.setdefault(name, {}).setdefault(depth, []).append(compile_seconds(variant, cfg))
    return seconds


def table(seconds: dict[str, dict[int, list[float]]]) -> str:
    """Markdown: min / median seconds per depth, and the ratio of medians to flax.linen."""
    header = "| variant | " + " | ".join(f"{d} layers: min / median s | x flax.linen ({d})" for d in DEPTHS) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(DEPTHS)]
    flax = {d: statistics.median(seconds["flax.linen"][d]) for d in DEPTHS}
    for name, by_depth in seconds.items():
        cells = []
        for d in DEPTHS:
            values = by_depth[d]
            median = statistics.median(values)
            cells.append(f"{min(values):.2f} / {median:.2f} | {median / flax[d]:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one round (a smoke test)")
    parser.add_argument("--rounds", type=int, default=5, help="compilations per variant and depth (default 5)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    seconds = measure(args.quick, 1 if args.quick else args.rounds)
    machine = machine_description()
    print(f"Machine: {machine['cpu_model']}, {machine['cores']} cores; versions: {machine['versions']}")
    print(f"Command: python -m benchmarks.compile_time{' --quick' if args.quick else ''} --rounds {args.rounds}")
    print(f"Total time: {time.perf_counter() - start:.0f} s\n")
    print(table(seconds))


if __name__ == "__main__":
    main()
