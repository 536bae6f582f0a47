"""Tile sweep of ``jdrop.dot_product_attention``: one step's time per ``(block_q, block_k)`` beside flax's.

``python -m benchmarks.attention_tiles [--length 512] [--rounds 11] [--per-element] [--tiles 128x128 256x128]``
times ``jit(value_and_grad(sum(attention(q, k, v) ** 2)))`` for q, k, v of shape (B=8, T, H=4, D=64) (the
transformer suite's attention) with dropout 0.1, round-robin with flax.linen's attention with and without
dropout, and prints medians and minima. Default tiles come from this sweep (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence

from benchmarks._common import round_robin

BATCH, HEADS, DEPTH, RATE = 8, 4, 64, 0.1
TILES = ("128x128", "256x128", "256x256", "128x256", "512x128", "512x512")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--per-element", action="store_true", help="broadcast_dropout=False (one mask per head)")
    parser.add_argument("--tiles", nargs="+", default=TILES, help="block_q x block_k pairs, e.g. 256x128")
    args = parser.parse_args(argv)

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import jdrop

    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (BATCH, args.length, HEADS, DEPTH)) for key in keys)
    rng, broadcast = jax.random.key(5), not args.per_element

    def step(attention):
        def loss(q, k, v):
            return jnp.sum(attention(q, k, v) ** 2)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    steps = {
        "flax.linen, no dropout": step(nn.dot_product_attention),
        "flax.linen, dropout": step(lambda q, k, v: nn.dot_product_attention(
            q, k, v, dropout_rng=rng, dropout_rate=RATE, broadcast_dropout=broadcast)),
    }
    for tile in args.tiles:
        block_q, block_k = (int(n) for n in tile.split("x"))
        if block_q <= args.length and block_k <= args.length:
            steps[f"jdrop {tile}"] = step(lambda q, k, v, bq=block_q, bk=block_k: jdrop.dot_product_attention(
                q, k, v, dropout_rng=rng, dropout_rate=RATE, broadcast_dropout=broadcast, block_q=bq, block_k=bk))
    def timed(fn):
        def run() -> float:
            start = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            return time.perf_counter() - start

        return run

    runners = {name: timed(fn) for name, fn in steps.items()}
    for run in runners.values():
        run()  # compilation
    load = os.getloadavg()[0]
    times = round_robin(runners, args.rounds)
    print(f"T={args.length}, B={BATCH}, H={HEADS}, D={DEPTH}, {'per-element' if args.per_element else 'broadcast'} "
          f"mask, {args.rounds} rounds, load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print("| step | median ms | min ms |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {min(ts) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
