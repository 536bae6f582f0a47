"""Step time of the transformer suite's model at one length: flax's dropout vs jdrop's vs none, round-robin.

``python -m benchmarks.transformer_speed [--length 512] [--rounds 9] [--framework flax.linen]``: compiles the
no-dropout, flax-dropout and jdrop-swapped steps of :mod:`benchmarks.transformer` (with and without remat), then
times them in turn, each round starting at the next variant, and prints medians, minima and the speed-up of jdrop
over flax's dropout (ratio of medians, of minima, and the median of each round's ratio). The full suite
(``python -m benchmarks --only transformer``) times every length and variant; this is the short run for the
issue's T=512 target on a machine that is not always idle.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence

from benchmarks.transformer import FLAX, JDROP, NONE, Config, compile_step, paired_speedup, runner, time_steps, variant


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--framework", default="flax.linen", choices=("flax.linen", "flax.nnx"))
    args = parser.parse_args(argv)

    import jax
    import optax

    cfg = dataclasses.replace(Config(), length=args.length)
    runners = {}
    params = jax.jit(variant(args.framework, FLAX, False, cfg).init)(jax.random.key(0))
    for remat in (False, True):
        for kind in (NONE, FLAX, JDROP):
            compiled, _ = compile_step(variant(args.framework, kind, remat, cfg), cfg, 1)
            runners[(kind, remat)] = runner(compiled, optax.sgd(cfg.learning_rate).init, cfg, params)
    load = os.getloadavg()
    timed = time_steps({f"{kind}{' + remat' if remat else ''}": run for (kind, remat), run in runners.items()},
                       args.rounds)
    print(f"{args.framework}, T={args.length}, {args.rounds} rounds, load average {load[0]:.2f} -> "
          f"{os.getloadavg()[0]:.2f}")
    print("| variant | median s | min s | flax dropout / this: medians | minima | paired (median of rounds) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, result in timed.items():
        reference_name = f"{FLAX}{' + remat' if 'remat' in name else ''}"
        reference = timed[reference_name]
        print(f"| {name} | {result['median_ms'] / 1e3:.3f} | {result['min_ms'] / 1e3:.3f} | "
              f"{reference['median_ms'] / result['median_ms']:.2f} | {reference['min_ms'] / result['min_ms']:.2f} | "
              f"{paired_speedup(timed, reference_name, name):.2f} |")


if __name__ == "__main__":
    main()
