"""Host overhead: ``jdrop.train_step`` called from Python per minibatch vs ``jdrop.train_epoch`` (one ``lax.scan``).

``python -m benchmarks.loop [--quick]``: the demo's model (40-512-512-10 ReLU MLP, dropout 0.1/0.5/0.5, Adam 1e-3,
batch 100) on 4000 random MNIST-1D-shaped examples; prints steps/s of both ways of running an epoch (median of
several epochs after a compiled warm-up epoch) and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial


def main(argv: list[str] | None = None) -> None:
    """Times both loops and prints a Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loop", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    args = parser.parse_args(argv)

    import jax
    import optax

    import jdrop

    n, batch, epochs = 4000, 100, 2 if args.quick else 5
    data = {"x": jax.random.normal(jax.random.key(0), (n, 40)), "y": jax.random.randint(jax.random.key(1), (n,), 0, 10)}
    apply_fn = partial(jdrop.mlp.apply, rates=(0.1, 0.5, 0.5))

    def fresh():
        params = jdrop.mlp.init(jax.random.key(2), [40, 512, 512, 10], activation="relu")
        return jdrop.TrainState.create(apply_fn=apply_fn, params=params, tx=optax.adam(1e-3))

    def python_epoch(state, key):
        order = jax.random.permutation(key, n)
        for j in range(n // batch):
            idx = order[j * batch : (j + 1) * batch]
            state, metrics = jdrop.train_step(state, {"x": data["x"][idx], "y": data["y"][idx]},
                                              jax.random.fold_in(key, j))
        jax.block_until_ready(metrics["loss"])
        return state

    def scan_epoch(state, key):
        state, metrics = jdrop.train_epoch(state, data, key, batch_size=batch)
        jax.block_until_ready(metrics["loss"])
        return state

    rows = []
    for name, epoch_fn in (("train_step from Python", python_epoch), ("train_epoch (lax.scan)", scan_epoch)):
        state = epoch_fn(fresh(), jax.random.key(9))  # compile
        times = []
        for e in range(epochs):
            start = time.perf_counter()
            state = epoch_fn(state, jax.random.key(10 + e))
            times.append(time.perf_counter() - start)
        rows.append((name, statistics.median(times)))
    steps = n // batch
    print(f"Machine: {jax.devices()[0].device_kind}, backend {jax.default_backend()}; jax {jax.__version__}")
    print("\n| loop | median s / epoch | steps/s |\n|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {steps / seconds:.0f} |")
    print(f"\ntrain_epoch is {rows[0][1] / rows[1][1]:.2f}x faster than the Python loop ({steps} steps per epoch).")


if __name__ == "__main__":
    main()
